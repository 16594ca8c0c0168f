"""The multimodal sentiment model, in one file.

    text  --TextEncoder-->  tokens (B, T, H) --pool--> text feature  (B, Dt)   Dt = H or 2H (cls+mean)
    image --ImageEncoder--> regions (B, R, C) --mean--> image feature (B, Di)  Di = C
                     \\__________________ FusionHead ___________________/
                                          |
                                   logits (B, n_classes)

Fusions (HeadConfig.fusion):
  concat    the tutorial's head: [text; image] -> Linear(Dt+Di, hidden) -> ReLU -> Dropout -> Linear(hidden, K)
  gated     gated multimodal unit: z = sigmoid(W[t; i]); h = z * tanh(t') + (1 - z) * tanh(i') -> MLP
  attention cross-modal attention: text tokens attend to image regions and image regions attend to text tokens,
            each side pooled, concatenated -> MLP

A missing modality is never zeros: it is replaced by a *learned* embedding (one per modality, and one token per
modality for the attention fusion). Modality dropout during training (`modality_dropout`) drops the text or the
image of complete posts so that these learned paths are trained: a post without an image is scored by a learned
text-only path, a post without text by an image-only path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mmsent.encoders import ImageEncoder, ImageSpec, TextEncoder, TextSpec, masked_mean, meta_count, stacked_count

LABELS: tuple[str, str, str] = ("negative", "neutral", "positive")
FORMAT = "mmsent-model/1"
FUSIONS = ("concat", "gated", "attention")

# Modality pairs (MVSA's labelling rule): annotators label the text and the image separately; the post's label is
# the one that is not neutral (neutral when both are), and posts whose text and image disagree in polarity are
# left out. A head that predicts the pair learns from both annotations and sums the pairs into the post's label.
MODALITY_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (t, i) for t in range(3) for i in range(3) if {LABELS[t], LABELS[i]} != {"negative", "positive"}
)  # 7 (text label, image label) index pairs


class RefusalReason(StrEnum):
    """Why a model is refused, a stable code for logs and metrics. The checks run in this order, each before the
    work that the next one would waste or the harm it would do (`MMSentModel.load`, `Scorer.load`)."""

    MODEL_MISSING = "model_missing"  # no model directory there (a dangling link, no config.json)
    BAD_CONFIG = "bad_config"  # config.json unreadable, or not a model this code builds
    TOO_MANY_PARAMETERS = "too_many_parameters"  # over the budget: refused before any weight is read
    UNREADABLE_WEIGHTS = "unreadable_weights"  # model.safetensors missing or not a safetensors file
    WEIGHTS_MISMATCH = "weights_mismatch"  # tensors this model does not have, or head weights it lacks
    WRONG_SHAPES = "wrong_shapes"  # a tensor of another shape than the model's (from the file's header)
    NON_FINITE_WEIGHTS = "non_finite_weights"  # NaN or infinite values in the loaded weights
    BAD_CALIBRATION = "bad_calibration"  # calibration.json unreadable, or non-finite temperature or thresholds
    NON_FINITE_SCORES = "non_finite_scores"  # probe posts scored NaN or infinite (consumer/rollout.py)
    SCORES_OUT_OF_RANGE = "scores_out_of_range"  # probe scores outside [0, 1] or not summing to 1
    LOAD_FAILED = "load_failed"  # anything else a loader raised


class ModelRefused(ValueError):
    """A model that must not serve, with the reason's stable code (`reason`) and what was found (`detail`)."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"model refused ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail


def pair_label(text_label: int, image_label: int) -> int:
    """The post's label under the rule above: the non-neutral of the two."""
    return image_label if LABELS[text_label] == "neutral" else text_label


