"""The players an explanation gives its values to.

- ``slic``: the image's SLIC superpixels, about ``segments`` of them (the default);
- ``grid``: the fixed grid of :data:`GRID_CELLS` x :data:`GRID_CELLS` cells of the 32-px model
  input (:mod:`shapcore.players`), the amortised explainer's players, so that a queued method
  can be compared with it value for value.

"Players" is this project's one word for them (superpixels are one layout of players).
"""

from __future__ import annotations

PLAYER_LAYOUTS = ("slic", "grid")
#: Cells per side of the ``grid`` layout: 8 x 8 = 64 players of 4 x 4 px.
GRID_CELLS = 8
GRID_PLAYERS = GRID_CELLS * GRID_CELLS
