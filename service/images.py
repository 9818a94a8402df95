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

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from training.model import SOURCE_SIZE, to_source_size

if TYPE_CHECKING:
    import torch
    from starlette.requests import Request

#: Pillow plugins tried on an upload, nothing else (the JPEG one also opens cameras' multi-picture MPO files).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
#: Transparent pixels are composited onto this colour.
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)
#: Large JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale, never below this size, before
#: the antialiased reduction to SOURCE_SIZE: ~8-64x less decoding work, no visible change at 32 px.
JPEG_DRAFT_SIZE = 8 * SOURCE_SIZE

# We enforce our own (lower) pixel limit before decoding, so Pillow's warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)


class InputError(Exception):
    """A refused input: ``status`` (HTTP), ``code`` (stable, for clients and metrics), ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"InputError({self.status}, {self.code!r}, {self.message!r})"


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


# -- decoding -------------------------------------------------------------------------------


#: Leading bytes of the accepted formats (Pillow's format names), to tell a damaged image from another kind of file.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, fmt in _SIGNATURES:
        if data.startswith(signature):
            return fmt
    return None


def _open_problem(data: bytes, fmt: str) -> str:
    """Why Pillow's ``fmt`` plugin refuses the header (Image.open only says it cannot identify the file)."""
    Image.init()
    try:
        Image.OPEN[fmt][0](io.BytesIO(data))
    except Exception as exc:  # the reason is all we want from it
        return str(exc) or type(exc).__name__
    return "unreadable header"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read the header only: nothing is decoded yet.

    Refuses non-images and formats other than :data:`ALLOWED_FORMATS` (415), and images
    whose header announces more than ``max_pixels`` pixels (413): a 12000x12000 PNG of a
    few hundred kilobytes would take 432 MB once decoded.
    """
    if not data:
        raise InputError(422, "empty_file", "the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        looks_like = sniff_format(data)
        if looks_like is not None:  # a damaged image of an accepted format, not a file of another kind
            problem = _open_problem(data, looks_like)
            raise InputError(
                422, "corrupt_image", f"the file looks like a {looks_like} image but its header is corrupt: {problem}"
            ) from None
        raise InputError(415, "not_an_image", f"the file is not a {FORMAT_NAMES} image") from None
    except Image.DecompressionBombError as exc:
        raise InputError(413, "image_too_large", str(exc)) from None
    except _DECODE_ERRORS as exc:
        looks_like = sniff_format(data) or "image"
        raise InputError(422, "corrupt_image", f"the {looks_like} image's header is corrupt: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(422, "corrupt_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            413,
            "image_too_large",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
        )
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of one image -> an upright 8-bit RGB PIL image (first frame of animations).

    Handles EXIF orientation, greyscale and bilevel, palettes (with transparency), RGBA/LA
    (composited on :data:`BACKGROUND_RGB`), 16-bit and 32-bit integer greyscale ('I;16*',
    'I', scaled to 8 bits rather than clipped), float 'F', CMYK and YCbCr/LAB.
    """
    image = open_image(data, max_pixels)
    fmt = image.format or "image"
    try:
        # A freshly opened animation or multi-page TIFF is on its first frame: never seek (counting
        # the frames of a GIF means walking the whole file).
        if image.format in ("JPEG", "MPO"):
            image.draft(None, (JPEG_DRAFT_SIZE, JPEG_DRAFT_SIZE))
        image.load()
        image = _upright(image)
        return to_rgb(image)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(413, "image_too_large", str(exc)) from None
    except _DECODE_ERRORS as exc:
        raise InputError(422, "corrupt_image", f"the {fmt} image is truncated or corrupt: {exc}") from None
    except MemoryError:
        raise InputError(413, "image_too_large", "the image is too large to decode") from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block must not cost the whole image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, where a plain ``convert("RGB")`` would be wrong."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data spans 0..65535: scale it down (convert() would clip everything over 255 to white).
        arr = np.asarray(image).astype(np.float32)
        top = float(arr.max()) if arr.size else 0.0
        # 'I' (32-bit) usually holds 16-bit data too; rescale by its maximum only if it holds more.
        scaled = arr * (255.0 / top) if mode == "I" and top > 65535.0 else arr / 257.0
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float32))
        if arr.size and float(arr.max()) <= 1.0 and float(arr.min()) >= 0.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")  # L, P, CMYK (Adobe-inverted CMYK is undone on load), YCbCr, LAB, HSV


def image_to_tensor(data: bytes, max_pixels: int) -> torch.Tensor:
    """Bytes of one image -> uint8 tensor (3, SOURCE_SIZE, SOURCE_SIZE), as the model was trained on."""
    image = decode_image(data, max_pixels)
    try:
        return to_source_size(image)
    except _DECODE_ERRORS as exc:  # pragma: no cover - decode_image already loaded the pixels
        raise InputError(422, "corrupt_image", f"the image cannot be converted: {exc}") from None
