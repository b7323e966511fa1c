"""Settings: one typed, frozen object from the environment over ``config/pipeline.yaml``.

Precedence, highest first: keyword overrides given to :func:`load_settings`,
environment variables (``PIPELINE_*``, nested with ``__`` such as
``PIPELINE_AGGREGATE__WINDOW_S=30``; ``KAFKA_BOOTSTRAP_SERVERS``), the YAML file
(``PIPELINE_CONFIG`` or ``config/pipeline.yaml``), the defaults below.

Invalid settings raise :class:`pipeline.errors.ConfigError` with one line that
names the setting.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError

STAGE_IDS: tuple[str, ...] = ("ingest", "parse", "enrich", "aggregate")

_REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "pipeline.yaml"
_config_path: ContextVar[Path | None] = ContextVar("pipeline_config_path", default=None)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicSpec(_Frozen):
    partitions: int = Field(ge=1, le=10_000)
    retention_ms: int | None = Field(default=None, ge=-1)
    compacted: bool = False

    def kafka_config(self) -> dict[str, str]:
        config: dict[str, str] = {}
        if self.compacted:
            config["cleanup.policy"] = "compact"
        if self.retention_ms is not None:
            config["retention.ms"] = str(self.retention_ms)
        return config


class RetryPolicy(_Frozen):
    """Bounded retries of :class:`~pipeline.errors.RetryableError` through ``topic``.

    Attempt ``n`` (1-based) waits ``min(backoff_s * 2**(n-1), backoff_max_s)``;
    after ``max_attempts`` failed attempts the record is dead-lettered.
    """

    topic: str
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)

    def delay_s(self, attempts: int) -> float:
        return float(min(self.backoff_s * 2 ** max(0, attempts - 1), self.backoff_max_s))


class DlqBudget(_Frozen):
    """When a stage dead-letters too much it stops instead (see :mod:`dlq.budget`).

    Tripped when, over the last ``window_records`` inputs (once at least
    ``min_records`` were seen), more than ``max_ratio`` of them were dead-lettered,
    or when ``max_consecutive`` inputs in a row were. ``enabled: false`` turns it off.
    """

    enabled: bool = True
    window_records: int = Field(default=1000, ge=1)
    min_records: int = Field(default=200, ge=1)
    max_ratio: float = Field(default=0.5, gt=0, le=1)
    max_consecutive: int = Field(default=500, ge=1)


class StageSpec(_Frozen):
    inputs: tuple[str, ...] = Field(min_length=1)
    output: str
    dlq: str
    registry_topic: str | None = None
    state_topic: str | None = None
    retry: RetryPolicy | None = None
    dlq_budget: DlqBudget = DlqBudget()
    #: the backfill lane this stage also consumes (pipeline.backfill): its own topic,
    #: so a backfill never sits in front of live records; live inputs go first
    backfill_lane: str | None = None


class IngestSettings(_Frozen):
    max_payload_bytes: int = Field(default=65536, ge=64)
    dedup_window_s: float = Field(default=600.0, gt=0)
    dedup_max_keys: int = Field(default=200_000, ge=1)


class MetricRange(_Frozen):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> MetricRange:
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class ParseSettings(_Frozen):
    min_ts_ms: int = 946_684_800_000
    max_future_ms: int = Field(default=86_400_000, ge=0)
    ranges: dict[str, MetricRange] = Field(default_factory=dict)


class AggregateSettings(_Frozen):
    window_s: int = Field(default=60, ge=1)
    allowed_lateness_s: int = Field(default=10, ge=0)
    idle_timeout_s: float = Field(default=5.0, gt=0)
    #: how long (event time) an emitted window remembers its readings' lineage ids,
    #: so a re-delivered or replayed reading is a duplicate, not ``late``;
    #: default: one window length. Memory grows with it (ids of every emitted window).
    closed_retention_s: int | None = Field(default=None, ge=0)
    #: allowed lateness inside one backfill run (its own watermark, its windows all
    #: close at the run's end-of-input): a bounded batch can afford to wait longer
    backfill_lateness_s: int = Field(default=3600, ge=0)


class BackfillSettings(_Frozen):
    """The orchestrated backfill controller (pipeline.backfill)."""

    #: durable run state (one compacted topic, keyed by run id)
    runs_topic: str | None = None
    #: the stage a run enters by default: its ``backfill_lane`` topic
    entry_stage: str = "parse"
    chunk_size: int = Field(default=5000, ge=1, le=1_000_000)
    #: rows per second the controller produces; 0: no limit
    rate: float = Field(default=5000.0, ge=0)
    #: the run FAILs when a stage on the way makes no progress for this long
    stall_timeout_s: float = Field(default=300.0, gt=0)


class RunnerSettings(_Frozen):
    batch_max_records: int = Field(default=2000, ge=1)
    commit_interval_s: float = Field(default=1.0, gt=0)
    session_timeout_s: float = Field(default=10.0, ge=1)
    #: /healthz fails when one batch (or the event loop) is stuck for this long
    liveness_timeout_s: float = Field(default=60.0, gt=0)
    #: how often a worker samples its consumer lag for the lag gauge
    lag_interval_s: float = Field(default=5.0, gt=0)
    #: how long a starting worker waits for the broker before exiting (code 3)
    connect_timeout_s: float = Field(default=60.0, gt=0)
    #: how long a Fetch may wait for data (Kafka's default; Faust alone used 1500)
    fetch_max_wait_ms: int = Field(default=500, ge=1, le=30_000)
    #: the longest a backfill-lane batch waits for live input to drain first
    backfill_max_defer_s: float = Field(default=5.0, ge=0)


class OpenLineageSettings(_Frozen):
    """Dataset lineage: OpenLineage run events of each stage worker (pipeline.openlineage).

    ``transport``: ``file`` (default) appends one JSON line per event to ``file_path``
    (default ``<tempdir>/openlineage-<app_prefix>.jsonl``: the only writable place of a
    worker with a read-only root filesystem); ``console`` logs each event;
    ``http`` posts it to ``url`` + ``endpoint`` (a Marquez-like backend); ``none`` emits
    nothing. A failed emission logs one warning; it never stops a worker.
    """

    transport: Literal["none", "console", "file", "http"] = "file"
    #: the jobs' namespace; default: app_prefix
    namespace: str | None = Field(default=None, min_length=1)
    file_path: str | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, pattern=r"^https?://[^/\s]+")
    endpoint: str = "api/v1/lineage"
    api_key: SecretStr | None = None
    #: per HTTP request (connect, then read); no retries
    timeout_s: float = Field(default=2.0, gt=0, le=30)

    @model_validator(mode="after")
    def _http_needs_url(self) -> OpenLineageSettings:
        if self.transport == "http" and self.url is None:
            raise ValueError("transport 'http' needs a 'url'")
        return self


class Settings(BaseSettings):
    """Everything a process of the pipeline needs to know, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None

    app_prefix: str = "iot-pipeline"
    #: where stages write record lineage hops (pipeline.lineage); none: no hops
    lineage_topic: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: str = "info"
    #: crash point for tests (pipeline.failpoints): ``<name>[:<n>]``; unset in production
    failpoint: str | None = None

    topics: dict[str, TopicSpec]
    stages: dict[str, StageSpec]
    ingest: IngestSettings = IngestSettings()
    parse: ParseSettings = ParseSettings()
    aggregate: AggregateSettings = AggregateSettings()
    runner: RunnerSettings = RunnerSettings()
    openlineage: OpenLineageSettings = OpenLineageSettings()
    backfill: BackfillSettings = BackfillSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        unknown = sorted(set(self.stages) - set(STAGE_IDS))
        if unknown:
            raise ValueError(f"unknown stage id(s) {unknown}; known: {list(STAGE_IDS)}")
        missing = [s for s in STAGE_IDS if s not in self.stages]
        if missing:
            raise ValueError(f"stage(s) {missing} are not declared under 'stages'")
        for stage_id, spec in self.stages.items():
            for topic in (
                *spec.inputs,
                spec.output,
                spec.dlq,
                spec.registry_topic,
                spec.state_topic,
                spec.retry.topic if spec.retry else None,
                spec.backfill_lane,
            ):
                if topic is not None and topic not in self.topics:
                    raise ValueError(
                        f"stage {stage_id!r} uses topic {topic!r}, not declared under 'topics'"
                    )
        if self.lineage_topic is not None and self.lineage_topic not in self.topics:
            raise ValueError(f"lineage_topic {self.lineage_topic!r} is not declared under 'topics'")
        runs = self.backfill.runs_topic
        if runs is not None and runs not in self.topics:
            raise ValueError(f"backfill.runs_topic {runs!r} is not declared under 'topics'")
        if self.backfill.entry_stage not in ("ingest", "parse"):
            raise ValueError(
                f"backfill.entry_stage {self.backfill.entry_stage!r}: "
                "a run enters at ingest or parse"
            )
        if self.stages["enrich"].registry_topic is None:
            raise ValueError("stage 'enrich' needs a 'registry_topic'")
        agg = self.stages["aggregate"]
        if agg.state_topic is None:
            raise ValueError("stage 'aggregate' needs a 'state_topic'")
        agg_topics = (*agg.inputs, agg.state_topic, agg.backfill_lane)
        agg_in = {self.topics[t].partitions for t in agg_topics if t is not None}
        if len(agg_in) != 1:
            raise ValueError(
                "the aggregate stage's inputs, backfill_lane and state_topic must have one "
                "partition count"
            )
        return self

    def stage(self, stage_id: str) -> StageSpec:
        try:
            return self.stages[stage_id]
        except KeyError:
            raise ConfigError(
                f"unknown stage {stage_id!r}; choose one of: {', '.join(STAGE_IDS)}"
            ) from None

    def lane_output(self, stage_id: str) -> str:
        """Where a stage writes what it made of a backfill-lane batch: the next
        stage's backfill lane, else its ordinary output."""
        index = STAGE_IDS.index(stage_id)
        if index + 1 < len(STAGE_IDS):
            lane = self.stage(STAGE_IDS[index + 1]).backfill_lane
            if lane is not None:
                return lane
        return self.stage(stage_id).output

    def group_id(self, stage_id: str) -> str:
        """The consumer group of a stage: one id, one name."""
        return f"{self.app_prefix}-{stage_id}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        path = _config_path.get()
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {path} is not valid YAML: {exc}".replace("\n", " ")
            ) from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return data


