"""The training room: ``python -m training train|evaluate|fit-explainer|report|list|show|promote``.

What it holds:

- the training run: :mod:`training.train` (data, split, model, loop, early stopping, resume,
  publish), :mod:`training.setup` (what a run fixes before its first epoch),
  :mod:`training.engine` (one training step, one validation pass, CUDA graphs),
  :mod:`training.budget` (fitting a run to ``--time-budget``), :mod:`training.presets` (the
  ``paper``, ``cpu`` and ``smoke`` profiles and their batched augmentation),
  :mod:`training.data` (CIFAR-10 download, folders and archives, decoded once and cached),
  :mod:`training.checkpoint` (a run's resumable state) and :mod:`training.distributed`
  (DistributedDataParallel under torchrun);
- :mod:`training.evaluate` and :mod:`training.plots`: a version's metrics.json, the study's
  Tables 4 and 5, the confusion-matrix and training-curve PNGs;
- :mod:`training.fastshap`: ``fit-explainer``, the version's amortised explainer
  (``POST /explain method=fast``), fitted against :mod:`training.explainer_game`'s value function,
  to :mod:`training.shapley_labels`' labels or FastSHAP's loss, scored by
  :mod:`training.explainer_quality`;
- :mod:`training.report` (with ``templates/report.html``) and :mod:`training.explain_jobs`: the
  study's report as one HTML file, its explanations computed by the RQ workers as ordinary jobs;
- :mod:`training.cli`: the command line.

The checkpoint registry, the network, the image decoder and the job contract are not here but
in :mod:`shapcore`, which this package imports like ``service`` and ``worker`` do; it never
imports either of them (the import-linter contracts in ``pyproject.toml``).
"""
