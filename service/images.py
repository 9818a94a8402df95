"""Image uploads: streaming multipart reading with a byte limit, format sniffing, a pixel
limit checked from the header before decoding, and decoding to the model's input.

Shared by the prediction service and the explanation endpoints. Every refusal is an
:class:`InputError` carrying an HTTP status, a stable machine-readable ``code`` (also the
``reason`` label of ``shapserve_rejected_inputs_total``) and a human message::

    uploads = await read_image_uploads(request, max_bytes=s.max_upload_bytes, max_files=s.max_files_per_request)
    tensor = await asyncio.to_thread(image_to_tensor, uploads[0].data, s.max_image_pixels)  # uint8 (3, 32, 32)

``image_to_tensor`` (and ``decode_image``) block on Pillow: run them off the event loop.

Codes and statuses:

=====================  ======  ==================================================================
code                   status  meaning
=====================  ======  ==================================================================
empty_body             400     the request has no body
malformed_multipart    400     not parseable as multipart/form-data (no boundary, cut short, ...)
unsupported_media_type 415     the request is not multipart/form-data
missing_file           422     no multipart field named ``file``
empty_file             422     a ``file`` field holds zero bytes
too_many_files         422     more ``file`` fields than MAX_FILES_PER_REQUEST
upload_too_large       413     the body is over MAX_UPLOAD_BYTES (refused while streaming)
not_an_image           415     the bytes are not a PNG, JPEG, WebP, GIF, BMP or TIFF image
corrupt_image          422     the image is truncated or its data is corrupt, or the file starts
                               like an accepted format but its header cannot be read
image_too_large        413     width x height over MAX_IMAGE_PIXELS (read from the header)
=====================  ======  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shapcore.errors import InputError

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclass(frozen=True)
class Upload:
    """One multipart file field."""

    filename: str | None
    content_type: str | None
    data: bytes


# -- reading the request ------------------------------------------------------------------


class _PartCollector:
    """python-multipart callbacks that keep the parts named ``field`` in memory, bounded."""

    def __init__(self, field: str, max_files: int) -> None:
        self.field = field
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self.other_fields: list[str] = []
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._keep = False
        self._name = ""
        self._filename: str | None = None
        self._data = bytearray()
        self._open = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()
        self._keep = False
        self._open = True

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise InputError(400, "malformed_multipart", 'a multipart part has no Content-Disposition "name"')
        self._name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        self._keep = self._name == self.field
        if self._keep and len(self.uploads) >= self.max_files:
            raise InputError(
                422, "too_many_files", f"at most {self.max_files} '{self.field}' fields are accepted per request"
            )
        if not self._keep and len(self.other_fields) < 20:
            self.other_fields.append(self._name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._keep:
            content_type = self._headers.get(b"content-type")
            self.uploads.append(
                Upload(
                    filename=self._filename,
                    content_type=content_type.decode("latin-1") if content_type else None,
                    data=bytes(self._data),
                )
            )
        self._data = bytearray()
        self._open = False

    def on_end(self) -> None:
        self.ended = True


async def read_image_uploads(request: Request, *, max_bytes: int, max_files: int, field: str = "file") -> list[Upload]:
    """The ``field`` parts of a multipart/form-data request, in order, each non-empty.

    The body is parsed as it streams in and never held beyond ``max_bytes``: a declared
    Content-Length over the limit is refused before reading anything, and an undeclared
    (chunked) body as soon as the running count passes the limit.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    no_body = f"the request has no body: send an image in a multipart field '{field}'"
    length_header = request.headers.get("content-length")
    if length_header is None and "transfer-encoding" not in request.headers:
        raise InputError(400, "empty_body", no_body)  # HTTP/1.1: no length, not chunked -> no body
    if length_header is not None:
        try:
            declared = int(length_header)
        except ValueError:
            raise InputError(400, "malformed_multipart", "Content-Length is not a number") from None
        if declared == 0:
            raise InputError(400, "empty_body", no_body)
        if declared > max_bytes:
            raise InputError(413, "upload_too_large", f"the upload is {declared} bytes; the limit is {max_bytes} bytes")

    content_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise InputError(
            415,
            "unsupported_media_type",
            f"expected multipart/form-data with the image in a field named '{field}', "
            f"got {f'Content-Type {content_type!r}' if content_type else 'no Content-Type'}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError(400, "malformed_multipart", "the multipart Content-Type has no boundary")

    collector = _PartCollector(field, max_files)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except FormParserError as exc:
        raise InputError(400, "malformed_multipart", f"bad multipart boundary: {exc}") from None
    from starlette.requests import ClientDisconnect

    received = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > max_bytes:
                raise InputError(413, "upload_too_large", f"the upload is over the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {exc}") from None
    except ClientDisconnect:
        raise InputError(400, "malformed_multipart", "the client went away before the upload was complete") from None

    if received == 0:
        raise InputError(400, "empty_body", no_body)
    if not collector.ended:
        raise InputError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    if not collector.uploads:
        got = ", ".join(repr(name) for name in collector.other_fields) or "none"
        raise InputError(422, "missing_file", f"no multipart field named '{field}' (fields received: {got})")
    for i, upload in enumerate(collector.uploads):
        if not upload.data:
            raise InputError(422, "empty_file", f"{_describe(i, upload, len(collector.uploads))} is empty")
    return collector.uploads


def _describe(index: int, upload: Upload, count: int) -> str:
    name = f" ({upload.filename!r})" if upload.filename else ""
    return f"file #{index + 1}{name}" if count > 1 else f"the file{name}"
