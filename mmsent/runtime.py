"""The frozen CNN on the CPU through ONNX Runtime: same weights, same outputs (to ~1e-4), about 3x less time.

PyTorch's eager CPU kernels for EfficientNet's depthwise convolutions are memory-bound and run each BatchNorm and
ReLU6 as a separate pass over the activations. ONNX Runtime folds them into the convolutions and has tuned
depthwise kernels. Measured on the 2-core dev VM, 32 MVSA photos: eager channels-last ~24 ms per image, ONNX Runtime
~7 ms, largest difference in the features 5e-5 (BENCHMARKS.md has the side-by-side run).

The ONNX graph is exported once per set of weights (torch.export, ~12 s for EfficientNet-Lite0 on 2 cores) and kept in
the cache dir under a digest of the weights, so a restart loads it in milliseconds. Where that dir is not writable (a
read-only pod), the graph lives in memory for the life of the process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CPU_RUNTIMES", "OnnxCnn", "onnxruntime_available"]

log = logging.getLogger(__name__)

CPU_RUNTIMES = ("auto", "onnx", "torch")
_EXPORT_VERSION = 1  # bump when the export recipe changes: old cached graphs are then ignored


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


class _Forward(nn.Module):
    """Wraps a function of one tensor so that torch.export sees a module."""

    def __init__(self, trunk: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.trunk = trunk
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class OnnxCnn:
    """`(B, 3, S, S)` float pixels -> `(B, C, h, w)` feature map, run by ONNX Runtime on the CPU.

    `forward` is the trunk's own eager forward (the one exported); the session is thread-safe."""

    def __init__(self, trunk: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], *, size: int,
                 threads: int, cache_dir: Path | None) -> None:
        import onnxruntime as ort

        key = f"cnn-{_weights_digest(trunk)}-s{size}-t{torch.__version__}-v{_EXPORT_VERSION}"
        model = self._cached_or_exported(_Forward(trunk, forward).eval(), size, key, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        # Busy-waiting worker threads steal the core that the broker client, the fetcher and Redis need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().to(torch.float32).cpu().numpy())
        (fmap,) = self._session.run(None, {self._input: x})
        return torch.from_numpy(fmap)

    @staticmethod
    def _cached_or_exported(module: nn.Module, size: int, key: str, cache_dir: Path | None) -> str | bytes:
        path = cache_dir / "onnx" / f"{key}.onnx" if cache_dir is not None else None
        if path is not None and path.exists():
            return str(path)
        started = time.monotonic()
        example = torch.zeros(2, 3, size, size)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, verbose=False, input_names=["pixels"], output_names=["fmap"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            )
        if program is None:  # only when exporting to a file, which we do not
            raise RuntimeError("torch.onnx.export returned no program")
        data: bytes = program.model_proto.SerializeToString()
        log.info("onnx_cnn_exported seconds=%.1f key=%s", time.monotonic() - started, key)
        if path is None:
            return data
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
                f.write(data)
            os.replace(f.name, path)  # atomic: a concurrent loader sees the whole file or none
        except OSError as exc:  # read-only file system: keep the graph in memory
            log.info("onnx_cnn_cache_unwritable path=%s error=%s", path, exc)
            return data
        return str(path)
