"""The training losses both trainers share: class weights for the rare neutral class, cross-entropy or focal loss
with label smoothing and per-row weights, and the head's loss (the label, or the modality pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmsent.model import Features, FusionHead
from mmsent.training.config import TrainConfig

__all__ = ["head_loss", "loss_fn", "make_class_weights"]


def make_class_weights(labels: torch.Tensor, n_classes: int, mode: str) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = torch.bincount(labels[labels >= 0], minlength=n_classes).float().clamp(min=1)
    w = counts.sum() / (n_classes * counts)
    if mode == "sqrt":
        w = w.sqrt()
    elif mode != "balanced":
        raise ValueError(f"class_weights must be none, balanced or sqrt, not {mode!r}")
    return w / (w * counts).sum() * counts.sum()  # mean weight per example stays 1


def loss_fn(
    logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, weights: torch.Tensor | None, sample_w: torch.Tensor
) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, weight=weights, reduction="none", label_smoothing=cfg.label_smoothing)
    if cfg.loss == "focal":
        pt = torch.exp(-F.cross_entropy(logits, y, reduction="none")).clamp(max=1.0)
        ce = (1 - pt) ** cfg.focal_gamma * ce
    elif cfg.loss != "ce":
        raise ValueError(f"loss must be ce or focal, not {cfg.loss!r}")
    return (ce * sample_w).sum() / sample_w.sum().clamp(min=1e-8)


def head_loss(
    head: FusionHead,
    f: Features,
    y: torch.Tensor,
    pairs: torch.Tensor,
    cfg: TrainConfig,
    weights: torch.Tensor | None,
    sample_w: torch.Tensor,
) -> torch.Tensor:
    """The label loss; with a modality-pairs head, rows with both per-modality labels learn the pair instead."""
    out = head.outputs(f)  # one forward: one dropout mask for both losses
    if not head.cfg.modality_pairs:
        return loss_fn(out, y, cfg, weights, sample_w)
    has_pair = pairs >= 0
    label_loss = loss_fn(head.labels_from_pairs(out), y, cfg, weights, sample_w * ~has_pair)
    pair_loss = loss_fn(out, pairs.clamp(min=0), cfg, None, sample_w * has_pair)
    share = has_pair.float().mean()
    return share * pair_loss + (1 - share) * label_loss