def namespaced(doc: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """A copy of a pipeline.yaml document in which every topic (and every stage's
    reference to it) and ``app_prefix`` start with ``tag.``: an isolated pipeline on
    a shared broker, for tests and benchmarks."""
    out = copy.deepcopy(dict(doc))
    rename = {name: f"{tag}.{name}" for name in out["topics"]}
    out["topics"] = {rename[n]: spec for n, spec in out["topics"].items()}
    for spec in out["stages"].values():
        spec["inputs"] = [rename[t] for t in spec["inputs"]]
        for key in ("output", "dlq", "registry_topic", "state_topic", "backfill_lane"):
            if key in spec:
                spec[key] = rename[spec[key]]
        if "retry" in spec:
            spec["retry"]["topic"] = rename[spec["retry"]["topic"]]
    if out.get("lineage_topic"):
        out["lineage_topic"] = rename[out["lineage_topic"]]
    if out.get("backfill", {}).get("runs_topic"):
        out["backfill"]["runs_topic"] = rename[out["backfill"]["runs_topic"]]
    out["app_prefix"] = f"{tag}-pipeline"
    return out


def default_config_path() -> Path:
    env = os.environ.get("PIPELINE_CONFIG")
    if env:
        return Path(env)
    local = Path.cwd() / "config" / "pipeline.yaml"
    return local if local.exists() else _REPO_CONFIG


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read and validate settings; raise :class:`ConfigError` with one clear line."""
    path = Path(config_path) if config_path is not None else default_config_path()
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist; set PIPELINE_CONFIG or pass --config"
        )
    token = _config_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {where}: {err['msg']}{more} [{path}]") from None
    finally:
        _config_path.reset(token)
