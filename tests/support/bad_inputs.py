"""The bad-input corpus: hostile, broken and merely odd requests, each with the answer it must get.

Every entry is a :class:`BadInput`: a *generator* (``make(source) -> Request``) that builds the
request from one real CIFAR-10 JPEG (``source``), the expected HTTP status, the expected
``error.code`` (``None`` for a success) and a fragment of ``error.message`` that a person
would need to fix the request. Files are generated rather than committed: the corpus stays
a few kilobytes of code (the 50 MB upload is produced while it is sent), and each file says
how it is broken. ``tests/e2e/test_bad_input_corpus.py`` sends them all to one live service.

``kind`` groups entries that probe the same weakness (e.g. the eight EXIF orientations are one
kind); the corpus has well over 30 kinds (:func:`kinds`).

Decisions that are not obvious, recorded here so that the tests hold the service to them:

* Odd but valid images (1x1, 1x100000, 16-bit, CMYK, palette with transparency, animations,
  every EXIF orientation, an EXIF block that is garbage or names no orientation) answer 200.
  The EXIF orientations are stored as lossless PNGs so that, once turned upright, they must
  give the very predictions of the upright picture.
* Polyglots (a valid PNG with a zip archive appended, a valid JPEG with an HTML page
  appended) answer **200**: the decoder stops at the image's end marker, only decoded
  pixels reach the model, and the service never stores or serves the uploaded bytes back (an
  explanation keeps the decoded pixels; its heatmap is re-drawn from them). Refusing them
  would take a second parser per format and protect nothing.
* A file that *starts* like one of the accepted formats but whose header cannot be read is
  ``corrupt_image`` (422), not ``not_an_image`` (415): the message then says which format it
  looked like. SVG, PDF, HTML, plain text and ICO (an image format outside the list) are
  ``not_an_image`` (415) whatever their file name or part Content-Type claims.
* Decompression bombs are refused from the header (413 ``image_too_large``), before any
  pixel is decoded: by the service's own limit (MAX_IMAGE_PIXELS, 16 Mpx) for a 12000x12000
  PNG of ~0.2 MB, or by Pillow's hard limit for headers announcing billions of pixels.
* A form field the route does not declare is refused (422 ``unknown_field``, naming it and the
  route's fields), however large or many, as long as the whole body is under MAX_UPLOAD_BYTES;
  over it, 413 while streaming (the size is checked first).
* Explanation parameters exactly at their bounds are accepted (202); one step beyond is 422
  with a message naming the allowed range. They are form fields: given in the query string
  (where they would be silently ignored) they are refused with 422.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

MIB = 1024 * 1024
#: The service's defaults (tests/e2e/test_bad_input_corpus.py runs it with them).
MAX_UPLOAD_BYTES = 10 * MIB
MAX_IMAGE_PIXELS = 16_777_216
MAX_FILES = 16
BOUNDARY = "corpus7d1a9c"

# ---------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True)
class Request:
    """One HTTP request, as keyword arguments of ``httpx.Client.request``."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadInput:
    name: str
    kind: str
    make: Callable[[bytes], Request]
    status: int
    code: str | None = None
    text: str | None = None
    #: For 200s: the name of another entry whose top predictions this one must equal.
    same_as: str | None = None


def upload(
    data: bytes,
    filename: str = "image.png",
    mime: str = "image/png",
    *,
    path: str = "/predict",
    params: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
) -> Request:
    kwargs: dict[str, Any] = {"files": [("file", (filename, data, mime))]}
    if params:
        kwargs["params"] = params
    if fields:
        kwargs["data"] = fields
    return Request("POST", path, kwargs)


def raw(body: bytes | Iterator[bytes], content_type: str | None, *, path: str = "/predict") -> Request:
    headers = {"content-type": content_type} if content_type is not None else {}
    return Request("POST", path, {"content": body, "headers": headers})


def part(name: str | None, body: bytes, filename: str | None = None, mime: str | None = None) -> bytes:
    """One multipart part (headers and body, without the boundary line)."""
    disposition = "form-data"
    if name is not None:
        disposition += f'; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"Content-Disposition: {disposition}\r\n"
    if mime:
        head += f"Content-Type: {mime}\r\n"
    return head.encode() + b"\r\n" + body


def multipart(*parts: bytes, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    b = boundary.encode()
    out = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + b + b"--\r\n" if close else b"")


