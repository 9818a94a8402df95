"""The explanation job contract between the API (submit, status) and the worker (run).

No torch here: the API imports it. :mod:`shapcore.jobs.settings` (``EXPLAIN_*``),
:mod:`shapcore.jobs.queue` (Redis layout, payload, dedupe key, status, artifacts),
:mod:`shapcore.jobs.image` (the decoded picture a job carries),
:mod:`shapcore.jobs.quota` (jobs in flight per key).
"""
