"""Safe image decoding and per-encoder preprocessing.

`decode_image` is the one door through which untrusted image bytes enter the model (the consumer's fetcher uses it
too). It sniffs the format from magic bytes, checks the pixel dimensions from the header *before* any pixels are
decoded (a decompression bomb is refused without allocating its pixels), applies the EXIF orientation, takes the
first frame of an animation and returns an RGB image, whatever the source mode (CMYK, 16-bit, palette, alpha).

    bytes ──open_checked (magic bytes, header: pixels and sides; JPEG drafted to a DCT scale)──▶ lazy image
          ──decode_opened (pixels: first frame, EXIF orientation, RGB, shrunk to within 2 × `min_side`)──▶ RGB image

`min_side` (the consumer's decoder and the Scorer's own decode of image bytes set it to the model's
`ImagePreprocess.source_side`; None keeps every pixel) says how small the image may come back: a model that sees
224 px gains nothing from a 16 MP photo, and a smaller image costs less memory while it waits for the CNN and less
time to decode and resize. A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8: `Image.draft`, nearly free)
whose shorter side is still at least `min_side`; then, any format, a shorter side of twice `min_side` or more is
box-averaged by a whole factor (`Image.reduce`) to below twice `min_side`. Either way the shorter side ends in
[min_side, 2 × min_side) (or as it was, when smaller), and the model's own antialiased resize only ever shrinks it.
Not an exact resize to `min_side`: that one (a box filter at a fractional scale) took 2 ms of CPU for a 600 × 800
MVSA photo on the dev VM, more than decoding it, and the model's own resize follows anyway.
Why the model's side and no margin (it was twice the side until 2026-12-06): training decodes every pixel, and a
serving decode at the model's side moves the shipped model's scores a little. On all 4,000 MVSA posts (most photos
450 px on the shorter side, so decoded at 1/2): the same label as a full decode for 99.75% in fp32 and 99.65% in
int8; a post's largest probability change 0.0025 on average, 0.020 at p99, 0.050 at most; in-sample accuracy (the
model trained on these posts) 82.25 -> 82.23 in fp32, 81.62 -> 81.67 in int8. That is less than int8 itself moves
them (its bar: 98% of labels), and the decode and the pixels' trip to the CNN cost ~1.1 ms less a photo: model
only +7% in fp32 and +10% in int8 against every pixel, end to end in int8 +10% (BENCHMARKS.md, 2026-12-07).
The two halves are separate so that a caller can reserve memory for the pixels between them (consumer/decoding.py).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "ImageDecodeError",
    "ImagePreprocess",
    "decode_image",
    "decode_opened",
    "open_checked",
    "sniff_format",
]

DEFAULT_MAX_PIXELS = 16_000_000  # every phone photo; the model sees 224 px
DEFAULT_MAX_SIDE = 12_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept. `reason` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def sniff_format(data: bytes) -> str | None:
    """The PIL format name from the magic bytes, or None for anything we do not accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white; high bit depths are scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        if mode == "F":
            lo = float(arr.min()) if arr.size else 0.0
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        elif hi > 255.0:  # 16-bit (or wider) samples: scale to 8 bit instead of clipping to white
            arr = arr / (65535.0 if hi <= 65535.0 else hi) * 255.0
        gray = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_checked(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE, min_side: int | None = None
) -> Image.Image:
    """The image opened lazily (its header read, no pixel decoded), once its format and size are acceptable;
    `ImageDecodeError` otherwise. Every decoder (this module's, the batched one in mmsent/serving/gpudecode.py)
    starts here.
    With `min_side`, a JPEG is set to decode at the smallest DCT scale that keeps its shorter side >= `min_side`:
    `im.size` is then the size its pixels will have."""
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageDecodeError("unsupported_format", "not JPEG, PNG, WebP, GIF or BMP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # PIL raises all of these for bad headers
        raise ImageDecodeError("corrupt", f"{fmt}: {exc}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"{fmt}: empty dimensions {width}x{height}")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageDecodeError("too_large", f"{width}x{height} exceeds {max_pixels} pixels or {max_side} px side")
    if min_side is not None and fmt == "JPEG":
        im.draft("RGB", (min_side, min_side))  # libjpeg's scale: both sides stay >= min_side
    return im


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE, min_side: int | None = None
) -> Image.Image:
    """Decode untrusted bytes into an RGB `PIL.Image.Image`, or raise `ImageDecodeError` with a reason.

    Reasons: `empty`, `unsupported_format`, `too_large`, `truncated`, `corrupt`.
    """
    return decode_opened(open_checked(data, max_pixels=max_pixels, max_side=max_side, min_side=min_side),
                         min_side=min_side)


def decode_opened(im: Image.Image, *, min_side: int | None = None) -> Image.Image:
    """The pixels of an image from `open_checked`: first frame, EXIF orientation, RGB, and with `min_side` a shorter
    side of twice it or more box-averaged to below twice it (`_shrink`). `ImageDecodeError` (`truncated`,
    `corrupt`, `too_large`)."""
    fmt = im.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(im, "is_animated", False):
                im.seek(0)  # the first frame only; never walk the whole animation
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the whole photo
            rgb = _shrink(_to_rgb(im), min_side)
            rgb.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageDecodeError(reason, f"{fmt}: {exc}") from None
    if rgb is not im:
        im.close()
    return rgb


def _shrink(im: Image.Image, min_side: int | None) -> Image.Image:
    """`im` box-averaged by the whole factor that brings its shorter side into [min_side, 2 × min_side) (aspect
    kept, to a pixel), or `im` when that side is already below 2 × `min_side`."""
    factor = 1 if min_side is None else min(im.size) // min_side
    return im if factor < 2 else im.reduce(factor)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize -> center crop -> normalise, matched to an image encoder. Part of `Scorer.image_encoder_id`.

    `crop=False` squashes the whole picture to size x size instead: a tweet's photo often carries its sentiment
    at the edges (a caption banner, a crowd), and on MVSA squashing scored better in cross-validation."""

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: bool = True

    @property
    def source_side(self) -> int:
        """The shorter side a source image needs so that this preprocess only ever shrinks it: `resize` when
        cropping (the shorter side is resized to it), `size` when squashing (both sides are resized to it). A
        decoder that shrinks images for it keeps twice this (module docstring: why)."""
        return self.resize if self.crop else self.size

    @property
    def ident(self) -> str:
        mean = ",".join(f"{m:g}" for m in self.mean)
        std = ",".join(f"{s:g}" for s in self.std)
        return f"r{self.resize}c{self.size}m{mean}s{std}" + ("" if self.crop else ":squash")

    def to_uint8(self, im: Image.Image, *, hflip: bool = False) -> torch.Tensor:
        """One RGB PIL image -> resized (and cropped) uint8 pixels (3, size, size).

        The resize is torch's antialiased bilinear on uint8 (AVX2): within one level of Pillow's BILINEAR on every
        pixel, at half its time (1.2 against 2.6 ms for a ~550 px photo on the dev VM)."""
        if im.mode != "RGB":
            im = _to_rgb(im)
        # (H, W, 3), copied so that the tensor owns writable memory. Not np.array(im): through the array interface
        # it took 0.64 ms for a 600 x 800 photo on the dev VM, against 0.50 for this (Pillow's packed bytes, copied).
        hwc = torch.from_numpy(np.asarray(im).copy())
        chw = self.fit(hwc.permute(2, 0, 1))  # channels-last strides
        if hflip:
            chw = chw.flip(-1)
        return chw.contiguous()  # plain (3, S, S): what ONNX Runtime reads, and 4x smaller to convert than floats

    def fit(self, chw: torch.Tensor) -> torch.Tensor:
        """(3, H, W) pixels, on any device -> resized (and cropped) (3, size, size), of the same dtype on the CPU;
        float on a GPU, whose antialiased resize takes no uint8."""
        x = chw.unsqueeze(0) if chw.device.type == "cpu" else chw.unsqueeze(0).float()
        h, w = x.shape[-2:]
        if not self.crop:
            return _resize(x, self.size, self.size)[0]
        scale = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        x = _resize(x, nh, nw)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return x[0, :, top : top + self.size, left : left + self.size]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """0-255 pixels (B, 3, S, S) -> float32 (B, 3, S, S), (x / 255 - mean) / std, computed as x * a + b with
        a = 1 / (255 std) and b = -mean / std: a multiply and an add in place of two divisions and a subtraction
        (32 photos at 224 px, one thread, medians of 15 rounds alternating: 9.1 against 2.4 ms on the AMX VM,
        2026-12-07); the values within 5e-7 of the three steps'."""
        scale, shift = _scale_and_shift(self.mean, self.std)
        return pixels.to(torch.float32).mul_(scale.to(pixels.device)).add_(shift.to(pixels.device))

    def to_tensor(self, im: Image.Image, *, hflip: bool = False) -> torch.Tensor:
        """One RGB PIL image -> normalised float tensor (3, size, size)."""
        return self.normalize(self.to_uint8(im, hflip=hflip).unsqueeze(0))[0]

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> normalised float (B, 3, size, size)."""
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        return self.normalize(torch.stack([self.to_uint8(im) for im in images]))


@functools.lru_cache(maxsize=8)
def _scale_and_shift(mean: tuple[float, float, float], std: tuple[float, float, float]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`normalize`'s a = 1 / (255 std) and b = -mean / std, (1, 3, 1, 1) float32 on the CPU, worked out in float64
    once per preprocessing rather than on every batch."""
    mean64, std64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    return ((1.0 / (255.0 * std64)).to(torch.float32).view(1, 3, 1, 1),
            (-mean64 / std64).to(torch.float32).view(1, 3, 1, 1))


def _resize(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(chw.shape[-2:]) == (height, width):
        return chw
    out: torch.Tensor = torch.nn.functional.interpolate(
        chw, size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return out
