"""`mmsent train` and `mmsent eval` (typer). The root CLI mounts `app`; `python -m mmsent.cli` runs it alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Train and evaluate mmsent models.", no_args_is_help=True, add_completion=False)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV (id, text, label, image path)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model directory to write")],
    preset: Annotated[str, typer.Option(help="default | seed | tiny-random")] = "default",
    fusion: Annotated[str | None, typer.Option(help="concat | gated | attention (default: the preset's)")] = None,
    columns: Annotated[
        str | None, typer.Option(help="e.g. text=review_text,label=sentiment_label,image=image_path")
    ] = None,
    folds: Annotated[int, typer.Option(help="k-fold cross-validation (reports mean ± std); 0 = one split")] = 0,
    epochs: Annotated[int, typer.Option()] = 40,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-3,
    encoder_lr: Annotated[float, typer.Option(help="learning rate of fine-tuned encoder layers")] = 2e-5,
    weight_decay: Annotated[float, typer.Option()] = 0.05,
    loss: Annotated[str, typer.Option(help="ce | focal")] = "ce",
    class_weights: Annotated[str, typer.Option(help="none | balanced | sqrt")] = "sqrt",
    label_smoothing: Annotated[float, typer.Option()] = 0.05,
    patience: Annotated[int, typer.Option(help="early stopping on validation macro-F1")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    hidden: Annotated[int | None, typer.Option(help="fusion layer width")] = None,
    proj_dim: Annotated[int | None, typer.Option()] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    input_dropout: Annotated[float | None, typer.Option()] = None,
    modality_dropout: Annotated[float | None, typer.Option()] = None,
    modality_pairs: Annotated[
        bool,
        typer.Option(help="learn the (text_label, image_label) pair where the data has both (head-only training)"),
    ] = False,
    crop: Annotated[
        bool | None, typer.Option("--crop/--squash", help="center-crop the image or squash all of it (default: preset)")
    ] = None,
    tta: Annotated[
        bool, typer.Option("--tta/--no-tta", help="score the image and its mirror (2x CNN cost), in CV and serving")
    ] = False,
    text_layers: Annotated[int, typer.Option(help="fine-tune the last N text layers (-1: all; 0: frozen)")] = 0,
    image_blocks: Annotated[int, typer.Option(help="fine-tune the last N CNN blocks (-1: all; 0: frozen)")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="do not cache frozen features")] = False,
    extra_text: Annotated[list[Path] | None, typer.Option(help="extra text-only labelled data (repeatable)")] = None,
    extra_weight: Annotated[float, typer.Option(help="loss weight of the extra text-only examples")] = 0.5,
    ensemble: Annotated[int, typer.Option(help="final model: average of N heads (different seeds)")] = 1,
    name: Annotated[str | None, typer.Option(help="model name in SentimentEvent.model")] = None,
    version: Annotated[str | None, typer.Option()] = None,
    half: Annotated[bool, typer.Option("--half", help="store the trained weights in float16")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from DIR/train_state.pt")] = False,
    bert: Annotated[str | None, typer.Option(help="seed preset: bert-base-uncased directory")] = None,
    resnet50: Annotated[str | None, typer.Option(help="seed preset: ResNet-50 state-dict file")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Train a model directory on a labelled file."""
    from dataclasses import replace

    import torch

    from mmsent.data import ColumnMap, load_examples
    from mmsent.presets import preset_config
    from mmsent.scorer import _from_config
    from mmsent.train import TrainConfig, train_model

    torch.set_num_threads(threads)
    kwargs: dict[str, object] = {}
    if preset == "seed":
        kwargs.update(bert=bert, resnet50=resnet50)
    head_kw = {
        k: v
        for k, v in {
            "fusion": fusion,
            "hidden": hidden,
            "proj_dim": proj_dim,
            "dropout": dropout,
            "input_dropout": input_dropout,
            "modality_dropout": modality_dropout,
            "modality_pairs": modality_pairs or None,
        }.items()
        if v is not None
    }
    cfg = preset_config(preset, **kwargs, **head_kw)
    changes: dict[str, object] = {}
    if text_layers or image_blocks:
        changes.update(text_trainable_layers=text_layers, image_trainable_blocks=image_blocks)
    if name:
        changes["name"] = name
    if version:
        changes["version"] = version
    preprocess = cfg.image.preprocess if crop is None else replace(cfg.image.preprocess, crop=crop)
    changes["image"] = replace(cfg.image, tta_flip=tta, preprocess=preprocess)
    cfg = replace(cfg, **changes)  # type: ignore[arg-type]
    model = _from_config(cfg).train()
    tc = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        encoder_lr=encoder_lr,
        weight_decay=weight_decay,
        loss=loss,
        class_weights=class_weights,
        label_smoothing=label_smoothing,
        patience=patience,
        seed=seed,
        folds=folds,
        cache_features=not no_cache,
        extra_weight=extra_weight,
        threads=threads,
        progress=not quiet,
        ensemble=ensemble,
        tta=tta,
    )
    cmap = ColumnMap.parse(columns)
    examples = load_examples(data, cfg.labels, cmap)
    extra = [ex for p in (extra_text or []) for ex in load_examples(p, cfg.labels)]
    extra = [replace(ex, image=None, pair=None) for ex in extra]  # text-only
    cfg_extra = {"command": " ".join(["mmsent train", *sys.argv[2:]]) if len(sys.argv) > 2 else "mmsent train"}
    model.cfg = replace(model.cfg, extra={**model.cfg.extra, **cfg_extra})
    train_model(model, examples, out, tc, extra_text=extra, resume=resume, log=_err, half=half)


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Argument(help="labelled JSONL or CSV")],
    model: Annotated[str | None, typer.Option(help="model directory or preset (default: the packaged model)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    modality: Annotated[str, typer.Option(help="text | image | both")] = "both",
    columns: Annotated[str | None, typer.Option(help="column mapping, as for train")] = None,
    confusion_png: Annotated[Path | None, typer.Option(help="write the confusion matrix PNG here")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
) -> None:
    """Evaluate a model on a labelled file: accuracy, macro/weighted F1, per-class P/R/F1, ECE."""
    import torch

    from mmsent.data import ColumnMap
    from mmsent.evaluate import evaluate_file, plot_confusion

    torch.set_num_threads(threads)
    if modality not in ("text", "image", "both"):
        _err("--modality must be text, image or both")
        raise typer.Exit(2)
    metrics = evaluate_file(data, model, modality=modality, columns=ColumnMap.parse(columns), progress=not json_out)
    labels = list(metrics["per_class"])
    png = confusion_png or Path(data).with_name(Path(data).stem + f".confusion-{modality}.png")
    try:
        metrics["confusion_png"] = str(plot_confusion(metrics["confusion_matrix"], labels, png, title=f"{modality}"))
    except OSError as exc:  # a read-only data folder must not fail the evaluation
        _err(f"confusion matrix not written: {exc}")
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    typer.echo(
        f"n={metrics['n']}  accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
        f"weighted-F1 {metrics['weighted_f1']:.4f}  ECE {metrics['ece']:.4f}  ({modality})"
    )
    for lab, m in metrics["per_class"].items():
        typer.echo(f"  {lab:9s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  support {m['support']}")
    if "confusion_png" in metrics:
        typer.echo(f"confusion matrix: {metrics['confusion_png']}")


if __name__ == "__main__":
    app()
