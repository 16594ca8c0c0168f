"""The frozen encoders on the CPU through ONNX Runtime: same weights, same outputs (to ~1e-4), less time.

PyTorch's eager CPU kernels for EfficientNet's depthwise convolutions are memory-bound and run each BatchNorm and
ReLU6 as a separate pass over the activations; ONNX Runtime folds them into the convolutions and has tuned depthwise
kernels. Measured on the 2-core dev VM, 32 MVSA photos: eager channels-last ~24 ms per image, ONNX Runtime ~7 ms,
largest difference in the features 5e-5. For a small text encoder eager PyTorch spends most of a short call
dispatching ops: MiniLM on one caption 20.9 against 11.1 ms (BENCHMARKS.md, second round).

Each graph is exported once per set of weights (torch.export, ~10-14 s per encoder on 2 cores) and kept in the cache
dir under a digest of the weights, so a restart loads it in well under a second. Where that dir is not writable (a
read-only pod), the graph lives in memory for the life of the process. The PyTorch modules stay loaded: training and
the GPU path use them.

    module ──torch.onnx.export (once per weights)──without softmax NaN guards──▶ onnx/<name>-<weights>-...onnx
                                                        ──▶ InferenceSession (fp32)
                                                        └──`Int8` (mmsent/quantize.py; once per weights and
                                                           recipe)──▶ onnx/<...>-int8-<recipe>.onnx ──▶ (int8)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = ["CPU_RUNTIMES", "SLOWER_FUSIONS", "Exportable", "Int8", "OnnxGraph", "inference_session",
           "onnxruntime_available", "without_softmax_nan_guards", "write_atomically"]

log = logging.getLogger(__name__)

CPU_RUNTIMES = ("auto", "onnx", "torch")
_EXPORT_VERSION = 2  # bump when the export recipe changes: old cached graphs are then ignored (2: NaN guards off)
# ONNX Runtime fusions that make these graphs slower on the CPU. SkipLayerNormFusion folds each residual Add into the
# LayerNormalization after it, and ONNX Runtime 1.32's SkipLayerNormalization kernel is slower than the two ops it
# replaces: MiniLM at batch 32 x 40 tokens, one thread, 147.8 -> 121.0 ms in int8 and 329.1 -> 306.5 ms in fp32
# with it off (medians, scripts/ort_fusions.py, 2-core AMD EPYC VM, 2026-12-07; BENCHMARKS.md). The CNN has no
# LayerNormalization: unaffected.
SLOWER_FUSIONS = ("SkipLayerNormFusion",)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


class Exportable(nn.Module):
    """Wraps a function of tensors, so that torch.export sees a module (and the weights it uses)."""

    def __init__(self, owner: nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self._forward = forward

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._forward(*inputs)


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Int8(NamedTuple):
    """How to make a graph's int8 twin: `quantize(fp32_path, int8_path)`, and a `key` naming the recipe and its
    inputs (ranges), part of the cached int8 graph's name."""

    key: str
    quantize: Callable[[Path, Path], None]


class OnnxGraph:
    """A frozen module's forward, run by ONNX Runtime on the CPU: tensors in, one float32 tensor out.

    `dynamic` names, per input, the axes that vary (e.g. `{0: "batch", 1: "tokens"}`); every other axis is fixed
    to the example's size. `int8`: run the graph's int8 twin instead (raises what quantizing raised). The session is
    thread-safe: slices of a batch may call it at once."""

    def __init__(self, name: str, module: Exportable, example: tuple[torch.Tensor, ...],
                 dynamic: tuple[dict[int, str], ...], *, threads: int, cache_dir: Path | None,
                 int8: Int8 | None = None) -> None:
        shape = "-".join("x".join(str(n) for n in t.shape) for t in example)
        key = f"{name}-{_weights_digest(module)}-{shape}-t{torch.__version__}-v{_EXPORT_VERSION}"
        model = _cached_or_exported(module, example, dynamic, key, cache_dir)
        self.fp32_graph = model  # its path in the cache dir, or the graph itself
        if int8 is not None:
            model = _cached_or_quantized(model, f"{key}-int8-{int8.key}", int8, cache_dir)
        self._session = inference_session(model, threads=threads)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._dtypes = [t.dtype for t in example]

    @contextlib.contextmanager
    def fp32_file(self) -> Iterator[Path]:
        """The fp32 graph as a file (a temporary one where it lives in memory), e.g. to calibrate its int8 twin."""
        if isinstance(self.fp32_graph, str):
            yield Path(self.fp32_graph)
            return
        with tempfile.TemporaryDirectory(prefix="mmsent-onnx-") as tmp:
            path = Path(tmp) / "fp32.onnx"
            path.write_bytes(self.fp32_graph)
            yield path

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: np.ascontiguousarray(t.detach().to(dtype).cpu().numpy())
                for name, t, dtype in zip(self._inputs, inputs, self._dtypes, strict=True)}
        (out,) = self._session.run(None, feed)
        return torch.from_numpy(out)


