"""One error hierarchy for every room.

Every refusal is a :class:`ShapserveError` carrying an HTTP ``status``, a stable
machine-readable ``code`` (clients branch on it; the service counts input refusals under it)
and a ``message`` in words. The API answers any of them with its standard JSON error body;
the CLIs print the message as one line, without a traceback.

- :class:`UserError`: a mistake in what was asked (bad path, unknown version, wrong layout).
- :class:`InputError`: a refused upload (see :mod:`shapcore.images` for the codes).
- :class:`ModelLoadError`: a version that cannot be served (404 unknown, 422 otherwise).
- :class:`Overloaded`: come back later (429 with ``Retry-After``): :class:`QueueFull` and
  :class:`TooManyJobs` of the explanation queue.
"""

from __future__ import annotations


class ShapserveError(Exception):
    """An error with an HTTP ``status``, a stable ``code`` and a human ``message``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, object]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details  # the figures behind a refusal, for clients (the error body's ``details``)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class UserError(ShapserveError):
    """A mistake in what the user asked for (bad path, unknown version, wrong layout...)."""

    def __init__(self, message: str, *, status: int = 422, code: str = "invalid_request") -> None:
        super().__init__(status, code, message)


class InputError(ShapserveError):
    """A refused input (an upload, a parameter)."""


class ModelLoadError(ShapserveError):
    """A version cannot be served: ``status`` 404 for an unknown version, 422 otherwise."""


class Overloaded(ShapserveError):
    """Refused for now: retry after ``retry_after`` seconds (429 with a Retry-After header)."""

    def __init__(self, code: str, message: str, retry_after: int) -> None:
        super().__init__(429, code, message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class QueueFull(Overloaded):
    """The explanation queue holds ``limit`` jobs already."""

    def __init__(self, depth: int, limit: int, retry_after: int) -> None:
        super().__init__(
            "queue_full",
            f"the explanation queue holds {depth} jobs (limit {limit}); retry in {retry_after} s",
            retry_after,
        )
        self.depth = depth
        self.limit = limit


class TooManyJobs(Overloaded):
    """A principal has ``limit`` jobs in flight already."""

    def __init__(self, in_flight: int, limit: int, retry_after: int) -> None:
        super().__init__(
            "too_many_jobs",
            f"this key has {in_flight} explanation jobs queued or running (limit {limit}); "
            f"retry in {retry_after} s, when one has finished",
            retry_after,
        )
        self.in_flight = in_flight
        self.limit = limit