def multipart_request(body: bytes, *, boundary: str = BOUNDARY, path: str = "/predict") -> Request:
    return raw(body, f"multipart/form-data; boundary={boundary}", path=path)


# ---------------------------------------------------------------------------------------------
# images


def _save(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.cache
def picture(source: bytes) -> Image.Image:
    """The source JPEG, decoded (32x32 RGB)."""
    return Image.open(io.BytesIO(source)).convert("RGB")


def noise(size: int, seed: int = 7) -> Image.Image:
    """Random pixels: every format's compressed data then fills most of the file, so a cut lands in it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_from_parts(width: int, height: int, idat: bytes, *, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG file from its IHDR fields and (already compressed) IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@functools.cache
def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A black greyscale PNG: 144 Mpx (432 MB as RGB once decoded) in ~0.2 MB. Compressed row
    by row, so that building it never holds the decoded image either."""
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    data = png_from_parts(width, height, idat)
    assert len(data) < 1_000_000
    return data


def truncated(fmt: str, **kw: Any) -> bytes:
    data = _save(noise(64), fmt, **kw)
    return data[: int(len(data) * 0.6)]


def corrupt_png() -> bytes:
    """Chunk structure and checksums intact, but the IDAT payload is not a zlib stream."""
    junk = np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    return png_from_parts(64, 64, b"\x78\x9c" + junk, colour=2)


def corrupt_jpeg() -> bytes:
    """A JPEG whose Huffman tables (every DHT segment) are overwritten with 0xFF."""
    data = bytearray(_save(noise(64), "JPEG", quality=90))
    i = 2
    while i < len(data) - 4:
        if data[i] != 0xFF:
            break
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xC4:
            data[i + 4 : i + 2 + length] = b"\xff" * (length - 2)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        i += 2 + length
    return bytes(data)


def corrupt_webp() -> bytes:
    """A lossless WebP whose VP8L bitstream (after its 5-byte header) is overwritten with noise.
    (Lossy VP8 data is not checked: noise there decodes to noise.)"""
    data = bytearray(_save(noise(64), "WEBP", lossless=True))
    start = data.index(b"VP8L") + 8 + 5
    junk = np.random.default_rng(5).integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
    data[start:] = junk
    return bytes(data)


def corrupt_gif() -> bytes:
    """A GIF whose LZW minimum code size (the byte after the image descriptor) is 0x0F: impossible."""
    data = bytearray(_save(noise(32).convert("P"), "GIF"))
    at = data.index(b"\x2c")  # image separator: descriptor is 10 bytes, then local table (none), then LZW size
    flags = data[at + 9]
    local_table = 3 * (2 ** ((flags & 7) + 1)) if flags & 0x80 else 0
    data[at + 10 + local_table] = 0x0F
    return bytes(data)


def gif_huge_header() -> bytes:
    """A small GIF whose screen and image descriptor claim 65535x65535 pixels (the format's maximum)."""
    data = bytearray(_save(noise(16).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    at = data.index(b"\x2c")
    data[at + 5 : at + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def webp_huge_header() -> bytes:
    """A small lossless WebP whose VP8L header claims 16384x16384 pixels (the format's maximum)."""
    data = bytearray(_save(noise(16), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8  # chunk id, chunk size, then the 0x2F signature byte
    assert data[at] == 0x2F
    bits = struct.unpack("<I", bytes(data[at + 1 : at + 5]))[0]
    bits = (bits & ~((1 << 28) - 1)) | (16383 << 14) | 16383  # width-1 and height-1, 14 bits each
    data[at + 1 : at + 5] = struct.pack("<I", bits)
    return bytes(data)


def bmp_huge_header() -> bytes:
    """A small BMP whose header claims 5000x4000 pixels: under Pillow's own limit, over the service's."""
    data = bytearray(_save(noise(8), "BMP"))
    data[18:26] = struct.pack("<ii", 5000, 4000)
    return bytes(data)


def png_16bit_rgb(source: bytes) -> bytes:
    """16 bits per channel RGB (Pillow cannot write it: the PNG is assembled here)."""
    rgb16 = np.asarray(picture(source), dtype=np.uint16) * 257
    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    return png_from_parts(w, h, zlib.compress(rows), depth=16, colour=2)


def png_16bit_grey(source: bytes) -> bytes:
    grey = np.asarray(picture(source).convert("L"), dtype=np.uint16) * 257
    return _save(Image.fromarray(grey), "PNG")


def palette_with_transparency(source: bytes, fmt: str) -> bytes:
    pal = picture(source).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _save(pal, fmt, transparency=0)


def animated(source: bytes, fmt: str) -> bytes:
    src = picture(source)
    frames = [src.transpose(Image.Transpose.FLIP_LEFT_RIGHT), src.rotate(90)]
    kw: dict[str, Any] = {"save_all": True, "append_images": frames, "duration": 100, "loop": 0}
    if fmt == "WEBP":
        kw["lossless"] = True
    return _save(src, fmt, **kw)


#: EXIF orientation -> how the stored pixels relate to the upright picture (the inverse of
#: what a viewer applies: stored = INVERSE(upright)).
_STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def exif_oriented(source: bytes, orientation: int) -> bytes:
    """The upright picture stored turned as EXIF ``orientation`` says it is, as a lossless PNG
    (a value outside 1-8 names no transformation: stored upright)."""
    src = picture(source)
    method = _STORED_AS.get(orientation)
    stored = src.transpose(method) if method is not None else src
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(stored, "PNG", exif=exif)


def exif_garbage(source: bytes) -> bytes:
    """A JPEG with an APP1 "Exif" segment full of noise right after its start marker."""
    data = _save(picture(source), "JPEG", quality=95)
    payload = b"Exif\x00\x00MM\x00*" + bytes(range(256)) * 2
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app1 + data[2:]


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
    b'<rect width="32" height="32" fill="red"/><script>alert(1)</script></svg>\n'
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 32 32]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)
HTML = b"<!doctype html><html><body><script>fetch('/model/reload',{method:'POST'})</script></body></html>\n"


def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.sh", "#!/bin/sh\necho owned\n")
    return buf.getvalue()


def fifty_megabytes(chunk: int = MIB) -> Iterator[bytes]:
    """A 50 MiB multipart body, produced while it is sent (no Content-Length: chunked)."""
    yield (f"--{BOUNDARY}\r\n" + 'Content-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n').encode()
    yield b"\xff\xd8\xff\xe0"
    for _ in range(50):
        yield b"\x00" * chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


# ---------------------------------------------------------------------------------------------
# the corpus


def png_of(source: bytes) -> bytes:
    return _save(picture(source), "PNG")


def explain_picture(source: bytes) -> bytes:
    """The picture mirrored, as PNG: an image no other test submits, so that /explain's
    de-duplication (same bytes + parameters = same job) never hands back another test's job."""
    return _save(picture(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")


def explain(fields: dict[str, str] | None = None, params: dict[str, str] | None = None) -> Callable[[bytes], Request]:
    return lambda s: upload(explain_picture(s), "mirror.png", path="/explain", fields=fields, params=params)


def _cases() -> list[BadInput]:
    c: list[BadInput] = []

    def add(name: str, kind: str, make: Callable[[bytes], Request], status: int, code: str | None = None,
            text: str | None = None, same_as: str | None = None) -> None:  # fmt: skip
        c.append(BadInput(name, kind, make, status, code, text, same_as))

    corrupt = ("corrupt_image", "image is truncated or corrupt")
    # -- broken images ------------------------------------------------------------------------------
    add("truncated_jpeg", "truncated image", lambda s: upload(truncated("JPEG"), "t.jpg", "image/jpeg"), 422, *corrupt)
    add("truncated_png", "truncated image", lambda s: upload(truncated("PNG"), "t.png"), 422, *corrupt)
    add("truncated_webp", "truncated image", lambda s: upload(truncated("WEBP"), "t.webp", "image/webp"), 422,
        "corrupt_image", "WEBP image")
    add("truncated_gif", "truncated image", lambda s: upload(truncated("GIF"), "t.gif", "image/gif"), 422, *corrupt)
    add("corrupt_jpeg_huffman", "corrupt image data", lambda s: upload(corrupt_jpeg(), "c.jpg", "image/jpeg"), 422,
        *corrupt)
    add("corrupt_png_zlib", "corrupt image data", lambda s: upload(corrupt_png(), "c.png"), 422, *corrupt)
    add("corrupt_webp_bitstream", "corrupt image data", lambda s: upload(corrupt_webp(), "c.webp", "image/webp"),
        422, "corrupt_image", "WEBP image")
    add("corrupt_gif_lzw", "corrupt image data", lambda s: upload(corrupt_gif(), "c.gif", "image/gif"), 422,
        *corrupt)
    add("png_bad_header_crc", "corrupt header",
        lambda s: upload(png_of(s)[:29] + b"\x00\x00\x00\x00" + png_of(s)[33:], "crc.png"), 422, "corrupt_image",
        "looks like a PNG image but its header is corrupt")
    add("png_zero_width", "corrupt header",
        lambda s: upload(png_from_parts(0, 32, zlib.compress(b"")), "zero.png"), 422, "corrupt_image",
        "looks like a PNG")
    add("jpeg_markers_only", "corrupt header", lambda s: upload(b"\xff\xd8\xff\xd9", "empty.jpg", "image/jpeg"),
        422, "corrupt_image", "looks like a JPEG")
    # -- bombs: refused from the header, before decoding -------------------------------------------------
    add("png_bomb_12000x12000", "decompression bomb", lambda s: upload(png_bomb(), "bomb.png"), 413,
        "image_too_large", "12000x12000 = 144000000 pixels; the limit is 16777216")
    add("gif_header_65535x65535", "huge dimensions in a header",
        lambda s: upload(gif_huge_header(), "huge.gif", "image/gif"), 413, "image_too_large", "pixels")
    add("webp_header_16384x16384", "huge dimensions in a header",
        lambda s: upload(webp_huge_header(), "huge.webp", "image/webp"), 413, "image_too_large", "pixels")
    add("bmp_header_5000x4000", "huge dimensions in a header",
        lambda s: upload(bmp_huge_header(), "huge.bmp", "image/bmp"), 413, "image_too_large",
        "5000x4000 = 20000000 pixels")
    # -- odd but valid: 200 ----------------------------------------------------------------------------
    add("upright_png", "reference", lambda s: upload(png_of(s), "upright.png"), 200)
    add("one_by_one", "1x1", lambda s: upload(_save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "1x1.png"), 200)
    add("one_by_100000", "1x100000", lambda s: upload(_save(Image.new("L", (1, 100_000), 90), "PNG"), "tall.png"),
        200)
    add("100000_by_one", "1x100000", lambda s: upload(_save(Image.new("L", (100_000, 1), 90), "PNG"), "wide.png"),
        200)
    add("png_16bit_grey", "16-bit", lambda s: upload(png_16bit_grey(s), "grey16.png"), 200)
    add("png_16bit_rgb", "16-bit", lambda s: upload(png_16bit_rgb(s), "rgb16.png"), 200, same_as="upright_png")
    add("cmyk_jpeg", "CMYK", lambda s: upload(_save(picture(s).convert("CMYK"), "JPEG"), "cmyk.jpg", "image/jpeg"),
        200)
    add("palette_transparency_png", "palette with transparency",
        lambda s: upload(palette_with_transparency(s, "PNG"), "pal.png"), 200)
    add("palette_transparency_gif", "palette with transparency",
        lambda s: upload(palette_with_transparency(s, "GIF"), "pal.gif", "image/gif"), 200)
    add("animated_gif", "animated", lambda s: upload(animated(s, "GIF"), "anim.gif", "image/gif"), 200)
    add("animated_png", "animated", lambda s: upload(animated(s, "PNG"), "anim.png"), 200, same_as="upright_png")
    add("animated_webp", "animated", lambda s: upload(animated(s, "WEBP"), "anim.webp", "image/webp"), 200,
        same_as="upright_png")
    for o in range(1, 9):
        add(f"exif_orientation_{o}", "EXIF orientation", functools.partial(
            lambda s, o: upload(exif_oriented(s, o), f"exif{o}.png"), o=o), 200, same_as="upright_png")
    add("exif_orientation_99", "broken EXIF", lambda s: upload(exif_oriented(s, 99), "exif99.png"), 200,
        same_as="upright_png")
    add("exif_garbage", "broken EXIF", lambda s: upload(exif_garbage(s), "badexif.jpg", "image/jpeg"), 200)
    add("png_with_zip_appended", "polyglot", lambda s: upload(png_of(s) + zip_archive(), "poly.png"), 200,
        same_as="upright_png")
    add("jpeg_with_html_appended", "polyglot",
        lambda s: upload(s + HTML, "poly.jpg", "image/jpeg"), 200)
    # -- not images at all, whatever they claim ----------------------------------------------------------
    not_image = ("not_an_image", "is not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    add("svg_as_png", "SVG disguised as PNG", lambda s: upload(SVG, "logo.png"), 415, *not_image)
    add("pdf_as_png", "PDF disguised as PNG", lambda s: upload(PDF, "doc.png"), 415, *not_image)
    add("html_as_jpeg", "HTML disguised as JPEG", lambda s: upload(HTML, "page.jpg", "image/jpeg"), 415, *not_image)
    add("zip_as_png", "archive disguised as PNG", lambda s: upload(zip_archive(), "a.png"), 415, *not_image)
    add("ico_format", "image format not accepted", lambda s: upload(_save(picture(s), "ICO"), "a.ico",
                                                                      "image/x-icon"), 415, *not_image)  # fmt: skip
    add("zero_bytes", "zero bytes", lambda s: upload(b"", "empty.png"), 422, "empty_file", "is empty")
    # -- size: refused while streaming ---------------------------------------------------------------
    add("upload_50mb_declared", "50 MB upload",
        lambda s: upload(b"\xff\xd8\xff\xe0" + bytes(50 * MIB), "big.jpg", "image/jpeg"), 413, "upload_too_large",
        f"the limit is {MAX_UPLOAD_BYTES} bytes")
    add("upload_50mb_chunked", "50 MB upload", lambda s: multipart_request(fifty_megabytes()), 413,
        "upload_too_large", f"over the limit of {MAX_UPLOAD_BYTES} bytes")
    # -- forms -----------------------------------------------------------------------------------------
    add("field_named_image", "wrong field name",
        lambda s: Request("POST", "/predict", {"files": [("image", ("a.jpg", s, "image/jpeg"))]}), 422,
        "missing_file", "no multipart field named 'file' (fields received: 'image')")
    add("field_named_File", "wrong field name",
        lambda s: Request("POST", "/predict", {"files": [("File", ("a.jpg", s, "image/jpeg"))]}), 422,
        "missing_file", "'File'")
    add("too_many_files", "too many files",
        lambda s: Request("POST", "/predict", {"files": [("file", ("a.jpg", s, "image/jpeg"))] * (MAX_FILES + 1)}),
        422, "too_many_files", f"at most {MAX_FILES} 'file' fields")
    add("explain_two_files", "too many files",
        lambda s: Request("POST", "/explain", {"files": [("file", ("a.jpg", s, "image/jpeg"))] * 2}), 422,
        "too_many_files", "at most 1 'file' fields")
    add("huge_text_field", "huge form field",
        lambda s: upload(s, "a.jpg", "image/jpeg", fields={"comment": "x" * (8 * MIB)}), 422, "unknown_field",
        "unknown form field 'comment': this route takes file")
    add("text_field_over_limit", "huge form field",
        lambda s: upload(s, "a.jpg", "image/jpeg", fields={"comment": "x" * (MAX_UPLOAD_BYTES + 1)}), 413,
        "upload_too_large", "the limit is")
    add("explain_huge_segments_field", "huge form field",
        explain(fields={"segments": "9" * MIB}), 422, "invalid_parameter", "segments must be from 2 to 200")
    add("ten_thousand_fields", "many form fields",
        lambda s: multipart_request(multipart(*[part(f"f{i}", b"v") for i in range(10_000)],
                                              part("file", s, "a.jpg", "image/jpeg"))), 422,
        "unknown_field", "and 9995 more")  # fmt: skip
    add("explain_misspelt_parameter", "unknown form field", explain(fields={"segmetns": "20"}), 422, "unknown_field",
        "unknown form field 'segmetns': this route takes background, faithfulness, file, method, players, samples, "
        "seed, segments, target")
    add("huge_filename", "huge part headers",
        lambda s: multipart_request(multipart(part("file", s, "n" * MIB + ".jpg", "image/jpeg"))), 400,
        "malformed_multipart", "Maximum header size exceeded")
    add("json_body", "not multipart",
        lambda s: Request("POST", "/predict", {"json": {"file": "aGVsbG8="}}), 415, "unsupported_media_type",
        "expected multipart/form-data")
    add("urlencoded_body", "not multipart",
        lambda s: Request("POST", "/predict", {"data": {"file": "hello"}}), 415, "unsupported_media_type",
        "application/x-www-form-urlencoded")
    add("raw_jpeg_body", "wrong content type", lambda s: raw(s, "image/jpeg"), 415, "unsupported_media_type",
        "'image/jpeg'")
    add("multipart_as_text_plain", "wrong content type",
        lambda s: raw(multipart(part("file", s, "a.jpg", "image/jpeg")), "text/plain"), 415,
        "unsupported_media_type", "'text/plain'")
    add("multipart_mixed", "wrong content type",
        lambda s: raw(multipart(part("file", s, "a.jpg")), f"multipart/mixed; boundary={BOUNDARY}"), 415,
        "unsupported_media_type", "multipart/mixed")
    add("no_content_type", "wrong content type",
        lambda s: raw(multipart(part("file", s, "a.jpg")), None), 415, "unsupported_media_type",
        "got no Content-Type")
    add("missing_boundary", "missing boundary",
        lambda s: raw(multipart(part("file", s, "a.jpg")), "multipart/form-data"), 400, "malformed_multipart",
        "has no boundary")
    add("boundary_mismatch", "malformed multipart",
        lambda s: multipart_request(multipart(part("file", s, "a.jpg"), boundary="other"), boundary="corpus"),
        400, "malformed_multipart", "multipart")
    add("cut_before_closing_boundary", "malformed multipart",
        lambda s: multipart_request(multipart(part("file", s, "a.jpg"), close=False)), 400, "malformed_multipart",
        "ends before its closing boundary")
    add("part_without_name", "malformed multipart",
        lambda s: multipart_request(multipart(part(None, s, "a.jpg"))), 400, "malformed_multipart",
        'Content-Disposition header field "name"')
    add("empty_multipart", "malformed multipart",
        lambda s: multipart_request(f"--{BOUNDARY}--\r\n".encode()), 422, "missing_file", "fields received: none")
    add("empty_body", "empty body", lambda s: raw(b"", f"multipart/form-data; boundary={BOUNDARY}"), 400,
        "empty_body", "has no body")
    add("no_body", "empty body", lambda s: Request("POST", "/predict"), 400, "empty_body", "has no body")
    # -- query values ------------------------------------------------------------------------------------
    for value in ("0", "11", "-1", "abc", "3.5", "", "99999999999999999999999999", "%00"):
        add(f"top_k={value or 'empty'}", "bad query value",
            lambda s, v=value: Request("POST", f"/predict?top_k={v}", {"files": [("file", ("a.jpg", s, "jpeg"))]}),
            422, "invalid_parameter", "top_k")  # fmt: skip
    add("top_k=10", "query value at its bound",
        lambda s: upload(s, "a.jpg", "image/jpeg", params={"top_k": "10"}), 200)
    add("unknown_query_parameter", "unknown parameter",
        lambda s: upload(s, "a.jpg", "image/jpeg", params={"topk": "5", "debug": "1"}), 200)
    add("get_predict", "wrong method", lambda s: Request("GET", "/predict"), 405, "method_not_allowed")
    add("put_explain", "wrong method", lambda s: Request("PUT", "/explain", {"content": s}), 405,
        "method_not_allowed")
    add("unknown_route", "unknown route", lambda s: Request("POST", "/predict/../../etc/passwd"), 404, "not_found")
    add("explain_job_not_a_uuid", "unknown job id", lambda s: Request("GET", "/explain/..%2f..%2fkeys"), 404,
        "not_found")
    add("explain_job_unknown", "unknown job id",
        lambda s: Request("GET", "/explain/00000000-0000-4000-8000-000000000000/heatmap.png",
                          {"params": {"classes": "zebra"}}), 404, "not_found", "no explanation job")  # fmt: skip
    # -- explanation parameters: at their bounds (202), beyond (422, naming the range) -----------------
    at_bound = {
        "segments": ("2", "200"),
        "samples": ("20", "20000"),
        "background": ("1", "100"),  # 100 x the default cap of 5000 samples = the 500000 evaluation limit
        "seed": ("0", str(2**32 - 1)),
        "target": ("0", "9", "TRUCK"),
    }
    for name, values in at_bound.items():
        for value in values:
            # the least samples need the fewest segments (at least 4 per segment: 20 for 5)
            fields = {name: value, "segments": "5"} if (name, value) == ("samples", "20") else {name: value}
            add(f"explain_{name}={value}", "explain parameter at its bound", explain(fields=fields), 202)
    add("explain_samples=auto", "explain parameter among its choices", explain(fields={"samples": "auto"}), 202)
    choices = ("kernel", "adjusted", "partition", "gradcam", "integrated_gradients", "blur", "train:100", "kmeans:5")
    for value in choices:
        name = "background" if value in ("blur", "train:100", "kmeans:5") else "method"
        add(f"explain_{name}={value}", "explain parameter among its choices", explain(fields={name: value}), 202)
    add("explain_method=lime", "explain parameter not among its choices", explain(fields={"method": "lime"}), 422,
        "invalid_parameter",
        "method must be one of kernel, leverage, adjusted, partition, gradcam, integrated_gradients")
    add("explain_method=fast_without_explainer", "the amortised explainer asked of a version that has none",
        explain(fields={"method": "fast"}), 409, "no_explainer", "python -m training fit-explainer")
    add("explain_players=hexagons", "explain parameter not among its choices", explain(fields={"players": "hex"}),
        422, "invalid_parameter", "players must be one of slic, grid")
    add("explain_background=sky", "explain parameter not among its choices", explain(fields={"background": "sky"}),
        422, "invalid_parameter", "background must be one of mean, blur, train:K or kmeans:K")
    add("explain_samples_under_the_floor", "explain parameters under their joint floor",
        explain(fields={"segments": "50", "samples": "199"}), 422, "invalid_parameter",
        "adjusted needs at least 200 (4 x segments")
    add("explain_segments=2_in_query", "explain parameter in the query string", explain(params={"segments": "2"}),
        422, "invalid_parameter", "segments in the query string: send the explanation parameters as multipart")
    beyond = {
        "segments": (("1", "201"), "segments must be from 2 to 200"),
        "samples": (("19", "20001"), "samples must be from 20 to 20000"),
        "background": (("0", "101"), "background must be from 1 to 100"),
        "seed": (("-1", str(2**32)), f"seed must be from 0 to {2**32 - 1}"),
    }
    for name, (values, text) in beyond.items():
        for value in values:
            add(f"explain_{name}={value}", "explain parameter beyond its bound", explain(fields={name: value}), 422,
                "invalid_parameter", text)
    for value in ("-1", "10"):
        add(f"explain_target={value}", "explain parameter beyond its bound", explain(fields={"target": value}), 422,
            "invalid_parameter", "or an index from 0 to 9")
    add("explain_target=zebra", "explain parameter beyond its bound", explain(fields={"target": "zebra"}), 422,
        "invalid_parameter", "unknown target class 'zebra'")
    for value in ("abc", "2.5", "1e3", " "):
        add(f"explain_segments={value!r}", "explain parameter not a number", explain(fields={"segments": value}),
            422, "invalid_parameter", "segments must be an integer from 2 to 200")
    # int() and str.isdigit() alone take these; "²".isdigit() is True but int("²") raises (was a 500).
    for value in ("1_0", "+5", "\u0663", "\u00b2", "9" * 5000):
        add(f"explain_segments={value[:12]!r}", "explain parameter in an odd notation",
            explain(fields={"segments": value}), 422, "invalid_parameter", "segments must be")
    for value in ("\u00b2", "--5", "9" * 5000):
        add(f"explain_target={value[:12]!r}", "explain parameter in an odd notation",
            explain(fields={"target": value}), 422, "invalid_parameter", "unknown target class")
    add("explain_samples=abc", "explain parameter not a number", explain(fields={"samples": "abc"}), 422,
        "invalid_parameter", "samples must be auto or an integer from 20 to 20000")
    add("explain_evaluations_over_limit", "explain parameters over their joint limit",
        explain(fields={"samples": "20000", "background": "26"}), 422, "invalid_parameter",
        "20000 x 26 = 520000 model evaluations, over the limit of 500000")
    add("explain_query_and_form_disagree", "explain parameter in the query string",
        explain(fields={"seed": "1"}, params={"seed": "2"}), 422, "invalid_parameter", "seed in the query string")
    add("explain_not_an_image", "SVG disguised as PNG", lambda s: upload(SVG, "x.png", path="/explain"), 415,
        *not_image)
    add("explain_png_bomb", "decompression bomb", lambda s: upload(png_bomb(), "bomb.png", path="/explain"), 413,
        "image_too_large", "the limit is 16777216 pixels")
    add("explain_truncated", "truncated image",
        lambda s: upload(truncated("PNG"), "t.png", path="/explain"), 422, *corrupt)
    return c


CORPUS: list[BadInput] = _cases()
assert len({case.name for case in CORPUS}) == len(CORPUS), "corpus names must be unique"


def kinds() -> set[str]:
    return {case.kind for case in CORPUS}
