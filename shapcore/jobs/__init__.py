"""The explanation job queue between the API (submit, status) and the worker (run).

No torch here: the API imports it. :mod:`shapcore.jobs.client` (the one client: submit,
status, wait, inline answers, artifacts), :mod:`shapcore.jobs.keys` (the Redis layout),
:mod:`shapcore.jobs.queue` (payload, dedupe key, limits), :mod:`shapcore.jobs.status` (the
status document), :mod:`shapcore.jobs.failures` (RQ's failure callbacks),
:mod:`shapcore.jobs.inline` (answers given in the request), :mod:`shapcore.jobs.artifact` (the
pictures' data), :mod:`shapcore.jobs.image` (the decoded picture a job carries),
:mod:`shapcore.jobs.quota` (jobs in flight per key), :mod:`shapcore.jobs.settings` (``EXPLAIN_*``).
The vocabulary they carry is :mod:`shapcore.explain`.
"""
