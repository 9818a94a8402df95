"""The one image decoder: bytes of an uploaded or stored image -> the model's input.

Used by the API (every upload, and :func:`explanation_input`, the one decode of an image to
explain: the worker receives its pixels, never bytes) and training (every image of a folder
or archive), so that the model trains on the very pixels it serves.
Format sniffing, a pixel limit checked from the header before decoding, EXIF orientation,
transparency onto white, 16-bit scaling. Every refusal is an :class:`InputError`:

=====================  ======  ==================================================================
code                   status  meaning
=====================  ======  ==================================================================
empty_file             422     zero bytes
not_an_image           415     the bytes are not a PNG, JPEG, WebP, GIF, BMP or TIFF image
corrupt_image          422     the image is truncated or its data is corrupt, or the file starts
                               like an accepted format but its header cannot be read
image_too_large        413     width x height over ``max_pixels`` (read from the header)
=====================  ======  ==================================================================

``image_to_tensor`` (and ``decode_image``) block on Pillow: run them off the event loop.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shapcore.errors import InputError
from shapcore.model import SOURCE_SIZE, to_source_size

if TYPE_CHECKING:
    import torch

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


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` reduced (bicubic, no reducing gap) until its longer side is at most ``max_side``.

    The one reduction before SLIC: the API applies it to the upload it validated, and
    ``worker.segmentation.segment`` to whatever it is given, so both produce the same pixels.
    """
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


def explanation_input(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of one upload -> what an explanation job needs, decoded once (by the API).

    Returns the upright RGB pixels reduced by :func:`fit_within` (uint8, H x W x 3: what SLIC
    segments and the heatmap shows) and the model input made from the *full-size* picture
    (uint8, 3 x 32 x 32: what /predict would feed the model), so the worker explains exactly
    what a decode of the original bytes would have given it.
    """
    image = decode_image(data, max_pixels)
    model_input = to_source_size(image).numpy()
    return np.asarray(fit_within(image, max_side), dtype=np.uint8), model_input


def image_to_tensor(data: bytes, max_pixels: int) -> torch.Tensor:
    """Bytes of one image -> uint8 tensor (3, SOURCE_SIZE, SOURCE_SIZE), as the model was trained on."""
    image = decode_image(data, max_pixels)
    try:
        return to_source_size(image)
    except _DECODE_ERRORS as exc:  # pragma: no cover - decode_image already loaded the pixels
        raise InputError(422, "corrupt_image", f"the image cannot be converted: {exc}") from None