def inference_session(model: str | bytes, *, threads: int, optimized_to: Path | None = None,
                      disabled: tuple[str, ...] = SLOWER_FUSIONS) -> Any:
    """ONNX Runtime's CPU session for one of these graphs: `threads` intra-op threads that sleep when idle, every
    graph optimisation but `disabled` (what serving disables: `SLOWER_FUSIONS`). `optimized_to`: also write the
    graph as optimised (to look at it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Busy-waiting worker threads steal the core that the broker client, the fetcher and Redis need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def _cached_or_quantized(fp32: str | bytes, key: str, int8: Int8, cache_dir: Path | None) -> str | bytes:
    path = cache_dir / "onnx" / f"{key}.onnx" if cache_dir is not None else None
    if path is not None and path.exists():
        return str(path)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mmsent-onnx-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        if isinstance(fp32, bytes):
            source.write_bytes(fp32)
        else:
            source = Path(fp32)
        out = Path(tmp) / "int8.onnx"
        int8.quantize(source, out)
        data = out.read_bytes()
    log.info("onnx_quantized seconds=%.1f key=%s", time.monotonic() - started, key)
    return _kept(data, path)


def without_softmax_nan_guards(model: Any) -> Any:
    """The exported graph (an onnx ModelProto, changed in place) without the guard torch's exporter puts after each
    attention softmax, `Where(IsNaN(p), 0, p)`, for a row whose keys are all masked with -inf. Hugging Face masks
    with float32's lowest finite value instead, so the softmax never gives NaN and the outputs are unchanged to the
    bit. The two ops cost MiniLM in int8 6-8% of its time (8 captions x 24-40 tokens, one thread, the AMX VM,
    2026-12-07: 14.15 -> 13.36 and 24.72 -> 22.81 ms; fp32 0.3-2%). A graph without them (a CNN) is returned as is."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    guards = [(node, producer[node.input[0]]) for node in graph.node
              if node.op_type == "Where" and node.input[0] in producer
              and producer[node.input[0]].op_type == "IsNaN" and producer[node.input[0]].input[0] == node.input[2]]
    unguarded = {where.output[0]: where.input[2] for where, _ in guards}
    for node in graph.node:
        node.input[:] = [unguarded.get(name, name) for name in node.input]
    for where, isnan in guards:
        graph.node.remove(where)
        graph.node.remove(isnan)
    return model


def write_atomically(path: Path, data: bytes) -> None:
    """`data` into `path` through a temporary file beside it: a concurrent reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def _kept(data: bytes, path: Path | None) -> str | bytes:
    """The graph saved at `path` (atomically: a concurrent loader sees the whole file or none) and its path; the
    bytes themselves where there is no cache dir or it is not writable (a read-only pod)."""
    if path is None:
        return data
    try:
        write_atomically(path, data)
    except OSError as exc:
        log.info("onnx_cache_unwritable path=%s error=%s", path, exc)
        return data
    return str(path)


def _cached_or_exported(module: Exportable, example: tuple[torch.Tensor, ...], dynamic: tuple[dict[int, str], ...],
                        key: str, cache_dir: Path | None) -> str | bytes:
    path = cache_dir / "onnx" / f"{key}.onnx" if cache_dir is not None else None
    if path is not None and path.exists():
        return str(path)
    started = time.monotonic()
    dims: dict[str, Any] = {}
    shapes = tuple({axis: dims.setdefault(name, torch.export.Dim(name, min=1, max=4096)) for axis, name in d.items()}
                   for d in dynamic)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), example, dynamo=True, verbose=False, dynamic_shapes=(shapes,))
    if program is None:  # only when exporting to a file, which we do not
        raise RuntimeError("torch.onnx.export returned no program")
    data: bytes = without_softmax_nan_guards(program.model_proto).SerializeToString()
    log.info("onnx_exported seconds=%.1f key=%s", time.monotonic() - started, key)
    return _kept(data, path)