# ---------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HeadConfig:
    text_dim: int  # pooled text feature width Dt
    image_dim: int  # image region/pooled feature width Di (= C)
    text_token_dim: int = 0  # per-token text width H (attention fusion); 0 -> text_dim
    fusion: str = "concat"  # one of FUSIONS
    proj_dim: int = 0  # concat: 0 = raw concatenation (tutorial); gated/attention: shared width (0 -> 256)
    hidden: int = 512  # the fusion layer
    dropout: float = 0.3
    input_dropout: float = 0.0  # dropout on the encoder features (strong regularisation for frozen features)
    n_classes: int = 3
    modality_dropout: float = 0.15  # P(drop the text) = P(drop the image) per training post with both
    heads: int = 4  # attention heads
    layer_norm: bool = False  # LayerNorm on the incoming features
    modality_pairs: bool = False  # predict the (text label, image label) pair and sum into the label (see above)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.modality_pairs and self.n_classes != 3:
            raise ValueError("modality_pairs needs the three labels negative, neutral, positive")

    @property
    def n_outputs(self) -> int:
        return len(MODALITY_PAIRS) if self.modality_pairs else self.n_classes

    @property
    def needs_regions(self) -> bool:
        return self.fusion == "attention"


@dataclass(frozen=True)
class ModelConfig:
    text: TextSpec
    image: ImageSpec
    head: HeadConfig
    labels: tuple[str, ...] = LABELS
    name: str = "mmsent"
    version: str = "0"
    text_trainable_layers: int = 0  # fine-tuning: last N transformer layers trainable (-1: all)
    image_trainable_blocks: int = 0  # fine-tuning: last N CNN blocks trainable (-1: all)
    ensemble: int = 1  # >1: the head is an average of this many FusionHeads (same config, different seeds)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (training command, CV scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "text_encoder": asdict(self.text),
            "image_encoder": self.image.to_dict(),
            "head": asdict(self.head),
            "text_trainable_layers": self.text_trainable_layers,
            "image_trainable_blocks": self.image_trainable_blocks,
            "ensemble": self.ensemble,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("format") != FORMAT:
            raise ValueError(f"not an {FORMAT} config (format={d.get('format')!r})")
        return cls(
            text=TextSpec(**d["text_encoder"]),
            image=ImageSpec.from_dict(d["image_encoder"]),
            head=HeadConfig(**d["head"]),
            labels=tuple(d["labels"]),
            name=d.get("name", "mmsent"),
            version=str(d.get("version", "0")),
            text_trainable_layers=int(d.get("text_trainable_layers", 0)),
            image_trainable_blocks=int(d.get("image_trainable_blocks", 0)),
            ensemble=int(d.get("ensemble", 1)),
            extra=dict(d.get("extra", {})),
        )


# -------------------------------------------------------------------------------------------------------- features
class Features(NamedTuple):
    """What the fusion head sees. Rows whose modality is absent may hold anything there (it is replaced)."""

    text: torch.Tensor  # (B, Dt) pooled text
    image: torch.Tensor  # (B, Di) pooled image
    has_text: torch.Tensor  # (B,) bool
    has_image: torch.Tensor  # (B,) bool
    text_tokens: torch.Tensor | None = None  # (B, T, H)    attention fusion only
    text_mask: torch.Tensor | None = None  # (B, T) 1 = real token
    image_regions: torch.Tensor | None = None  # (B, R, C)  attention fusion only


