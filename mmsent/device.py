"""Where and in what precision the model runs, for serving, training and the benchmarks alike: the one way to choose
a device from its name (`resolve_device`) and the one autocast (`autocast`)."""

from __future__ import annotations

import torch

__all__ = ["autocast", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (use cpu or auto)")
    return torch.device(name)


def autocast(device: torch.device, *, bf16: bool | None = None) -> torch.autocast:
    """bf16 autocast, on CUDA by default (no loss scaling needed, unlike fp16; the precision-sensitive ops stay in
    fp32); off on the CPU, where bf16 is slower on most cores. `bf16` forces it either way (the device benchmark
    measures both precisions on every device)."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
