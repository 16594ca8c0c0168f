"""Images decoded in batches on the model's device: JPEGs by nvJPEG (`torchvision.io.decode_jpeg` on a list, on
the device), everything else by the safe CPU decoder, then resized and normalised where the model is.

    bytes ──open_checked (header: format, pixels, side; nothing decoded)──┬── JPEG ──▶ decode_jpeg(list, device)
                                                                          └── PNG, WebP, GIF, BMP, and any JPEG
                                                                              the batch decode refuses ──▶ decode_image
          ──▶ ImagePreprocess.fit on the device ──▶ stack ──▶ normalize ──▶ (B, 3, S, S) float32 on the device

The safety limits are checked before any decode, whichever decoder runs. On a CPU device the same code runs with
torchvision's CPU JPEG decoder (how the tests exercise it here). torchvision 0.29 deprecates its decoders for
TorchCodec's; the GPU host's torchvision (0.26) does not, and the move waits until TorchCodec is on both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mmsent.imaging import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    ImageDecodeError,
    ImagePreprocess,
    decode_image,
    open_checked,
)

__all__ = ["decode_batch"]


def decode_batch(datas: Sequence[bytes], preprocess: ImagePreprocess, device: torch.device | str, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
                 ) -> tuple[torch.Tensor, list[str | None]]:
    """-> (pixels (n, 3, S, S) float32 on `device` for the images that decoded, in order; per input, None when it
    decoded or the `ImageDecodeError` reason it was refused with)."""
    device = torch.device(device)
    reasons: list[str | None] = []
    formats: list[str | None] = []
    for data in datas:
        try:
            formats.append(open_checked(data, max_pixels=max_pixels, max_side=max_side).format)
            reasons.append(None)
        except ImageDecodeError as exc:
            formats.append(None)
            reasons.append(exc.reason)
    jpegs = iter(_decode_jpegs([d for d, f in zip(datas, formats, strict=True) if f == "JPEG"], device))
    fitted: list[torch.Tensor] = []
    for k, (data, fmt) in enumerate(zip(datas, formats, strict=True)):
        chw = next(jpegs) if fmt == "JPEG" else None
        if chw is None and fmt is not None:
            chw = _decode_on_cpu(data, max_pixels, max_side, reasons, k)
        if chw is not None:
            fitted.append(preprocess.fit(chw.to(device, non_blocking=True)).float())
    size = preprocess.size
    stacked = torch.stack(fitted) if fitted else torch.zeros(0, 3, size, size, device=device)
    return preprocess.normalize(stacked), reasons


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decode; if the batch is refused (a JPEG nvJPEG cannot read), each alone, None for a refusal."""
    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        return [_decode_one_jpeg(tensor, device) for tensor in encoded]


def _decode_one_jpeg(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        out: torch.Tensor = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
        return out
    except RuntimeError:
        return None  # the safe CPU decoder has the last word on it


def _decode_on_cpu(data: bytes, max_pixels: int, max_side: int, reasons: list[str | None], k: int
                   ) -> torch.Tensor | None:
    """The safe CPU decoder (any format, a JPEG the batch refused): (3, H, W) uint8, or None with its reason."""
    import numpy as np

    try:
        image = decode_image(data, max_pixels=max_pixels, max_side=max_side)
    except ImageDecodeError as exc:
        reasons[k] = exc.reason
        return None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
