"""shapserve's shared core: what the service, the worker and training all use.

The three rooms (``service/``, ``worker/``, ``training/``) import this package and never each
other (import-linter contracts in pyproject.toml). It holds the model and its preprocessing
(:mod:`shapcore.model`), the one image decoder (:mod:`shapcore.images`), the checkpoint
registry (:mod:`shapcore.registry`), inference freezing (:mod:`shapcore.inference`), the
error hierarchy (:mod:`shapcore.errors`) and the explanation job contract
(:mod:`shapcore.jobs`: queue, payload, result, dedupe key, quota, settings).
"""
