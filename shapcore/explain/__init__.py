"""The vocabulary of an explanation, owned once: what may be asked (:mod:`.request`), by which
method (:mod:`.methods`), over which players (:mod:`.layouts`) with which background
(:mod:`.background`), and what comes back (:mod:`.result`, :mod:`.status`).

The API, the worker, the report (``python -m training report``) and ``bench/`` all speak it.
Torch-free and free of the job queue: the API's light path imports it, and the queue
(:mod:`shapcore.jobs`) builds on it, never the other way round.
"""
