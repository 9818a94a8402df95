"""The fixed grid of players that the amortised explainer (``method=fast``) values.

SLIC superpixels change from image to image, so a network that outputs one value per player
cannot be trained on them: its outputs need a fixed meaning. The grid gives them one: the
32×32 model input is cut into ``GRID_CELLS × GRID_CELLS`` square cells (8×8 cells of 4×4
pixels: 64 players, about the study's 50 superpixels), numbered row by row. KernelSHAP runs
over the same cells with ``players=grid``, so the two explainers estimate the same numbers
and can be compared value for value (BENCHMARKS.md, issue 17).

At an upload's own resolution a cell is the block of pixels that an area reduction to 32×32
would average into it: :func:`grid_labels` maps each upload pixel to its cell, and
:func:`grid_weights` gives the (64, 32·32) 0/1 keep map of each cell at the
model's resolution.
"""

from __future__ import annotations

import numpy as np

from shapcore.explain.layouts import GRID_CELLS  # 8 cells per side: 64 players of 4x4 px
from shapcore.model import SOURCE_SIZE

__all__ = ["GRID_CELLS", "grid_labels", "grid_weights"]


def grid_labels(height: int, width: int, cells: int = GRID_CELLS) -> np.ndarray:
    """int32 (height, width): the grid cell of every pixel, ``row * cells + column``.

    Pixel (y, x) falls in model pixel (y·32 // H, x·32 // W) (the partition an area reduction
    uses), and model pixel (r, c) in cell (r // (32 / cells), c // (32 / cells)).
    """
    if SOURCE_SIZE % cells:
        raise ValueError(f"{cells} cells do not divide the {SOURCE_SIZE}-px model input")
    side = SOURCE_SIZE // cells
    rows = ((np.arange(height) * SOURCE_SIZE) // height) // side
    cols = ((np.arange(width) * SOURCE_SIZE) // width) // side
    return (rows[:, None] * cells + cols[None, :]).astype(np.int32)


def grid_weights(cells: int = GRID_CELLS) -> np.ndarray:
    """float32 (cells², 32·32): 1 where a model pixel belongs to the cell, else 0."""
    labels = grid_labels(SOURCE_SIZE, SOURCE_SIZE, cells).ravel()
    weights = np.zeros((cells * cells, SOURCE_SIZE * SOURCE_SIZE), dtype=np.float32)
    weights[labels, np.arange(labels.size)] = 1.0
    return weights
