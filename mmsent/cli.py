"""`mmsent train` and `mmsent eval` (typer). The root CLI mounts `app`; `python -m mmsent.cli` runs it alone."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import Field, fields, replace
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import torch
import typer

from mmsent.data import ColumnMap, load_examples
from mmsent.evaluation.calibrate import DEFAULT_PRECISIONS, calibrate_model
from mmsent.evaluation.evaluate import evaluate_file
from mmsent.evaluation.figures import plot_confusion
from mmsent.evaluation.int8 import quantize_model
from mmsent.evaluation.reliability import plot_reliability
from mmsent.presets import ModelOptions, from_config, with_text_encoder_from
from mmsent.quantize import CPU_PRECISIONS, Int8Recipe
from mmsent.training.config import TrainConfig
from mmsent.training.train import train_model

app = typer.Typer(help="Train and evaluate mmsent models.", no_args_is_help=True, add_completion=False)
CPU_PRECISION_HELP = ("on a CPU: the encoders in fp32, int8 or bf16 (for AVX512_BF16 or AMX); auto as "
                      "MMSENT_CPU_PRECISION (int8 where it was measured)")


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _config_options(**configs: type[Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command an option per field of each config dataclass; call it with the configs built from them.

        @_config_options(train=TrainConfig)          typer sees the command's own parameters, less `train`,
        def cmd(data: ..., *, train: TrainConfig)    then --epochs, --batch-size, ... (TrainConfig's fields)

    A field's default, help (`metadata["help"]`) and any flags other than `--field-name` (`metadata["flags"]`) are
    declared on the dataclass alone, so the command line and the API cannot disagree.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name not in configs]
        params = own + [_option(f, get_type_hints(cls)[f.name]) for cls in configs.values() for f in fields(cls)]

        def run(**kwargs: Any) -> None:
            built = {name: cls(**{f.name: kwargs.pop(f.name) for f in fields(cls)}) for name, cls in configs.items()}
            command(**kwargs, **built)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate


def _option(f: Field[Any], hint: Any) -> inspect.Parameter:
    option = typer.Option(*f.metadata.get("flags", ()), help=f.metadata["help"])
    kind = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(f.name, kind, default=f.default, annotation=Annotated[hint, option])


@app.command("train")
@_config_options(options=ModelOptions, train=TrainConfig)
def train_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV (id, text, label, image path)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model directory to write")],
    columns: Annotated[
        str | None, typer.Option(help="e.g. text=review_text,label=sentiment_label,image=image_path")
    ] = None,
    extra_text: Annotated[list[Path] | None, typer.Option(help="extra text-only labelled data (repeatable)")] = None,
    half: Annotated[bool, typer.Option("--half", help="store the trained weights in float16")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from DIR/train_state.pt")] = False,
    *,
    options: ModelOptions,
    train: TrainConfig,
) -> None:
    """Train a model directory on a labelled file."""
    torch.set_num_threads(train.threads)
    cfg = options.config(tta=train.tta)
    model = from_config(cfg).train()
    if options.text_from:
        try:
            with_text_encoder_from(model, options.text_from)
        except ValueError as exc:  # a refused or other text encoder (ModelRefused is one): said before any work
            _err(str(exc))
            raise typer.Exit(2) from exc
    examples = load_examples(data, cfg.labels, ColumnMap.parse(columns))
    extra = [replace(ex, image=None, pair=None) for p in extra_text or [] for ex in load_examples(p, cfg.labels)]
    command = " ".join(["mmsent train", *sys.argv[2:]]) if len(sys.argv) > 2 else "mmsent train"
    model.cfg = replace(model.cfg, extra={**model.cfg.extra, "command": command})
    try:
        train_model(model, examples, out, train, extra_text=extra, resume=resume, log=_err, half=half)
    except ValueError as exc:  # a combination of options training cannot honour; said before any work
        _err(str(exc))
        raise typer.Exit(2) from exc


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV")],
    model: Annotated[str | None, typer.Option(help="model directory or preset (default: the packaged model)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    modality: Annotated[str, typer.Option(help="text | image | both")] = "both",
    columns: Annotated[str | None, typer.Option(help="column mapping, as for train")] = None,
    confusion_png: Annotated[
        Path | None, typer.Option(help="write the confusion matrix PNG here (default: DATA.confusion-MODALITY.png in "
                                       "the current directory, never into the data's folder)")
    ] = None,
    reliability_png: Annotated[
        Path | None, typer.Option(help="write the reliability diagram PNG here (default: beside the confusion PNG)")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one) | cpu | cuda | cuda:N")] = "auto",
    cpu_precision: Annotated[str, typer.Option(help=CPU_PRECISION_HELP)] = "auto",
) -> None:
    """Evaluate a model on a labelled file: accuracy, macro/weighted F1, per-class P/R/F1, ECE (and the reliability
    diagram)."""
    torch.set_num_threads(threads)
    if modality not in ("text", "image", "both"):
        _err("--modality must be text, image or both")
        raise typer.Exit(2)
    _check_precision(cpu_precision)
    metrics = evaluate_file(data, model, modality=modality, columns=ColumnMap.parse(columns), progress=not json_out,
                            device=device, cpu_precision=cpu_precision)
    labels = list(metrics["per_class"])
    png = confusion_png or Path.cwd() / f"{Path(data).stem}.confusion-{modality}.png"
    try:
        metrics["confusion_png"] = str(plot_confusion(metrics["confusion_matrix"], labels, png, title=f"{modality}"))
    except OSError as exc:  # an unwritable directory must not fail the evaluation
        _err(f"confusion matrix not written: {exc}")
    reliability = reliability_png or png.with_name(Path(data).stem + f".reliability-{modality}.png")
    try:
        title = f"{modality} (ECE {metrics['ece']:.4f}{', calibrated' if metrics.get('calibrated') else ''})"
        metrics["reliability_png"] = str(plot_reliability(metrics["reliability"], reliability, title=title))
    except OSError as exc:
        _err(f"reliability diagram not written: {exc}")
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(
        f"n={metrics['n']}  accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
        f"weighted-F1 {metrics['weighted_f1']:.4f}  ECE {metrics['ece']:.4f}  ({modality}, "
        f"{metrics['cpu_precision']})"
    )
    for lab, m in metrics["per_class"].items():
        typer.echo(f"  {lab:9s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  support {m['support']}")
    if "confusion_png" in metrics:
        typer.echo(f"confusion matrix: {metrics['confusion_png']}")
    if "reliability_png" in metrics:
        typer.echo(f"reliability diagram: {metrics['reliability_png']}")


@app.command("calibrate")
def calibrate_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV, as for eval")],
    model: Annotated[
        Path | None, typer.Option(help="the model directory to calibrate (default: the packaged model)")
    ] = None,
    precision: Annotated[
        list[float] | None,
        typer.Option(help="target precision for the alert thresholds (repeatable; default 0.7, 0.8, 0.9)"),
    ] = None,
    columns: Annotated[str | None, typer.Option(help="column mapping, as for train")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print calibration.json's content")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cpu_precision: Annotated[str, typer.Option(help=CPU_PRECISION_HELP)] = "auto",
) -> None:
    """Fit the model's calibration (a temperature on its logits, by NLL) and its per-label alert thresholds by target
    precision on a labelled file; write calibration.json and reliability diagrams into the model directory."""
    torch.set_num_threads(threads)
    targets = tuple(precision) if precision else DEFAULT_PRECISIONS
    if not all(0 < t <= 1 for t in targets):
        _err("--precision must be in (0, 1]")
        raise typer.Exit(2)
    _check_precision(cpu_precision)
    try:
        calibration, directory = calibrate_model(data, model, targets=targets, columns=ColumnMap.parse(columns),
                                                 progress=not json_out, cpu_precision=cpu_precision)
    except ValueError as exc:
        _err(str(exc))
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(calibration.to_dict()))
        return
    m = calibration.metrics
    typer.echo(f"n={m['n']}  temperature {calibration.temperature:.4f}  NLL {m['nll_before']:.4f} -> "
               f"{m['nll_after']:.4f}  ECE {m['ece_before']:.4f} -> {m['ece_after']:.4f}")
    for lab, entries in calibration.thresholds.items():
        for t in entries:
            if t.threshold is None:
                typer.echo(f"  {lab:9s} precision >= {t.target:.2f}: unreachable")
            else:
                typer.echo(f"  {lab:9s} precision >= {t.target:.2f}: p >= {t.threshold:.4f}  (precision "
                           f"{t.precision:.3f}, recall {t.recall:.3f}, {t.alerts} alerts)")
    typer.echo(f"wrote {directory / 'calibration.json'} and the reliability diagrams "
               f"{m['reliability_before']}, {m['reliability_after']}")


@app.command("quantize")
def quantize_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV, as for eval: the model's own training data")],
    model: Annotated[
        Path | None, typer.Option(help="the model directory (default: the packaged model)")
    ] = None,
    calibration_images: Annotated[int, typer.Option(min=1, help="photos the CNN's int8 ranges are taken on")] = 128,
    check_posts: Annotated[
        int, typer.Option(min=0, help="posts scored both ways to measure what int8 keeps (0: all)")
    ] = 0,
    text_fp32_ffn_layers: Annotated[
        int, typer.Option(min=0, help="keep the first K layers' FFN down-projections of the text encoder in fp32")
    ] = Int8Recipe.text_fp32_ffn_layers,
    text_smoothing: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="smooth the text encoder's MatMul inputs into the weights before "
                                                   "int8 (SmoothQuant's alpha; 0: not smoothed)")
    ] = Int8Recipe.text_smoothing,
    folds: Annotated[
        Path | None, typer.Option(help="the fold models a CV kept (mmsent train --folds K --keep-folds: OUT/folds): "
                                       "also measure int8 out of fold, and hold the bar to that")
    ] = None,
    columns: Annotated[str | None, typer.Option(help="column mapping, as for train")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print what int8.json measured as JSON")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
) -> None:
    """Make a model directory ready for int8 on the CPU: take the CNN's activation ranges on the data's photos
    (int8-ranges.json) and the text encoder's on its captions (int8-text-ranges.json), score the data in fp32 and in
    int8, and write what int8 kept (int8.json). MMSENT_CPU_PRECISION=auto then serves int8 where it kept 98% of labels
    and lost at most 0.5 points of accuracy and weighted-F1."""
    torch.set_num_threads(threads)
    try:
        measured = quantize_model(data, model, calibration_images=calibration_images, check_posts=check_posts or None,
                                  recipe=Int8Recipe(text_fp32_ffn_layers, text_smoothing=text_smoothing),
                                  folds=folds, columns=ColumnMap.parse(columns), progress=not json_out, log=_err)
    except ValueError as exc:
        _err(str(exc))
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(measured))
        return
    _echo_compared(f"{measured['posts']} posts, the model itself (in sample where it trained on them)", measured)
    if "out_of_fold" in measured:
        oof = measured["out_of_fold"]
        _echo_compared(f"{oof['posts']} posts out of fold ({oof['folds']} fold models, each on what it never "
                       "trained on)", oof)
        for key in ("accuracy", "weighted_f1"):
            means = oof[f"fold_mean_{key}"]
            typer.echo(f"  mean over folds, {key}: fp32 {100 * means['fp32']:.2f}  int8 {100 * means['int8']:.2f}")
    kept = [part for part, precision in measured["parts"].items() if precision == "int8"]
    typer.echo(f"kept in int8 for MMSENT_CPU_PRECISION=auto: {', '.join(kept) or 'nothing (below the bar)'}")


def _echo_compared(title: str, figures: dict[str, Any]) -> None:
    typer.echo(f"{title}: int8 gives fp32's label for {100 * figures['agreement']:.2f}% (largest probability "
               f"difference {figures['max_probability_difference']:.3f})")
    for name in ("fp32", "int8"):
        m = figures[name]
        per_class = "  ".join(f"{lab} P/R/F1 {c['precision']:.3f}/{c['recall']:.3f}/{c['f1']:.3f}"
                              for lab, c in m["per_class"].items())
        typer.echo(f"  {name}: accuracy {100 * m['accuracy']:.2f}  weighted-F1 {100 * m['weighted_f1']:.2f}  "
                   f"macro-F1 {100 * m['macro_f1']:.2f}  ({per_class})")
    for part, alone in figures.get("alone", {}).items():
        m = alone["int8"]
        typer.echo(f"  only the {part} encoder in int8: {100 * alone['agreement']:.2f}% of fp32's labels, accuracy "
                   f"{100 * m['accuracy']:.2f}  weighted-F1 {100 * m['weighted_f1']:.2f}  macro-F1 "
                   f"{100 * m['macro_f1']:.2f}")


def _check_precision(value: str) -> None:
    if value not in CPU_PRECISIONS:
        _err(f"--cpu-precision must be one of {', '.join(CPU_PRECISIONS)}")
        raise typer.Exit(2)


if __name__ == "__main__":
    app()