def modality_dropout(has_text: torch.Tensor, has_image: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the text (prob p) or the image (prob p) of posts that have both; never both at once."""
    both = has_text & has_image
    u = torch.rand(has_text.shape, device=has_text.device)
    drop_text = both & (u < p)
    drop_image = both & (u >= p) & (u < 2 * p)
    return has_text & ~drop_text, has_image & ~drop_image


# ----------------------------------------------------------------------------------------------------------- head
class FusionHead(nn.Module):
    pair_to_label: torch.Tensor  # (P, K) buffer: which label each modality pair sums into

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dt, di = cfg.text_dim, cfg.image_dim
        self.missing_text = nn.Parameter(torch.randn(dt) * 0.02)  # learned text-absent feature (Dt,)
        self.missing_image = nn.Parameter(torch.randn(di) * 0.02)  # learned image-absent feature (Di,)
        self.norm_text: nn.Module = nn.LayerNorm(dt) if cfg.layer_norm else nn.Identity()
        self.norm_image: nn.Module = nn.LayerNorm(di) if cfg.layer_norm else nn.Identity()
        self.in_drop = nn.Dropout(cfg.input_dropout)
        d = cfg.proj_dim or 256
        self.proj_text: nn.Module = nn.Identity()
        self.proj_image: nn.Module = nn.Identity()
        if cfg.fusion == "concat":
            if cfg.proj_dim:
                self.proj_text, self.proj_image = nn.Linear(dt, d), nn.Linear(di, d)
                fused_dim = 2 * d
            else:
                fused_dim = dt + di  # tutorial: 768 + 2048 = 2816
        elif cfg.fusion == "gated":
            self.proj_text, self.proj_image = nn.Linear(dt, d), nn.Linear(di, d)
            self.gate = nn.Linear(dt + di, d)
            fused_dim = d
        else:  # attention
            h = cfg.text_token_dim or dt
            self.tok_text, self.tok_image = nn.Linear(h, d), nn.Linear(di, d)
            self.missing_text_token = nn.Parameter(torch.randn(d) * 0.02)  # (d,)
            self.missing_image_token = nn.Parameter(torch.randn(d) * 0.02)
            self.t2i = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.i2t = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
            self.ln_text, self.ln_image = nn.LayerNorm(d), nn.LayerNorm(d)
            self.proj_text, self.proj_image = nn.Linear(dt, d), nn.Linear(di, d)
            fused_dim = 4 * d  # [attended text; attended image; pooled text; pooled image]
        self.mlp = nn.Sequential(
            nn.Linear(fused_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.n_outputs)
        )
        pair_to_label = torch.zeros(len(MODALITY_PAIRS), cfg.n_classes)  # (P, K) 0/1
        for k, (t, i) in enumerate(MODALITY_PAIRS):
            pair_to_label[k, pair_label(t, i)] = 1.0
        self.register_buffer("pair_to_label", pair_to_label, persistent=False)

    def forward(self, f: Features) -> torch.Tensor:
        """Logits over the labels (B, K); with modality pairs, log-probabilities (valid logits)."""
        out = self.outputs(f)
        return self.labels_from_pairs(out) if self.cfg.modality_pairs else out

    def labels_from_pairs(self, pair_logits: torch.Tensor) -> torch.Tensor:
        """(B, P) pair logits -> (B, K) label log-probabilities: P(label) = sum of its pairs' probabilities."""
        probs = F.softmax(pair_logits.float(), -1) @ self.pair_to_label  # (B, K)
        return torch.log(probs.clamp(min=1e-12)).to(pair_logits.dtype)

    def outputs(self, f: Features) -> torch.Tensor:
        """The raw outputs: label logits (B, K), or pair logits (B, P) with modality pairs."""
        cfg = self.cfg
        has_t, has_i = f.has_text.bool(), f.has_image.bool()
        if self.training and cfg.modality_dropout > 0:
            has_t, has_i = modality_dropout(has_t, has_i, cfg.modality_dropout)
        t = torch.where(has_t[:, None], f.text, self.missing_text.to(f.text.dtype))  # (B, Dt)
        i = torch.where(has_i[:, None], f.image, self.missing_image.to(f.image.dtype))  # (B, Di)
        t, i = self.in_drop(self.norm_text(t)), self.in_drop(self.norm_image(i))
        if cfg.fusion == "concat":
            fused = torch.cat([self.proj_text(t), self.proj_image(i)], dim=-1)  # (B, Dt+Di) or (B, 2d)
        elif cfg.fusion == "gated":
            z = torch.sigmoid(self.gate(torch.cat([t, i], dim=-1)))  # (B, d)
            fused = z * torch.tanh(self.proj_text(t)) + (1 - z) * torch.tanh(self.proj_image(i))  # (B, d)
        else:
            fused = torch.cat([*self._cross(f, has_t, has_i), self.proj_text(t), self.proj_image(i)], dim=-1)
        return self.mlp(fused)  # (B, K) or (B, P)

    def _cross(self, f: Features, has_t: torch.Tensor, has_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if f.text_tokens is None or f.text_mask is None or f.image_regions is None:
            raise ValueError("the attention fusion needs text tokens and image regions")
        tt = self.tok_text(f.text_tokens)  # (B, T, d)
        ii = self.tok_image(f.image_regions)  # (B, R, d)
        tmask = f.text_mask.bool()  # (B, T)
        imask = torch.ones(ii.shape[:2], dtype=torch.bool, device=ii.device)  # (B, R)
        # an absent modality becomes a single learned token (the other positions are masked out)
        first_t = torch.zeros_like(tmask)
        first_t[:, 0] = True
        first_i = torch.zeros_like(imask)
        first_i[:, 0] = True
        tt = torch.where(has_t[:, None, None], tt, self.missing_text_token.to(tt.dtype))
        ii = torch.where(has_i[:, None, None], ii, self.missing_image_token.to(ii.dtype))
        tmask = torch.where(has_t[:, None], tmask, first_t)
        imask = torch.where(has_i[:, None], imask, first_i)
        t_att, _ = self.t2i(tt, ii, ii, key_padding_mask=~imask, need_weights=False)  # text queries image (B,T,d)
        i_att, _ = self.i2t(ii, tt, tt, key_padding_mask=~tmask, need_weights=False)  # image queries text (B,R,d)
        tt = self.ln_text(tt + t_att)
        ii = self.ln_image(ii + i_att)
        return masked_mean(tt, tmask), masked_mean(ii, imask)  # (B, d), (B, d)


class HeadEnsemble(nn.Module):
    """The mean of several heads' probabilities, returned as log-probabilities (valid logits)."""

    def __init__(self, heads: list[FusionHead]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.cfg = heads[0].cfg

    def forward(self, f: Features) -> torch.Tensor:
        probs = torch.stack([F.softmax(h(f), -1) for h in self.heads]).mean(0)  # (B, K)
        return torch.log(probs.clamp(min=1e-12))


def make_head(cfg: ModelConfig) -> nn.Module:
    if cfg.ensemble > 1:
        return HeadEnsemble([FusionHead(cfg.head) for _ in range(cfg.ensemble)])
    return FusionHead(cfg.head)


def parameter_count(cfg: ModelConfig) -> int:
    """The parameters a model of `cfg` has, counted from the config alone on the meta device: no weight is read, no
    tensor allocated, and a stack of layers or heads counts as fast whatever its depth."""
    head = stacked_count(lambda n: meta_count(lambda: make_head(replace(cfg, ensemble=n))), max(1, cfg.ensemble))
    return cfg.text.parameter_count() + cfg.image.parameter_count() + head


def check_parameter_budget(cfg: ModelConfig, max_params: int) -> None:
    """Refuse (`too_many_parameters`) a config whose model would have more than `max_params` parameters."""
    try:
        count = parameter_count(cfg)
    except Exception as exc:  # a config that does not build (unknown arch, inconsistent sizes) builds no model
        raise ModelRefused(RefusalReason.BAD_CONFIG, f"{cfg.name}: cannot count its parameters: {exc!r}") from exc
    if count > max_params:
        raise ModelRefused(RefusalReason.TOO_MANY_PARAMETERS,
                           f"{cfg.name}: its config asks for {count:,} parameters, over the budget of {max_params:,}")


# ----------------------------------------------------------------------------------------------------- full model
class Batch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) padded to the longest text in the batch
    attention_mask: torch.Tensor  # (B, T)
    has_text: torch.Tensor  # (B,) bool
    has_image: torch.Tensor  # (B,) bool
    pixels: torch.Tensor | None = None  # (B, 3, S, S), rows without an image are zeros
    image_emb: torch.Tensor | None = None  # (B, R, C) precomputed image embeddings (cache), instead of pixels
    labels: torch.Tensor | None = None  # (B,)
    pairs: torch.Tensor | None = None  # (B,) index into MODALITY_PAIRS, -100 where the row has none
    # Training on the CPU from cached activations (features.ActivationSet): what enters the tuned layers, instead
    # of input_ids (then ignored, only attention_mask counts) and of pixels.
    text_states: torch.Tensor | None = None  # (B, T, H) entering the last text_trainable_layers layers
    image_map: torch.Tensor | None = None  # (B, C, h, w) entering the last image_trainable_blocks blocks


class MMSentModel(nn.Module):
    """The encoders and the fusion head, one forward path for training, evaluation and scoring:

        input_ids, attention_mask --encode_text--> token states (B, T, H), pooled text (B, Dt) --+
        pixels (or image_emb) -----image_emb-----> image embeddings (B, R, C) -------------------+
                                                   features_from --> Features --head--> logits (B, K)

    `features_from` turns encoder outputs into the head's inputs. A caller that runs the encoders its own way (the
    Scorer: embeddings from its cache, captions in length buckets) hands their outputs to it, so that everything
    after the encoders is the code that training ran."""

    def __init__(self, cfg: ModelConfig) -> None:
        """The encoders and head `cfg` names."""
        super().__init__()
        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg.text)
        self.image_encoder = ImageEncoder(cfg.image)
        self.text_encoder.set_trainable(cfg.text_trainable_layers)
        self.image_encoder.set_trainable(cfg.image_trainable_blocks)
        self.head = make_head(cfg)

    # --- encoders -------------------------------------------------------------------------------------------
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> image embedding (B, R, C); R = 1 (pooled) unless the head attends to regions."""
        regions = self.image_encoder(pixels)  # (B, R, C)
        return regions if self.cfg.head.needs_regions else regions.mean(1, keepdim=True)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> token states (B, T, H) and pooled text (B, Dt)."""
        tokens = self.text_encoder(input_ids, attention_mask)  # (B, T, H)
        return tokens, self.text_encoder.pool(tokens, attention_mask)

    def image_emb(self, b: Batch, like: torch.Tensor) -> torch.Tensor:
        """The batch's image embeddings (B, R, C): brought along, or the CNN's on the rows that have an image (the
        others are zeros, which the head replaces by its learned missing-image feature)."""
        if b.image_emb is not None:
            return b.image_emb
        if b.image_map is not None:  # cached below the tuned blocks: only those run
            regions = self.image_encoder.map_through(b.image_map, self.cfg.image_trainable_blocks).flatten(2)
            regions = regions.transpose(1, 2)  # (B, R, C)
            return regions if self.cfg.head.needs_regions else regions.mean(1, keepdim=True)
        emb = torch.zeros(len(b.has_image), *self.embedding_shape(), dtype=like.dtype, device=like.device)
        if b.pixels is not None:
            idx = b.has_image.nonzero().flatten()
            if len(idx):  # the CNN runs on the rows that have an image only
                emb[idx] = self.embed_pixels(b.pixels[idx]).to(like.dtype)
        return emb

    def features(self, b: Batch) -> Features:
        if b.text_states is None:
            tokens, text = self.encode_text(b.input_ids, b.attention_mask)
        else:  # cached below the tuned layers: only those run
            tokens = self.text_encoder.states_through(b.text_states, b.attention_mask, self.cfg.text_trainable_layers)
            text = self.text_encoder.pool(tokens, b.attention_mask)
        return self.features_from(text, self.image_emb(b, text), b.has_text, b.has_image, tokens, b.attention_mask)

    def features_from(self, text: torch.Tensor, image_emb: torch.Tensor, has_text: torch.Tensor,
                      has_image: torch.Tensor, tokens: torch.Tensor | None = None,
                      text_mask: torch.Tensor | None = None) -> Features:
        """Encoder outputs -> the head's inputs: pooled text (B, Dt), image embeddings (B, R, C), and for the
        attention fusion the token states (B, T, H) with their mask (B, T); other fusions may pass None for them."""
        need = self.cfg.head.needs_regions
        emb = image_emb.to(text.dtype)  # (B, R, C)
        return Features(
            text=text,
            image=emb.mean(1),
            has_text=has_text,
            has_image=has_image,
            text_tokens=tokens if need else None,
            text_mask=text_mask if need else None,
            image_regions=emb if need else None,
        )

    def embedding_shape(self) -> tuple[int, int]:
        """The shape of one image embedding: (1, C) pooled, or (R, C) regions for the attention fusion."""
        if not self.cfg.head.needs_regions:
            return (1, self.image_encoder.out_dim)
        cached: tuple[int, int] | None = getattr(self, "_emb_shape_cache", None)
        if cached is not None:
            return cached
        s = self.cfg.image.preprocess.size
        with torch.no_grad():
            was = self.image_encoder.training
            self.image_encoder.eval()
            dev = next(self.image_encoder.parameters()).device
            r = self.image_encoder(torch.zeros(1, 3, s, s, device=dev)).shape[1]
            self.image_encoder.train(was)
        self._emb_shape_cache = (int(r), self.image_encoder.out_dim)
        return self._emb_shape_cache

    def forward(self, b: Batch) -> torch.Tensor:
        return self.head(self.features(b))  # (B, K)

    # --- persistence ----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head, plus the encoder parameters that were trained (frozen ones come from their references)."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for prefix, enc in (("text_encoder.", self.text_encoder), ("image_encoder.", self.image_encoder)):
            for k, p in enc.named_parameters():
                if p.requires_grad:
                    state[prefix + k] = p.detach()
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save(self, directory: str | Path, *, half: bool = False) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state()
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
        (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str) + "\n")
        (out / "labels.json").write_text(json.dumps(list(self.cfg.labels)) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path, *, map_location: str = "cpu", max_params: int | None = None) -> MMSentModel:
        """A saved model directory, checked before it can serve; a failed check raises `ModelRefused`:

            config.json ──read──▶ ModelConfig ──parameter count (meta device) <= max_params──▶ the model built
              ──model.safetensors' header: its names and shapes the model's──▶ the tensors read and loaded
              ──every weight finite──▶ the model (eval mode)
        """
        d = Path(directory)
        cfg = read_config(d)
        if max_params is not None:
            check_parameter_budget(cfg, max_params)
        try:
            model = cls(cfg)
        except Exception as exc:  # an encoder reference that does not resolve, sizes that do not fit together
            raise ModelRefused(RefusalReason.BAD_CONFIG, f"{d}: its config builds no model: {exc!r}") from exc
        own = model.state_dict()
        state = _read_weights(d / "model.safetensors", own, map_location)
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        _check_finite(d, model)
        return model.eval()


