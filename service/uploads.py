"""Image uploads: the multipart body checked and parsed before a route's ``File`` parameters.

Routes declare their upload with FastAPI's ``File``/``Form`` (so OpenAPI is generated) on a
router whose ``route_class`` is :class:`UploadRoute`. Before FastAPI reads those parameters,
:func:`read_form` checks the headers, counts the body's bytes as they stream in (over
MAX_UPLOAD_BYTES: 413 before the rest is read; a declared Content-Length over it: 413 before
anything is read) and parses it with Starlette's ``Request.form`` (python-multipart); FastAPI
then reuses that parsed form. Decoding is :mod:`shapcore.images` (``image_to_tensor`` and
``decode_image`` block on Pillow: run them off the event loop).

Every refusal is an :class:`InputError` carrying an HTTP status, a stable machine-readable
``code`` (also the ``reason`` label of ``shapserve_rejected_inputs_total``) and a human message.

Codes and statuses:

=====================  ======  ==================================================================
code                   status  meaning
=====================  ======  ==================================================================
empty_body             400     the request has no body
malformed_multipart    400     not parseable as multipart/form-data (no boundary, cut short, ...)
unsupported_media_type 415     the request is not multipart/form-data
missing_file           422     no multipart field named ``file``
empty_file             422     a ``file`` field holds zero bytes
                               (missing_file also: a ``file`` part sent as text, without a filename)
too_many_files         422     more ``file`` fields than MAX_FILES_PER_REQUEST
unknown_field          422     a form field the route does not declare (e.g. a misspelt parameter)
upload_too_large       413     the body is over MAX_UPLOAD_BYTES (refused while streaming)
not_an_image           415     the bytes are not a PNG, JPEG, WebP, GIF, BMP or TIFF image
corrupt_image          422     the image is truncated or its data is corrupt, or the file starts
                               like an accepted format but its header cannot be read
image_too_large        413     width x height over MAX_IMAGE_PIXELS (read from the header)
=====================  ======  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive

from shapcore.errors import InputError

#: The multipart field that holds the image(s).
FIELD = "file"


@dataclass(frozen=True)
class Upload:
    """One multipart file field, read."""

    filename: str | None
    content_type: str | None
    data: bytes


async def read_upload(file: UploadFile) -> Upload:
    return Upload(filename=file.filename, content_type=file.content_type, data=await file.read())


#: For ``File(json_schema_extra=...)``: FastAPI's OpenAPI 3.1 marks uploads with ``contentMediaType``
#: only; ``format: binary`` as well tells generated clients and fuzzers to send bytes, not text.
BINARY = {"format": "binary"}
BINARY_ITEMS = {"items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}}


def too_many_files(limit: int) -> InputError:
    return InputError(422, "too_many_files", f"at most {limit} '{FIELD}' fields are accepted per request")


class UploadRoute(APIRoute):
    """An APIRoute that runs :func:`read_form` before FastAPI reads its ``File``/``Form`` parameters.

    Routes without a form body (GET routes of the same router) are left as they are.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None or not isinstance(self.body_field.field_info, params.Form):
            return handler
        # Every File/Form parameter, those of sub-dependencies included.
        declared = frozenset(_form_fields(self.dependant)) | {FIELD}

        async def parse_first(request: Request) -> Response:
            settings = request.app.state.settings
            parsed = await read_form(
                request, max_bytes=settings.max_upload_bytes, max_files=settings.max_files_per_request, fields=declared
            )
            return await handler(parsed)

        return parse_first


def _form_fields(dependant: Any) -> list[str]:
    """The names of a route's File/Form parameters, those of its sub-dependencies included."""
    names = [field.alias for field in dependant.body_params]
    for sub in dependant.dependencies:
        names += _form_fields(sub)
    return names


class _BodyGuard:
    """``receive`` that counts the body's bytes (413 past ``max_bytes``) and watches for the closing boundary."""

    def __init__(self, receive: Receive, max_bytes: int, boundary: bytes) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        self.received = 0
        self.closed = False
        self._closing = b"--" + boundary + b"--"
        self._tail = b""

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise InputError(413, "upload_too_large", f"the upload is over the limit of {self.max_bytes} bytes")
            if not self.closed and chunk:
                window = self._tail + chunk
                self.closed = self._closing in window
                self._tail = window[-(len(self._closing) - 1) :]
        return message


