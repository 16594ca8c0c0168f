"""int8 on the CPU: ONNX Runtime's own quantizer over the fp32 graphs that mmsent.runtime exports.

    text encoder, fp32 graph ──smoothed (`text_smoothing` α > 0): each weight MatMul's input divided per channel by
                               s = max|x|^α / max|w|^(1-α) and its weight rows multiplied by s (the same function),
                               from the channel maxima in the model directory (`int8-text-ranges.json`)
                             ──quantize_dynamic: int8 weights per output channel, activations quantized per call;
                               the first `text_fp32_ffn_layers` layers' FFN down-projections stay fp32──▶ int8 graph
    CNN, fp32 graph ──quant_pre_process──quantize_static, QDQ, int8 weights per channel, uint8 activations from
                      the ranges in the model directory (`int8-ranges.json`)──▶ int8 graph
    (each int8 graph cached as the fp32 ones are: keyed by the weights, the recipe and the ranges)

    `mmsent quantize DATA.jsonl` ──the CNN's activations on the data's images──▶ int8-ranges.json
                                 ──the text encoder's on the data's captions──▶ int8-text-ranges.json
                                 ──fp32 against int8 on the data──▶ int8.json (the recipe and what it measured)

Why these recipes (measured on the 2-core dev VM, default model v2.2, 400 MVSA posts, batch 32, one thread):
MiniLM int8 dynamic took 125 against 275 ms and kept 97.75% of labels with every layer in int8, 98.0% with the
first layer's FFN down-projection (the MatMul fed by its GELU, whose outputs have the widest range) in fp32 at the
same speed; all six FFN down-projections in fp32 kept 98.25% but ran at 175 ms. Per-tensor weights kept 94.75%.
Lite0 static QDQ with MinMax ranges from 64 training photos: 124 against 270 ms, 99.25% of labels (percentile
ranges: 99.0%, 4x slower to calibrate). EfficientNet-Lite was designed for int8 (ReLU6, no squeeze-excite).
Smoothing (SmoothQuant, Xiao et al. 2022): ONNX Runtime quantizes each MatMul's input per tensor, and MiniLM's
LayerNorm outputs have a few channels far wider than the rest, which then get most of the 256 levels; dividing each
channel by s moves that width into the weights, which are quantized per output channel. On 1,200 posts of the default
model's training data (channel maxima from 512 other captions), the text encoder alone in int8 kept 98.58% of labels
without and 99.33% with α 0.5 (mean largest probability change 0.0090 -> 0.0067; α 0.75: 99.25%). The MatMuls fed by
a GELU are not smoothed: their inputs have no such channels and smoothing them raised the error.

`auto` takes int8 only where the CPU has int8 dot-product instructions (VNNI or AMX; int8 was measured only on such
a CPU, and ONNX Runtime cannot be made to use its AVX2 kernels on one to measure the rest), and only the parts the
model directory says were measured and kept.

"bf16" is not a recipe of this module: the Scorer runs the encoders in eager PyTorch with bf16 weights under bf16
autocast (its CUDA recipe) instead of ONNX Runtime. `bf16_note` says whether the CPU has the units that make it pay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmsent.runtime import write_atomically

__all__ = ["BF16_CPU_FLAGS", "CPU_PRECISIONS", "INT8_CPU_FLAGS", "INT8_FILE", "ONNX_PRECISIONS", "PARTS",
           "RANGES_FILE", "TEXT_RANGES_FILE", "Int8Model", "Int8Recipe", "PrecisionChoice", "bf16_note",
           "choose_precision", "collect_cnn_ranges", "collect_text_ranges", "cpu_flags", "cpu_int8_flags",
           "quantize_cnn", "quantize_text"]

log = logging.getLogger(__name__)

ONNX_PRECISIONS = ("auto", "fp32", "int8")  # what `choose_precision` decides between, on ONNX Runtime
CPU_PRECISIONS = (*ONNX_PRECISIONS, "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the bf16 dot-product units
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names of the int8 dot-product units
INT8_FILE = "int8.json"  # in a model directory: the recipe and what it measured (`mmsent quantize`)
RANGES_FILE = "int8-ranges.json"  # in a model directory: the CNN's activation ranges, ONNX Runtime's format
TEXT_RANGES_FILE = "int8-text-ranges.json"  # in a model directory: the text encoder's channel maxima (smoothing)
TEXT_RANGES_FORMAT = "mmsent-text-ranges/1"
INT8_FORMAT = "mmsent-int8/1"
# Parts of a model that can run in int8, and how much of fp32's accuracy the measurement must keep for `auto`.
PARTS = ("text", "cnn")
MIN_AGREEMENT = 0.98
MAX_ACCURACY_DROP = 0.005


@dataclass(frozen=True)
class Int8Recipe:
    """How each part is quantized. Its digest is part of the cached graphs' names: a new recipe, new graphs."""

    text_fp32_ffn_layers: int = 1  # the first k layers' FFN down-projections stay fp32 (module docstring: why)
    per_channel: bool = True
    cnn_calibration: str = "minmax"
    text_smoothing: float = 0.5  # SmoothQuant's α for the text encoder; 0: not smoothed (module docstring: why)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: Any) -> Int8Recipe:
        if not isinstance(d, dict):
            raise ValueError("the recipe must be an object")
        d = {"text_smoothing": 0.0, **d}  # a recipe written before smoothing existed was not smoothed
        names = ("text_fp32_ffn_layers", "per_channel", "cnn_calibration", "text_smoothing")
        recipe = cls(**{k: d[k] for k in names if k in d})
        if not (isinstance(recipe.text_fp32_ffn_layers, int) and 0 <= recipe.text_fp32_ffn_layers <= 64):
            raise ValueError("text_fp32_ffn_layers must be an integer in [0, 64]")
        smoothing = recipe.text_smoothing
        if not (isinstance(smoothing, int | float) and not isinstance(smoothing, bool) and 0 <= smoothing <= 1):
            raise ValueError("text_smoothing must be a number in [0, 1]")
        if recipe.cnn_calibration != "minmax" or not isinstance(recipe.per_channel, bool):
            raise ValueError("unknown recipe options")
        return recipe