def read_config(directory: Path) -> ModelConfig:
    """A model directory's config.json; `bad_config` when it cannot be read or describes no model."""
    try:
        return ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except Exception as exc:  # unreadable, not JSON, missing or mistyped fields: whatever a file can hold
        raise ModelRefused(RefusalReason.BAD_CONFIG, f"{directory}/config.json: {exc!r}") from exc


def _read_weights(path: Path, own: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after its header (names and shapes, read without the data) matched the
    model's `own` state: a file of the wrong shapes is refused with what differs, before any tensor is read."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            _check_names_and_shapes(path, shapes, own)
            return {k: f.get_tensor(k) for k in shapes}
    except (OSError, SafetensorError) as exc:
        raise ModelRefused(RefusalReason.UNREADABLE_WEIGHTS, f"{path}: {exc!r}") from exc


def _check_names_and_shapes(path: Path, shapes: dict[str, tuple[int, ...]], own: dict[str, torch.Tensor]) -> None:
    unknown = [k for k in shapes if k not in own]
    if unknown:
        raise ModelRefused(RefusalReason.WEIGHTS_MISMATCH, f"{path} has tensors this model does not: {unknown[:5]}")
    missing_head = [k for k in own if k.startswith("head.") and k not in shapes]
    if missing_head:
        raise ModelRefused(RefusalReason.WEIGHTS_MISMATCH, f"{path} lacks head weights: {missing_head[:5]}")
    wrong = [f"{k}: {list(shape)} in the file, {list(own[k].shape)} in the model"
             for k, shape in shapes.items() if shape != tuple(own[k].shape)]
    if wrong:
        raise ModelRefused(RefusalReason.WRONG_SHAPES, f"{path}: {len(wrong)} tensors of the wrong shape: "
                           + "; ".join(wrong[:3]))


def _check_finite(directory: Path, model: nn.Module) -> None:
    """Every floating weight and buffer finite: a NaN weight makes NaN scores for every post that meets it."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelRefused(RefusalReason.NON_FINITE_WEIGHTS,
                           f"{directory}: {len(bad)} tensors hold NaN or infinite values: {bad[:5]}")
