"""service.uploads in-process: every odd mode/format converts to what the model expects,
and bad images are refused with the right status and code (no server needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shapcore.errors import InputError
from shapcore.images import ALLOWED_FORMATS, BACKGROUND_RGB, decode_image, image_to_tensor, to_rgb
from shapcore.model import to_source_size

LIMIT = 16_777_216


def png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(cat_rgb: Image.Image) -> Image.Image:
    return cat_rgb


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_every_odd_format_gives_a_32px_rgb_tensor(odd_images):
    for name, (_, data, _) in odd_images.items():
        tensor = image_to_tensor(data, LIMIT)
        assert tensor.shape == (3, 32, 32), name
        assert tensor.dtype == torch.uint8, name


def test_plain_jpeg_matches_the_training_preparation(cifar_jpeg, src):
    assert torch.equal(image_to_tensor(cifar_jpeg, LIMIT), to_source_size(src))


def test_greyscale_and_16bit_greyscale_agree(odd_images, src):
    expected = to_source_size(src.convert("L"))
    grey = image_to_tensor(odd_images["greyscale_png"][1], LIMIT)
    grey16 = image_to_tensor(odd_images["16bit_png"][1], LIMIT)
    assert Image.open(io.BytesIO(odd_images["16bit_png"][1])).mode.startswith("I")
    assert torch.equal(grey, expected)
    assert torch.equal(grey16, expected)  # scaled by 1/257, not clipped to white
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_16bit_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.min() == 0 and rgb.max() == 255
    assert 100 < rgb.mean() < 155  # a plain convert("RGB") would be almost all white


def test_32bit_integer_and_float_modes():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.int32)
    tiff_i = png(Image.fromarray(ramp, "I"), "TIFF")
    assert Image.open(io.BytesIO(tiff_i)).mode == "I"
    t = image_to_tensor(tiff_i, LIMIT)
    assert int(t.max()) == 255 and int(t.min()) == 0
    floats = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    tiff_f = png(Image.fromarray(floats, "F"), "TIFF")
    t = image_to_tensor(tiff_f, LIMIT)
    assert int(t.max()) == 255 and int(t.min()) == 0


def test_rgba_is_composited_on_the_background(src):
    rgba = src.convert("RGBA")
    opaque = image_to_tensor(png(rgba), LIMIT)
    assert torch.equal(opaque, to_source_size(src))
    clear = np.asarray(rgba).copy()
    clear[..., 3] = 0
    t = image_to_tensor(png(Image.fromarray(clear, "RGBA")), LIMIT)
    assert torch.equal(t, torch.tensor(BACKGROUND_RGB, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    half = clear.copy()
    half[..., 3] = 128
    t = image_to_tensor(png(Image.fromarray(half, "RGBA")), LIMIT)
    expected = (np.asarray(src, dtype=np.float32) * 128 + 255 * 127) / 255
    assert mean_abs(t, torch.from_numpy(expected).permute(2, 0, 1)) < 1.5


def test_palette_transparency_is_composited():
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.paste(1, (0, 0, 16, 32))
    data = png(image, transparency=0)
    t = image_to_tensor(data, LIMIT)
    assert t[:, :, 20:].eq(255).all()  # transparent black -> white background
    assert t[0, :, :12].float().mean() > 190  # opaque red stays red


def test_cmyk_jpeg_converts_to_rgb(odd_images, src):
    t = image_to_tensor(odd_images["cmyk_jpeg"][1], LIMIT)
    assert mean_abs(t, to_source_size(src)) < 12


def test_animated_gif_uses_the_first_frame(odd_images):
    data = odd_images["animated_gif"][1]
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 2
    first = to_source_size(gif.convert("RGB"))
    gif.seek(1)
    second = to_source_size(gif.convert("RGB"))
    t = image_to_tensor(data, LIMIT)
    assert torch.equal(t, first)
    assert not torch.equal(t, second)


def test_exif_orientation_is_applied(odd_images, src):
    data = odd_images["exif_rotated_jpeg"][1]
    assert Image.open(io.BytesIO(data)).size == (32, 48)  # stored sideways
    upright = decode_image(data, LIMIT)
    assert upright.size == (48, 32)
    expected = to_source_size(src.resize((48, 32)))
    assert mean_abs(to_source_size(upright), expected) < 12
    assert mean_abs(to_source_size(upright.transpose(Image.Transpose.ROTATE_90)), expected) > 12


def test_large_jpeg_uses_reduced_decoding_without_visible_change(src):
    big = src.resize((2048, 1536), Image.Resampling.BICUBIC)
    data = png(big, "JPEG", quality=92)
    reference = to_source_size(Image.open(io.BytesIO(data)).convert("RGB"))
    assert mean_abs(image_to_tensor(data, LIMIT), reference) < 2.0


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: b"this is not an image at all", 415, "not_an_image"),
        (lambda: b"%PDF-1.4\n" + b"0" * 100, 415, "not_an_image"),
        (lambda: png(Image.new("RGB", (16, 16)), "ICO"), 415, "not_an_image"),
        (lambda: b"", 422, "empty_file"),
        (lambda: png(Image.new("L", (12000, 12000))), 413, "image_too_large"),
    ],
    ids=["text", "pdf", "ico", "empty", "bomb"],
)
def test_refusals(make, status, code):
    with pytest.raises(InputError) as info:
        image_to_tensor(make(), LIMIT)
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_images_are_refused(src, fmt):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = png(noise, fmt)
    with pytest.raises(InputError) as info:
        image_to_tensor(data[: len(data) * 2 // 3], LIMIT)
    assert info.value.status == 422 and info.value.code == "corrupt_image", info.value.message


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    """The bomb is refused from its header: Pillow never loads (decodes) its pixels. A spy on
    Pillow's ``load`` records every decode and refuses to decode anything over the limit."""
    from PIL import ImageFile

    decoded: list[tuple[int, int]] = []

    def spy(real):
        def load(self):
            decoded.append(self.size)
            if self.size[0] * self.size[1] > LIMIT:
                raise AssertionError(f"{self.size[0]}x{self.size[1]} decoded before the pixel limit was checked")
            return real(self)

        return load

    bomb = png(Image.new("L", (12000, 12000)))
    assert len(bomb) < 1_000_000  # small on the wire, 144 Mpx (432 MB as RGB) once decoded
    fits, one_row_over = png(Image.new("L", (100, 100))), png(Image.new("L", (100, 101)))
    monkeypatch.setattr(Image.Image, "load", spy(Image.Image.load))
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy(ImageFile.ImageFile.load))
    with pytest.raises(InputError) as info:
        image_to_tensor(bomb, LIMIT)
    assert info.value.status == 413 and info.value.code == "image_too_large"
    assert "12000x12000" in info.value.message
    assert decoded == [], f"decoded before the refusal: {decoded}"
    assert image_to_tensor(fits, 100 * 100).shape == (3, 32, 32)
    assert (100, 100) in decoded  # the spy sees the decodes that do happen
    decoded.clear()
    with pytest.raises(InputError):
        image_to_tensor(one_row_over, 100 * 100)
    assert decoded == []


def test_allowed_formats_are_known_to_pillow():
    Image.init()
    assert set(ALLOWED_FORMATS) <= set(Image.OPEN)