@dataclass(frozen=True)
class Int8Model:
    """What a model directory says about int8: the recipe, the CNN's ranges and the text encoder's (files) and the
    measurement, whose `parts` name the parts that kept fp32's labels and accuracy. Built by `load`, which never
    raises: a missing or unreadable file is an absent one, and `problem` says why."""

    recipe: Int8Recipe
    ranges: Path | None
    measured: dict[str, Any] | None
    problem: str | None = None
    text_ranges: Path | None = None

    @property
    def int8_parts(self) -> tuple[str, ...]:
        """The parts whose int8 accuracy was measured and kept (what `auto` runs in int8); each only with the
        ranges it was measured with."""
        if self.measured is None:
            return ()
        kept = self.measured.get("parts", {})
        return tuple(p for p in PARTS if isinstance(kept, dict) and kept.get(p) == "int8"
                     and (p != "cnn" or self.ranges is not None)
                     and (p != "text" or not self.recipe.text_smoothing or self.text_ranges is not None))

    @classmethod
    def load(cls, directory: Path | None) -> Int8Model:
        if directory is None:
            return cls(Int8Recipe(), None, None)
        ranges = directory / RANGES_FILE
        try:
            checked = _checked_ranges(ranges) if ranges.is_file() else None
        except (OSError, ValueError) as exc:
            return cls(Int8Recipe(), None, None, f"{RANGES_FILE} ignored: {exc}")
        text_ranges, problem = directory / TEXT_RANGES_FILE, None
        try:  # unreadable: the text encoder's smoothed int8 is off (`int8_parts`); the rest stands
            text_checked = _checked_text_ranges(text_ranges) if text_ranges.is_file() else None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            text_checked, problem = None, f"{TEXT_RANGES_FILE} ignored: {exc}"
        path = directory / INT8_FILE
        if not path.is_file():
            return cls(Int8Recipe(), checked, None, problem, text_checked)
        try:
            raw = _untrusted_json(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or raw.get("format") != INT8_FORMAT:
                raise ValueError(f"not {INT8_FORMAT}")
            measured = raw.get("measured")
            return cls(Int8Recipe.from_dict(raw.get("recipe", {})), checked,
                       measured if isinstance(measured, dict) else None, problem, text_checked)
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            return cls(Int8Recipe(), checked, None, f"{INT8_FILE} ignored: {exc}", text_checked)

    def write(self, directory: Path) -> Path:
        path = directory / INT8_FILE
        body = {"format": INT8_FORMAT, "recipe": asdict(self.recipe), "measured": self.measured}
        write_atomically(path, json.dumps(body, indent=2).encode())
        return path


def _checked_ranges(path: Path) -> Path:
    """The ranges file, when it is what ONNX Runtime writes (`TensorsData.to_dict`): an object of tensor names, each
    with finite bounds. It is read from a model directory, so it is checked before ONNX Runtime sees it."""
    if path.stat().st_size > 16 << 20:
        raise ValueError("larger than 16 MiB")
    raw = _untrusted_json(path.read_bytes(), parse_constant=_refuse_constant)
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict) or not data:
        raise ValueError("no tensor ranges")
    for name, entry in data.items():
        bounds = [entry.get(k) for k in ("lowest", "highest")] if isinstance(entry, dict) else []
        if not bounds or not all(_finite_numbers(b) for b in bounds):
            raise ValueError(f"tensor {name[:80]!r} has no finite lowest/highest")
    return path


