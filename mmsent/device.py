"""Where the model runs: the one way to choose a device from its name (`resolve_device`), for serving, training and
the benchmarks alike."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (use cpu or auto)")
    return torch.device(name)
