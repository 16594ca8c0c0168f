"""decode_image: the safe door for untrusted image bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mmsent import ImageDecodeError, decode_image


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels; the pixel data compresses to almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (3 * width)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(min(height, 64))) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("size", [(100_000, 100_000), (50_000, 10), (4_000, 4_000)])
def test_decompression_bomb_refused_from_header_without_decoding(
    no_pixel_decoding: None, size: tuple[int, int]
) -> None:
    data = _png_bomb(*size)
    assert len(data) < 200_000  # tiny on the wire
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=10_000_000, max_side=20_000 if size != (50_000, 10) else 10_000)
    assert err.value.reason == "too_large"
    assert isinstance(err.value, ValueError)


def test_bomb_just_under_limits_decodes() -> None:
    im = decode_image(_png_bomb(300, 200), max_pixels=60_000, max_side=300)
    assert im.size == (300, 200) and im.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"%PDF-1.7 not an image", "unsupported_format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported_format"),
        (b"\xff\xd8\xff\xe0" + b"garbage" * 10, "corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "corrupt"),
    ],
)
def test_rejects_non_images(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=10**7, max_side=10**4)
    assert err.value.reason in (reason, "truncated" if reason == "corrupt" else reason)


def test_tiff_is_not_accepted_even_though_pil_reads_it() -> None:
    data = _encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageDecodeError, match="unsupported_format"):
        decode_image(data, max_pixels=10**6, max_side=1000)


def test_truncated_jpeg() -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2], max_pixels=10**6, max_side=1000)
    assert err.value.reason == "truncated"


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = _encode(Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK"), "JPEG", quality=95)
    im = decode_image(data, max_pixels=10**6, max_side=1000)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.full((8, 8), 40_000, dtype=np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    im = decode_image(data, max_pixels=10**6, max_side=1000)
    assert im.mode == "RGB"
    v = im.getpixel((0, 0))[0]  # type: ignore[index]
    assert 140 <= v <= 170  # 40000 / 65535 * 255 = 155.6, not clipped to 255


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    im = decode_image(buf.getvalue(), max_pixels=10**6, max_side=1000)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((5, 5))  # type: ignore[misc]
    assert r > 200 and g < 50 and b < 50


def test_exif_orientation_applied() -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(im, "JPEG", exif=exif.tobytes())
    out = decode_image(data, max_pixels=10**6, max_side=1000)
    assert out.size == (20, 40)


def test_palette_with_transparency_and_rgba_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = decode_image(_encode(rgba, "PNG"), max_pixels=10**6, max_side=1000)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    out = decode_image(_encode(pal, "PNG", transparency=0), max_pixels=10**6, max_side=1000)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "JPEG"])
def test_accepted_formats_round_trip(fmt: str) -> None:
    src = Image.new("RGB", (12, 9), (10, 200, 30))
    out = decode_image(_encode(src, fmt), max_pixels=10**6, max_side=1000)
    assert out.size == (12, 9) and out.mode == "RGB"
    g = out.getpixel((6, 4))[1]  # type: ignore[index]
    assert g > 150


def test_grayscale_and_bilevel() -> None:
    for mode in ("L", "1"):
        out = decode_image(
            _encode(Image.new(mode, (5, 5), 1 if mode == "1" else 128), "PNG"), max_pixels=100, max_side=5
        )
        assert out.mode == "RGB"


# -- the batched decoder (mmsent/serving/gpudecode.py), on the CPU here: torchvision's JPEG decoder, then the same fit


def _photo(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)  # smooth, like a photo, not noise


def test_batched_decode_gives_the_pixels_of_the_safe_decoder() -> None:
    from mmsent.imaging import ImagePreprocess
    from mmsent.serving.gpudecode import decode_batch

    pre = ImagePreprocess(size=64, resize=72, crop=False)
    images = [_photo(0), _photo(1, (200, 300)), _photo(2, (97, 61))]
    datas = [_encode(images[0], "JPEG", quality=92), _encode(images[1], "PNG"), _encode(images[2], "WEBP")]
    pixels, reasons = decode_batch(datas, pre, "cpu")
    expected = pre.batch([decode_image(d) for d in datas])
    assert reasons == [None, None, None] and pixels.shape == expected.shape == (3, 3, 64, 64)
    assert torch.equal(pixels[1:], expected[1:])  # PNG and WebP: the safe CPU decoder itself
    assert (pixels[0] - expected[0]).abs().mean() < 0.02  # JPEG: torchvision's libjpeg against Pillow's


def test_batched_decode_refuses_before_decoding_and_falls_back_for_what_it_cannot_read() -> None:
    from mmsent.imaging import ImagePreprocess
    from mmsent.serving.gpudecode import decode_batch

    good = _encode(_photo(3), "JPEG")
    datas = [b"%PDF-1.7 not an image", _png_bomb(20_000, 20_000), good[: len(good) // 3], good,
             b"\xff\xd8\xff\xe0" + b"garbage" * 20]
    pixels, reasons = decode_batch(datas, ImagePreprocess(size=32, resize=36), "cpu", max_pixels=10**7)
    assert reasons[0] == "unsupported_format" and reasons[1] == "too_large"
    assert reasons[3] is None and reasons[4] in {"corrupt", "truncated"}
    assert pixels.shape[0] == sum(r is None for r in reasons)  # one row per image that decoded, in order


def test_batched_decode_applies_the_exif_orientation() -> None:
    from mmsent.imaging import ImagePreprocess
    from mmsent.serving.gpudecode import decode_batch

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    _photo(4, (120, 60)).save(buf, "JPEG", exif=exif, quality=95)
    pre = ImagePreprocess(size=48, resize=48, crop=False)
    pixels, _ = decode_batch([buf.getvalue()], pre, "cpu")
    upright = pre.batch([decode_image(buf.getvalue())])
    assert decode_image(buf.getvalue()).size == (60, 120)
    assert (pixels - upright).abs().mean() < 0.02