def _checked_text_ranges(path: Path) -> Path:
    """The text encoder's channel maxima, when they are what `collect_text_ranges` writes: tensor names, each with a
    list of finite, non-negative numbers."""
    if path.stat().st_size > 16 << 20:
        raise ValueError("larger than 16 MiB")
    raw = _untrusted_json(path.read_bytes(), parse_constant=_refuse_constant)
    data = raw.get("data") if isinstance(raw, dict) and raw.get("format") == TEXT_RANGES_FORMAT else None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"not {TEXT_RANGES_FORMAT} with channel maxima")
    for name, maxima in data.items():
        if not (isinstance(maxima, list) and _finite_numbers(maxima) and min(maxima) >= 0):
            raise ValueError(f"tensor {name[:80]!r} has no finite, non-negative channel maxima")
    return path


def _untrusted_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads` for a file that came with a model directory: nesting too deep for the parser (RecursionError)
    is a malformed file like any other (ValueError), which `Int8Model.load` turns into an ignored one."""
    try:
        return json.loads(text, **options)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _finite_numbers(value: Any) -> bool:
    """A number, or what ONNX Runtime writes for a numpy value ({"data": ..., "dtype": ...}), all finite."""
    if isinstance(value, dict):
        value = value.get("data")
    flat = value if isinstance(value, list) else [value]
    return bool(flat) and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                              for v in flat)


# --- choosing ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionChoice:
    parts: tuple[str, ...]  # the parts that run in int8; () is fp32
    note: str  # why, for the log and `Scorer.precision_note`

    @property
    def precision(self) -> str:
        return "int8" if self.parts else "fp32"


def cpu_flags(names: Iterable[str], cpuinfo: str | None = None) -> tuple[str, ...]:
    """Which of these CPU feature flags this CPU has, in their order, from /proc/cpuinfo (or the text given); ()
    where it cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return tuple(f for f in names if f in have)


def cpu_int8_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The int8 dot-product features this CPU has (of INT8_CPU_FLAGS): where int8 pays."""
    return cpu_flags(INT8_CPU_FLAGS, cpuinfo)


def bf16_note(cpuinfo: str | None = None) -> str:
    """Why the encoders run in bf16 (asked for), and whether this CPU has bf16 dot products (AVX512_BF16, AMX):
    without them oneDNN emulates bf16 and it runs slower than fp32."""
    flags = cpu_flags(BF16_CPU_FLAGS, cpuinfo)
    if flags:
        return f"bf16: asked for; the CPU has {', '.join(flags)}"
    return "bf16: asked for, but the CPU has no AVX512_BF16 or AMX: slower than fp32 here"


def choose_precision(wanted: str, cpu_flags: Iterable[str], model: Int8Model,
                     int8_parts: tuple[str, ...] = PARTS) -> PrecisionChoice:
    """`wanted` ("auto", "fp32", "int8") for a model on a CPU with these int8 flags. "int8" is what was asked:
    `int8_parts` (every part) in int8. "auto": int8 for the parts the model's measurement kept, and only on a CPU
    with VNNI or AMX. ("bf16" is the Scorer's, before ONNX Runtime: refused here.)"""
    if wanted not in ONNX_PRECISIONS:
        raise ValueError(f"cpu_precision on ONNX Runtime is {', '.join(ONNX_PRECISIONS[:-1])} or "
                         f"{ONNX_PRECISIONS[-1]}, not {wanted!r}")
    if not set(int8_parts) <= set(PARTS):
        raise ValueError(f"int8 parts are {', '.join(PARTS)}, not {int8_parts!r}")
    if wanted == "fp32":
        return PrecisionChoice((), "fp32: asked for")
    if wanted == "int8":
        return PrecisionChoice(tuple(p for p in PARTS if p in int8_parts), "int8: asked for")
    flags = tuple(cpu_flags)
    if not flags:
        return PrecisionChoice((), "fp32: the CPU has no VNNI or AMX, where int8 does not pay")
    if not model.int8_parts:
        why = model.problem or "the model's int8 accuracy was not measured (mmsent quantize) or not kept"
        return PrecisionChoice((), f"fp32: {why}")
    return PrecisionChoice(model.int8_parts, f"int8 ({', '.join(model.int8_parts)}): the CPU has "
                           f"{', '.join(flags)} and the model's int8 accuracy was measured")


# --- quantizing ----------------------------------------------------------------------------------------------------
def quantize_text(fp32: Path, out: Path, recipe: Int8Recipe, ranges: Path | None = None) -> None:
    """The text encoder's graph with dynamic int8 weight MatMuls, the first `recipe.text_fp32_ffn_layers` FFN
    down-projections (MatMuls fed by a GELU) left in fp32; smoothed first where the recipe says, with the channel
    maxima in `ranges` (`collect_text_ranges`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="mmsent-int8-") as tmp:
        if recipe.text_smoothing:
            if ranges is None:
                raise ValueError(f"the recipe smooths the text encoder, which needs {TEXT_RANGES_FILE}")
            fp32 = _smoothed(fp32, ranges, recipe.text_smoothing, Path(tmp) / "smoothed.onnx")
        graph = onnx.load(str(fp32), load_external_data=False).graph
        after_gelu = {n.output[0] for n in graph.node if n.op_type == "Gelu"}
        ffn_down = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[0] in after_gelu]
        with _quiet():
            quantize_dynamic(str(fp32), str(out), per_channel=recipe.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=ffn_down[: recipe.text_fp32_ffn_layers],
                             extra_options={"MatMulConstBOnly": True})


def collect_text_ranges(fp32: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], out: Path) -> int:
    """The channel maxima of |x| for every input that smoothing divides (`_smoothable`), over the real tokens of
    `batches` of (input ids, attention mask), padding left out; written to `out`. Returns the number of captions."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    names = sorted(_smoothable(model.graph))
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    maxima: dict[str, np.ndarray] = {}
    seen = 0
    for ids, mask in batches:
        real = mask.reshape(-1).astype(bool)
        for name, x in zip(outputs, session.run(None, dict(zip(inputs, (ids, mask), strict=True))), strict=True):
            if name in names:
                rows = x.reshape(-1, x.shape[-1])
                top = np.abs(rows[real] if len(rows) == len(real) else rows).max(axis=0)
                maxima[name] = np.maximum(maxima[name], top) if name in maxima else top
        seen += len(ids)
    if not seen:
        raise ValueError("no captions to collect the text encoder's ranges on")
    body = {"format": TEXT_RANGES_FORMAT, "data": {k: v.astype(float).tolist() for k, v in maxima.items()}}
    write_atomically(out, json.dumps(body).encode())
    return seen


def _smoothable(graph: Any) -> dict[str, list[Any]]:
    """The MatMuls smoothing rescales, by the input tensor they read (Q, K and V read one): those with a weight of
    their own, not fed by a GELU (module docstring: why)."""
    weights = {t.name for t in graph.initializer}
    uses = Counter(i for n in graph.node for i in n.input)
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    fed: dict[str, list[Any]] = {}
    for node in graph.node:
        if (node.op_type == "MatMul" and node.input[1] in weights and uses[node.input[1]] == 1
                and made_by.get(node.input[0]) != "Gelu"):
            fed.setdefault(node.input[0], []).append(node)
    return fed


def _smoothed(fp32: Path, ranges: Path, alpha: float, out: Path) -> Path:
    """The same function with each smoothable input divided per channel by s = max|x|^α / max|w|^(1-α) (one Mul per
    input, after its producer) and the weight rows of the MatMuls it feeds multiplied by s."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    graph = model.graph
    maxima = json.loads(ranges.read_text())["data"]
    fed = _smoothable(graph)
    if missing := set(fed) - set(maxima):
        raise ValueError(f"{len(missing)} of the text encoder's {len(fed)} MatMul inputs are not in {ranges.name} "
                         "(exported by another version?): run `mmsent quantize` again")
    weights = {t.name: t for t in graph.initializer}
    scaling: dict[str, Any] = {}  # input tensor -> its Mul
    for name, nodes in fed.items():
        mats = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        top_w = np.max([np.abs(w).max(axis=1) for w in mats], axis=0)
        top_x = np.asarray(maxima[name], dtype=np.float64)
        if top_x.shape != top_w.shape:
            raise ValueError(f"{ranges.name}: {name!r} has {top_x.size} channels, the graph {top_w.size}")
        scale = (np.maximum(top_x, 1e-5) ** alpha / np.maximum(top_w, 1e-5) ** (1 - alpha)).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(1 / scale, f"{name}/smoothing"))
        scaling[name] = onnx.helper.make_node("Mul", [name, f"{name}/smoothing"], [f"{name}/smoothed"],
                                              name=f"{name}/smooth")
        for node, w in zip(nodes, mats, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
            node.input[0] = f"{name}/smoothed"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(scaling.pop(i.name) for i in graph.input if i.name in scaling)
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(scaling.pop(o) for o in node.output if o in scaling)
    onnx.save(model, str(out))
    return out


def quantize_cnn(fp32: Path, out: Path, ranges: Path, recipe: Int8Recipe) -> None:
    """The CNN's graph in static int8 (QDQ) from stored activation ranges: no data needed."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="mmsent-int8-") as tmp:
        prepared = _prepared(fp32, Path(tmp))
        _check_names(prepared, ranges)
        with _quiet():
            quantize_static(str(prepared), str(out), None, quant_format=QuantFormat.QDQ,
                            per_channel=recipe.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=ranges)


def collect_cnn_ranges(fp32: Path, batches: Iterable[np.ndarray], out: Path) -> int:
    """The CNN's activation ranges (MinMax) over `batches` of preprocessed pixels (B, 3, S, S), written to `out` in
    ONNX Runtime's calibration-cache format. Returns the number of images seen."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="mmsent-int8-") as tmp:
        prepared = _prepared(fp32, Path(tmp))
        import onnxruntime as ort

        name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        seen = 0

        class Reader(CalibrationDataReader):
            def __init__(self, it: Iterator[np.ndarray]) -> None:
                self.it = it

            def get_next(self) -> dict[str, np.ndarray] | None:
                nonlocal seen
                batch = next(self.it, None)
                if batch is None:
                    return None
                seen += len(batch)
                return {name: np.ascontiguousarray(batch, dtype=np.float32)}

        calibrator = create_calibrator(prepared, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(Reader(iter(batches)))
        ranges = calibrator.compute_data()
    if not seen:
        raise ValueError("no images to collect the CNN's ranges on")
    save_tensors_data(ranges, out)
    return seen


def _prepared(fp32: Path, tmp: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference, graph optimisation) before static quantization: the tensor
    names the ranges are keyed by are this graph's, so collecting and quantizing both start from it."""
    from onnxruntime.quantization import quant_pre_process

    prepared = tmp / "prepared.onnx"
    with _quiet():
        quant_pre_process(str(fp32), str(prepared))
    return prepared


def _check_names(prepared: Path, ranges: Path) -> None:
    """The ranges must name this graph's tensors: ranges collected on another export (a torch that names nodes
    otherwise) would quantize nothing, or the wrong tensors."""
    import onnx

    graph = onnx.load(str(prepared), load_external_data=False).graph
    tensors = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    named = set(json.loads(ranges.read_text())["data"])
    missing = named - tensors
    if missing:
        raise ValueError(f"{len(missing)} of the {len(named)} tensors in {ranges.name} are not in this graph "
                         "(exported by another version?): run `mmsent quantize` again")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice at WARNING through the root logger and warns; not ours to show."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.root.setLevel(level)