def _check_headers(request: Request, max_bytes: int) -> bytes:
    """Refusals decided from the headers alone, before any byte of the body is read; the boundary."""
    from python_multipart.multipart import parse_options_header

    no_body = f"the request has no body: send an image in a multipart field '{FIELD}'"
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
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise InputError(
            415,
            "unsupported_media_type",
            f"expected multipart/form-data with the image in a field named '{FIELD}', "
            f"got {f'Content-Type {content_type!r}' if content_type else 'no Content-Type'}",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InputError(400, "malformed_multipart", "the multipart Content-Type has no boundary")
    return boundary


def _parse_error(exc: BaseException, max_files: int) -> InputError:
    """Starlette's refusal of a body (a 400 wrapping python-multipart's reason) as an InputError."""
    detail = str(getattr(exc, "detail", "") or exc)
    if detail.startswith("Too many files"):
        return too_many_files(max_files)
    cause = exc.__context__ if isinstance(exc, HTTPException) else exc
    reason = getattr(cause, "__cause__", None)  # python-multipart's own message, when it has one
    return InputError(400, "malformed_multipart", f"the multipart body cannot be parsed: {reason or detail}")


async def read_form(request: Request, *, max_bytes: int, max_files: int, fields: frozenset[str]) -> Request:
    """Check and parse a multipart upload; returns the request to hand on (its form parsed).

    The whole body must be under ``max_bytes``. At least one ``file`` part must be present,
    each a non-empty file; more than ``max_files`` file parts: 422. A field the route does not
    declare (``fields``: its ``File``/``Form`` parameters) is refused (422 ``unknown_field``):
    a misspelt ``segmetns`` would otherwise be ignored without a word.
    """
    boundary = _check_headers(request, max_bytes)
    guard = _BodyGuard(request.receive, max_bytes, boundary)
    guarded = Request(request.scope, guard.receive)
    try:
        form = await guarded.form(max_files=max_files, max_fields=math.inf, max_part_size=max_bytes)
    except HTTPException as exc:  # Starlette's MultiPartException, raised as a 400 inside an app
        raise _parse_error(exc, max_files) from None
    except ClientDisconnect:
        raise InputError(400, "malformed_multipart", "the client went away before the upload was complete") from None
    try:
        _check_files(form, guard)
        _check_declared(form, fields)
    except InputError:
        await form.close()
        raise
    return guarded


def _check_declared(form: FormData, fields: frozenset[str]) -> None:
    unknown = [name for name in dict.fromkeys(form.keys()) if name not in fields]
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        if len(unknown) > 5:
            shown += f" and {len(unknown) - 5} more"
        takes = ", ".join(sorted(fields))
        raise InputError(422, "unknown_field", f"unknown form field {shown}: this route takes {takes}")


def _check_files(form: FormData, guard: _BodyGuard) -> None:
    if guard.received == 0:
        raise InputError(400, "empty_body", f"the request has no body: send an image in a multipart field '{FIELD}'")
    if not guard.closed:
        raise InputError(400, "malformed_multipart", "the multipart body ends before its closing boundary")
    files: list[Any] = form.getlist(FIELD)
    if not files:
        got = ", ".join(repr(name) for name in list(dict.fromkeys(form.keys()))[:20]) or "none"
        raise InputError(422, "missing_file", f"no multipart field named '{FIELD}' (fields received: {got})")
    for i, file in enumerate(files):
        if isinstance(file, str):
            raise InputError(
                422,
                "missing_file",
                f"the multipart field '{FIELD}' holds text, not a file: send the image as a file part "
                "(with a filename, as curl -F file=@cat.jpg does)",
            )
        if not file.size:
            name = f" ({file.filename!r})" if file.filename else ""
            raise InputError(422, "empty_file", f"{f'file #{i + 1}' if len(files) > 1 else 'the file'}{name} is empty")
