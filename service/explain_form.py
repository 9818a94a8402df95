"""Reading a POST /explain body: the image exactly as /predict reads it, plus small form fields.

:func:`service.images.read_image_uploads` streams the multipart body with every /predict
check (size limit while streaming, missing/empty/extra ``file`` fields, malformed bodies)
but keeps only the ``file`` parts. Rather than copy it, the request's stream is *teed*: the
same chunks also feed a second python-multipart parser that keeps the few short text fields
named in ``fields`` (``target``, ``segments``, ...). Validation stays in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from service.images import Upload, read_image_uploads

#: Longest value kept for a parameter field (they are numbers or class labels).
MAX_FIELD_BYTES = 256


class _FieldCollector:
    """python-multipart callbacks that keep non-file parts named in ``fields`` (bounded)."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = set(fields)
        self.values: dict[str, str] = {}
        self._headers: dict[bytes, bytes] = {}
        self._name = bytearray()
        self._value = bytearray()
        self._keep: str | None = None
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _begin(self) -> None:
        self._headers = {}
        self._keep = None
        self._data = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._name).strip().lower()] = bytes(self._value).strip()
        self._name = bytearray()
        self._value = bytearray()

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.fields and b"filename" not in options:
            self._keep = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep is not None and len(self._data) <= MAX_FIELD_BYTES:
            self._data.extend(data[start:end])

    def _part_end(self) -> None:
        if self._keep is not None:
            self.values[self._keep] = bytes(self._data[: MAX_FIELD_BYTES + 1]).decode("utf-8", "replace")
        self._keep = None


class _TeeRequest:
    """What read_image_uploads needs of a request (headers, stream), copying chunks to a sink."""

    def __init__(self, request: Any, sink: Any) -> None:
        self._request = request
        self.headers = request.headers
        self._sink = sink

    async def stream(self) -> AsyncIterator[bytes]:
        async for chunk in self._request.stream():
            self._sink(chunk)
            yield chunk


async def read_explain_upload(request: Any, *, max_bytes: int, fields: Iterable[str]) -> tuple[Upload, dict[str, str]]:
    """The one ``file`` upload (every /predict check applies) and the named text fields."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    collector = _FieldCollector(fields)
    parser: list[Any] = []  # created on the first chunk; emptied (disabled) on any parse error
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if boundary:
        try:
            parser.append(MultipartParser(boundary, collector.callbacks()))
        except Exception:
            parser.clear()

    def sink(chunk: bytes) -> None:
        if parser:
            try:
                parser[0].write(chunk)
            except Exception:  # read_image_uploads reports malformed bodies itself
                parser.clear()

    uploads = await read_image_uploads(_TeeRequest(request, sink), max_bytes=max_bytes, max_files=1)
    return uploads[0], collector.values
