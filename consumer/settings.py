"""Every setting of the consumer, read from `MMSENT_*` environment variables (or a config file).

The names and defaults are the ones `../shared/CONTRACT.md` promises; add, never rename.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)


class ProcessingGuarantee(StrEnum):
    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


class Settings(BaseSettings):
    """The consumer's configuration. Environment variables win over the config file (`MMSENT_CONFIG`)."""

    model_config = SettingsConfigDict(env_prefix="MMSENT_", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_session_timeout_ms: int = Field(
        default=10_000, ge=1_000, le=3_600_000,
        description="A member that stops heartbeating loses its partitions after this long (librdkafka's "
        "session.timeout.ms).",
    )
    kafka_assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = Field(
        default="cooperative-sticky",
        description="cooperative-sticky: a rebalance moves only the partitions that change owner, the others keep "
        "flowing; range or roundrobin: eager, every partition of the group stops at each rebalance.",
    )
    # librdkafka's security settings, each under its own name: kafka_sasl_mechanism becomes sasl.mechanism
    # (consumer.kafkaconfig.client_config). None: librdkafka's default.
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_ssl_certificate_location: str | None = None
    kafka_ssl_key_location: str | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_endpoint_identification_algorithm: str | None = None
    input_topic: str = "posts"
    output_topic: str = "sentiment"
    dlq_topic: str = "sentiment.dlq"
    group_id: str = "mmsent"
    group_instance_id: str | None = Field(
        default=None, description="Static group membership (KIP-345): a restarted member takes its partitions back."
    )
    redis_url: str | None = "redis://localhost:6379/0"
    model: str | None = Field(default=None, description="A model directory or preset name; None: the default.")
    model_max_params: int = Field(
        default=500_000_000, ge=1,
        description="A model (or reload candidate) whose config asks for more parameters is refused before its "
        "weights are read: about 4x the largest preset (`seed`, BERT-base + ResNet-50, ~135 M).",
    )
    model_watch_s: float = Field(
        default=10.0, ge=0,
        description="How often the MMSENT_MODEL directory is checked for a new model (a flipped symlink, new "
        "files), which is then loaded beside the serving one and swapped in; 0: only on SIGHUP.",
    )
    device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the model runs: auto (a GPU when there is one), cpu, cuda or cuda:N.",
    )
    cpu_runtime: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="On a CPU, the frozen encoders run in ONNX Runtime (auto: where they export) or PyTorch.",
    )
    cpu_precision: Literal["auto", "fp32", "int8", "bf16"] = Field(
        default="auto",
        description="On a CPU: the encoders in fp32 or int8 (ONNX Runtime), or bf16 (PyTorch, for a CPU with "
        "AVX512_BF16 or AMX); auto: int8 where the CPU has VNNI or AMX and the model directory says its int8 "
        "accuracy was measured (mmsent quantize), else fp32.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model's calls while it warms up, every shape it will see (CUDA graphs on a "
        "GPU), so that no post waits for a compilation; off: eager.",
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, le=4096,
        description="Posts per micro-batch at most; None: what suits the model's device (256 on a GPU, 32 on the CPU).",
    )
    max_wait_ms: int = Field(default=50, ge=0, le=60_000)
    max_in_flight: int | None = Field(
        default=None, ge=1,
        description="Posts read but not yet committed, at most; None: 8 batches' worth, and at least 256.",
    )
    max_text_chars: int = Field(default=10_000, ge=0)

    fetch_allow_private: bool = False
    fetch_allow_cidrs: Annotated[
        tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode
    ] = ()
    fetch_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    fetch_max_pixels: int = Field(
        default=16_000_000, ge=1,
        description="Decoded pixels per image at most (a larger image is `unavailable`). The model sees 224 px: "
        "16 MP keeps every phone photo and halves the worst case of the old 40 MP.",
    )
    fetch_max_side: int = Field(default=8_192, ge=1)
    decode_pixel_budget: int = Field(
        default=64_000_000, ge=1,
        description="Decoded pixels in flight across the whole process at most: decodes beyond it wait for room, "
        "so a batch of huge images cannot exhaust memory.",
    )
    decode_timeout_s: float = Field(
        default=5.0, gt=0,
        description="One image's decode may take this long; after it the image is `unavailable` (the decode is "
        "abandoned, its pixels still counted in the budget until it ends).",
    )
    fetch_connect_timeout_s: float = Field(default=3.0, gt=0)
    fetch_read_timeout_s: float = Field(default=5.0, gt=0)
    fetch_total_timeout_s: float = Field(default=10.0, gt=0)
    fetch_max_redirects: int = Field(default=3, ge=0, le=10)
    fetch_retries: int = Field(default=2, ge=0, le=10)
    fetch_per_host_concurrency: int = Field(default=8, ge=1)
    fetch_concurrency: int = Field(default=64, ge=1)
    fetch_negative_cache_s: float = Field(default=60.0, ge=0)

    cache_image_ttl_s: int = Field(default=24 * 3600, ge=1)
    cache_embedding_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    cache_max_image_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    cache_secret: SecretStr | None = Field(
        default=None, description="When set, cache entries carry a keyed MAC (HMAC-SHA-256 with this secret): "
        "entries written without it, or with another, are misses.",
    )

    processing_guarantee: ProcessingGuarantee = ProcessingGuarantee.AT_LEAST_ONCE
    transactional_id: str | None = None
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    liveness_stall_s: float = Field(
        default=300.0, gt=0,
        description="/healthz answers 503 when the model stage has made no progress for this long while work "
        "waits, so Kubernetes restarts a hung pod.",
    )

    headers_allow: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="When set, only these input headers are carried to events and dead letters."
    )
    headers_deny: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), description="Input headers never carried to events and dead letters."
    )

    shadow_model: str | None = Field(
        default=None, description="A second model (directory or preset) that scores the same posts, after the "
        "primary; its events go to MMSENT_SHADOW_TOPIC. It never fails the primary.",
    )
    shadow_topic: str | None = None

    alert_topic: str | None = None
    alert_label: str = "negative"
    alert_min_probability: float = Field(default=0.9, ge=0, le=1)
    alert_min_precision: float | None = Field(
        default=None, gt=0, le=1,
        description="Alert when the label's probability reaches the threshold that the model's calibration "
        "(mmsent calibrate) gives for this precision, instead of MMSENT_ALERT_MIN_PROBABILITY.",
    )

    drift_window: int = Field(
        default=2_000, ge=50,
        description="Predictions per model in the sliding window whose label mix and confidence are compared with "
        "the model's reference (mmsent_prediction_drift).",
    )
    feedback_topic: str | None = Field(
        default=None, description="Moderators' verdicts on scored posts, joined to recent events for live alert "
        "precision and recall (mmsent_feedback_total).",
    )
    feedback_memory_posts: int = Field(
        default=100_000, ge=1,
        description="Recent events remembered for joining verdicts (post id -> model and label); older verdicts are "
        "counted as too old.",
    )

    inspect_host: str = Field(default="127.0.0.1", description="Where `mmsent inspect` listens.")
    inspect_port: int = Field(default=8765, ge=0, le=65535, description="`mmsent inspect`'s port (0: a free one).")
    inspect_token: SecretStr | None = Field(
        default=None, description="The token `mmsent inspect` asks for; required when it binds anything but "
        "loopback.",
    )

    log_level: str = "INFO"
    log_json: bool = True

    def batch_limits(self, device_batch_size: int) -> tuple[int, int]:
        """(posts per micro-batch, posts in flight) at most: as set, else the batch size that suits the model's
        device (`Scorer.serving_batch_size`) and room for 8 batches of it: the pipeline holds up to 3 batches and
        the batcher fills the next, and at 32 a batch on the CPU that is the 256 it always was."""
        batch = self.max_batch_size or device_batch_size
        return batch, self.max_in_flight or max(256, 8 * batch)

    @field_validator("fetch_allow_cidrs", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return tuple(ipaddress.ip_network(part, strict=False) for part in value)

    @field_validator("headers_allow", "headers_deny", mode="before")
    @classmethod
    def _parse_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _shadow_needs_both(self) -> Settings:
        if bool(self.shadow_model) != bool(self.shadow_topic):
            raise ValueError("MMSENT_SHADOW_MODEL and MMSENT_SHADOW_TOPIC go together: set both, or neither")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("MMSENT_CONFIG")
        if config_file:
            sources.append(_file_source(settings_cls, Path(config_file)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """A TOML, JSON or YAML file with the same names as the variables, without the prefix, in lower case."""
    if not path.is_file():
        raise FileNotFoundError(f"MMSENT_CONFIG names {path}, which is not a file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    if suffix in {".yaml", ".yml"}:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"MMSENT_CONFIG {path}: use .toml, .json or .yaml")
