"""Settings: one typed, frozen object from the environment over ``config/pipeline.yaml``.

Precedence, highest first: keyword overrides given to :func:`load_settings`,
environment variables (``PIPELINE_*``, nested with ``__`` such as
``PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S=30``; ``KAFKA_BOOTSTRAP_SERVERS``), the YAML file
(``PIPELINE_CONFIG`` or ``config/pipeline.yaml``), the defaults below.

Invalid settings raise :class:`pipeline.errors.ConfigError` with one line that
names the setting.

A stage is whatever ``stages.<id>`` declares: the code it ``uses``, what it reads
and writes, its dead-letter topic, retries, error policy, backfill lane, state,
lookups and ``config`` (validated by the stage's own model when the worker starts,
:mod:`pipeline.stage`). The graph of stages is derived from those declarations
(:mod:`pipeline.topology`); nothing here names a stage.
"""

from __future__ import annotations

import copy
import os
import re
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
    PrivateAttr,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError
from pipeline.topology import Topology

#: a stage id names its consumer group, metric label, lineage hop, Kubernetes
#: Deployment and dead-letter references: a DNS label
STAGE_ID = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")

_REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "pipeline.yaml"
_config_path: ContextVar[Path | None] = ContextVar("pipeline_config_path", default=None)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicSpec(_Frozen):
    partitions: int = Field(ge=1, le=10_000)
    retention_ms: int | None = Field(default=None, ge=-1)
    compacted: bool = False
    #: written from outside the pipeline (devices, a gateway, the CLI): a stage may
    #: read it although no stage writes it (``pipeline topology --check``)
    external: bool = False
    #: the broker's largest record for this topic (``max.message.bytes``)
    max_message_bytes: int | None = Field(default=None, ge=1024)

    def kafka_config(self) -> dict[str, str]:
        config: dict[str, str] = {}
        if self.compacted:
            config["cleanup.policy"] = "compact"
        if self.retention_ms is not None:
            config["retention.ms"] = str(self.retention_ms)
        if self.max_message_bytes is not None:
            config["max.message.bytes"] = str(self.max_message_bytes)
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
    max_ratio: float = Field(default=0.25, gt=0, le=1)
    max_consecutive: int = Field(default=500, ge=1)


class StageSpec(_Frozen):
    """One stage as pipeline.yaml declares it."""

    #: the stage's code: ``package.module:attr`` or an entry point name (pipeline.registry)
    uses: str = Field(min_length=1)
    inputs: tuple[str, ...] = Field(min_length=1)
    #: the default output topic; none for a sink (its effect is outside Kafka)
    output: str | None = None
    #: further output topics an emit may route to (``Emit(topic=...)``)
    outputs: tuple[str, ...] = ()
    dlq: str
    retry: RetryPolicy | None = None
    #: an unexpected exception in stage code: a ``processing_error`` dead letter
    #: (counted by the budget) or a crash of the worker (exit 70, no commit)
    on_error: Literal["dead_letter", "crash"] = "dead_letter"
    dlq_budget: DlqBudget = DlqBudget()
    #: the backfill lane this stage also consumes (pipeline.backfill): its own topic,
    #: so a backfill never sits in front of live records; live inputs go first
    backfill_lane: str | None = None
    #: a stateful stage's changelog (compacted, one partition per input partition)
    state_topic: str | None = None
    #: lookup tables the stage joins: name -> compacted topic (``ctx.lookup(name)``)
    lookups: dict[str, str] = Field(default_factory=dict)
    #: a stateful stage with event time: an idle partition's watermark advances with
    #: the wall clock after this long without input (while upstream is caught up)
    idle_timeout_s: float = Field(default=5.0, gt=0)
    #: a stateful stage: how long (wall clock) a backfill run's lane is remembered as
    #: ended after its end of input; a record of the run meanwhile (a dead letter of
    #: it redriven) is refused as ``late``. Default 30 days, the DLQs' retention
    ended_lane_retention_s: float = Field(default=30 * 86400.0, gt=0)
    #: the stage's own settings, validated by its config model
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def all_outputs(self) -> tuple[str, ...]:
        """Every topic the stage may write outputs to, the default first."""
        return tuple(dict.fromkeys((*((self.output,) if self.output else ()), *self.outputs)))

    @property
    def default_output(self) -> str | None:
        return self.output or (self.outputs[0] if self.outputs else None)

    def topics(self) -> list[str]:
        """Every topic the stage declares."""
        return [
            t
            for t in (
                *self.inputs,
                *self.all_outputs,
                self.dlq,
                self.retry.topic if self.retry else None,
                self.backfill_lane,
                self.state_topic,
                *self.lookups.values(),
            )
            if t is not None
        ]


class BackfillSettings(_Frozen):
    """The orchestrated backfill controller (pipeline.backfill)."""

    #: durable run state (one compacted topic, keyed by run id)
    runs_topic: str | None = None
    #: the stage a run enters by default: its ``backfill_lane`` topic; the stateless
    #: stages that feed it run inside the controller (pipeline.backfill.controller)
    entry_stage: str | None = None
    chunk_size: int = Field(default=5000, ge=1, le=1_000_000)
    #: rows per second the controller produces; 0: no limit
    rate: float = Field(default=5000.0, ge=0)
    #: the run FAILs when a stage on the way makes no progress for this long
    stall_timeout_s: float = Field(default=300.0, gt=0)
    #: Parquet input: the columns each row must have (all columns when empty); each
    #: row becomes one JSON object
    columns: tuple[str, ...] = ()
    #: the column (epoch ms, or a timestamp type) that becomes the record's timestamp
    timestamp_column: str | None = None
    #: the column whose value keys the record
    key_column: str | None = None


class DlqSettings(_Frozen):
    """What every stage's dead letters share (dlq.envelope)."""

    #: the largest dead letter (key + value + headers): past it the value is a prefix
    #: with ``dlq.payload.truncated/size/sha256``; keep it under every DLQ topic's
    #: ``max.message.bytes`` (Kafka's default: 1 MB)
    max_payload_bytes: int = Field(default=262_144, ge=4096, le=64 * 1024 * 1024)


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
    #: how long a Fetch may wait for data. Kafka answers as soon as data arrives; the
    #: embedded broker only when the wait ends, so there it is the longest a record
    #: waits per hop at low load, and a longer wait makes larger batches under load:
    #: 100 halved the hops at 10 % of max rate and doubled the queues at 50 % (README
    #: "Latency between stages"). Kafka's default; Faust alone used 1500.
    fetch_max_wait_ms: int = Field(default=500, ge=1, le=30_000)
    #: a stateless stage starts its next batch while the lineage hops of the last are
    #: in flight, and acks (commits) that batch only once they land; false: each batch
    #: waits for its hops (README "Latency between stages")
    overlap_lineage: bool = True
    #: how many batches of a stateless stage may await the broker's acknowledgement
    #: of their outputs at once: above 1, the next batch runs while the last one's
    #: outputs and hops are in flight, and each batch is acked (committed) only once
    #: everything of it and before it landed; 1: each batch's outputs are acknowledged
    #: before the next batch starts (README "Latency between stages"). Counted in
    #: full batches' worth of records (``batch_max_records`` each): smaller batches
    #: fly in numbers, up to ``small_batches_in_flight`` times as many
    batches_in_flight: int = Field(default=4, ge=1, le=64)
    #: how many small batches may take the place of one full one in flight (1: every
    #: batch, however small, takes one of ``batches_in_flight``)
    small_batches_in_flight: int = Field(default=8, ge=1, le=64)
    #: the longest a backfill-lane batch waits for live input to drain first
    backfill_max_defer_s: float = Field(default=5.0, ge=0)
    #: a batch that met an unreachable dependency (errors.Unavailable) runs again after
    #: this long, doubling up to ``unavailable_backoff_max_s``
    unavailable_backoff_s: float = Field(default=0.5, gt=0)
    unavailable_backoff_max_s: float = Field(default=15.0, gt=0)
    #: a buffering sink's ``flush_due`` runs this often (time-based file rolling)
    sink_flush_interval_s: float = Field(default=1.0, gt=0)
    #: the largest record a worker produces (the producer's ``message.max.bytes``);
    #: a larger output is an ``unwritable`` dead letter, never a crash
    max_message_bytes: int = Field(default=1_000_000, ge=4096, le=1_000_000_000)


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


class EdgeHttpSettings(_Frozen):
    """The HTTP gateway (``pipeline serve-http``, :mod:`pipeline.edge.http`)."""

    #: ``sha256:<hex> [device-id prefix]`` a line; the chart mounts it from a Secret
    tokens_file: str | None = None
    #: the largest request body on the wire (gzip or not): past it, 413
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1024 * 1024)
    #: the largest body after gzip decompression (a gzip bomb stops here): 413
    max_decoded_bytes: int = Field(default=4_194_304, ge=1024, le=256 * 1024 * 1024)
    #: records in one request: past it the whole request is refused (413)
    max_records: int = Field(default=10_000, ge=1, le=1_000_000)
    #: the largest single record; larger is refused whole (413) before anything is
    #: written (ingest dead-letters records over its own, smaller limit)
    max_record_bytes: int = Field(default=524_288, ge=64, le=1_000_000_000)
    #: the whole body must arrive within this (slow clients): 408
    read_timeout_s: float = Field(default=10.0, gt=0)
    #: the broker must acknowledge a request's records within this: else 503
    ack_timeout_s: float = Field(default=10.0, gt=0)
    #: records produced and not yet acknowledged, all requests together: past it, 429
    max_in_flight_records: int = Field(default=50_000, ge=1)
    #: open connections the server takes before it answers 503
    max_connections: int = Field(default=1000, ge=1)
    #: Retry-After of a 429 (queue full) and of a 503 (broker unreachable)
    retry_after_s: int = Field(default=1, ge=1)
    unavailable_retry_after_s: int = Field(default=5, ge=1)


class EdgeMqttSettings(_Frozen):
    """The MQTT bridge (``pipeline bridge-mqtt``, :mod:`pipeline.edge.mqtt`)."""

    #: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)
    url: str | None = Field(default=None, pattern=r"^mqtts?://[^/\s:]+(:[0-9]+)?/?$")
    #: topic filters subscribed with QoS 1; ``$share/<group>/...`` splits them
    #: between replicas; the device id is the level of the first ``+``
    topics: tuple[str, ...] = ()
    #: a fixed client id keeps the session (and its unacknowledged messages) across
    #: restarts; default: ``<app_prefix>-bridge-<hostname>``
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    #: a PEM CA bundle for mqtts:// (default: the system's)
    ca_file: str | None = None
    #: how long the MQTT broker keeps the session of a disconnected bridge
    session_expiry_s: int = Field(default=604_800, ge=60)
    #: messages the MQTT broker may have in flight to the bridge (Receive Maximum)
    max_in_flight: int = Field(default=1000, ge=1, le=65_535)
    keepalive_s: int = Field(default=30, ge=5)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    #: the largest payload written to Kafka; a larger one is acknowledged, counted
    #: (``pipeline_edge_rejected_total{reason="too_large"}``) and logged without content
    max_payload_bytes: int = Field(default=524_288, ge=64, le=1_000_000_000)


class EdgeSettings(_Frozen):
    """The doors devices use (:mod:`pipeline.edge`): both write raw readings, keyed
    by device id, to ``topic`` (default: the entry stage's first input)."""

    topic: str | None = None
    http: EdgeHttpSettings = EdgeHttpSettings()
    mqtt: EdgeMqttSettings = EdgeMqttSettings()


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
    #: where a worker notes the batch it failed on before it exits (compacted), so its
    #: next start, /healthz and `pipeline status` can tell a crash loop; none: off
    failures_topic: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: str = "info"
    #: crash point for tests (pipeline.failpoints): ``<name>[:<n>][@<seconds>]``; unset
    #: in production
    failpoint: str | None = None

    #: directories (relative to the config file) searched first for ``uses:`` modules
    paths: tuple[str, ...] = ()
    topics: dict[str, TopicSpec]
    stages: dict[str, StageSpec]
    runner: RunnerSettings = RunnerSettings()
    dlq: DlqSettings = DlqSettings()
    openlineage: OpenLineageSettings = OpenLineageSettings()
    backfill: BackfillSettings = BackfillSettings()
    edge: EdgeSettings = EdgeSettings()

    _topology: Topology = PrivateAttr()
    _config_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old in ("ingest", "parse", "aggregate"):
                if old in data:
                    raise ValueError(
                        f"top-level '{old}:' moved: put it under stages.<id>.config in "
                        "pipeline.yaml"
                    )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.stages:
            raise ValueError("no stages declared under 'stages'")
        for stage_id, spec in self.stages.items():
            if not STAGE_ID.match(stage_id):
                raise ValueError(
                    f"stage id {stage_id!r}: use 1-40 lowercase letters, digits or '-', "
                    "starting with a letter (it names a consumer group and a Deployment)"
                )
            for topic in spec.topics():
                if topic not in self.topics:
                    raise ValueError(
                        f"stage {stage_id!r} uses topic {topic!r}, not declared under 'topics'"
                    )
            if spec.retry is not None and spec.retry.topic in spec.inputs:
                raise ValueError(f"stage {stage_id!r}: its retry topic is one of its inputs")
        for name in ("lineage_topic", "failures_topic"):
            topic = getattr(self, name)
            if topic is not None and topic not in self.topics:
                raise ValueError(f"{name} {topic!r} is not declared under 'topics'")
        runs = self.backfill.runs_topic
        if runs is not None and runs not in self.topics:
            raise ValueError(f"backfill.runs_topic {runs!r} is not declared under 'topics'")
        entry = self.backfill.entry_stage
        if entry is not None and entry not in self.stages:
            raise ValueError(f"backfill.entry_stage {entry!r} is not a declared stage")
        if self.edge.topic is not None and self.edge.topic not in self.topics:
            raise ValueError(f"edge.topic {self.edge.topic!r} is not declared under 'topics'")
        self._topology = Topology.build(self.stages)
        return self

    @property
    def topology(self) -> Topology:
        """The graph of the declared stages (pipeline.topology)."""
        return self._topology

    @property
    def stage_ids(self) -> tuple[str, ...]:
        """The declared stages in topological order (declaration order among equals)."""
        return self._topology.order

    @property
    def config_dir(self) -> Path | None:
        """The directory of the config file these settings came from."""
        return self._config_dir

    def python_paths(self) -> list[Path]:
        """``paths:``, relative to the config file's directory."""
        base = self._config_dir or Path.cwd()
        return [(base / p).resolve() for p in self.paths]

    def stage(self, stage_id: str) -> StageSpec:
        try:
            return self.stages[stage_id]
        except KeyError:
            raise ConfigError(
                f"unknown stage {stage_id!r}; choose one of: {', '.join(self.stage_ids)}"
            ) from None

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
        _no_secrets_in_file(data, path)
        return data


#: settings that are secrets: never in pipeline.yaml, always from the environment
#: (a Kubernetes Secret) or a file
SECRET_NAMES = frozenset({"password", "api_key", "token", "secret"})


def _no_secrets_in_file(data: Mapping[str, Any], path: Path) -> None:
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return
    for stage_id, spec in stages.items():
        config = spec.get("config") if isinstance(spec, dict) else None
        if not isinstance(config, dict):
            continue
        for name in config:
            if str(name).lower() in SECRET_NAMES:
                raise ConfigError(
                    f"stages.{stage_id}.config.{name} is a secret: remove it from {path} and "
                    f"give it as PIPELINE_STAGES__{str(stage_id).upper()}__CONFIG__"
                    f"{str(name).upper()} (e.g. from a Kubernetes Secret)"
                )


def namespaced(doc: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """A copy of a pipeline.yaml document in which every topic (and every stage's
    reference to it) and ``app_prefix`` start with ``tag.``: an isolated pipeline on
    a shared broker, for tests and benchmarks."""
    out = copy.deepcopy(dict(doc))
    rename = {name: f"{tag}.{name}" for name in out["topics"]}
    out["topics"] = {rename[n]: spec for n, spec in out["topics"].items()}
    for spec in out["stages"].values():
        for key in ("inputs", "outputs"):
            if key in spec:
                spec[key] = [rename[t] for t in spec[key]]
        for key in ("output", "dlq", "state_topic", "backfill_lane"):
            if spec.get(key):
                spec[key] = rename[spec[key]]
        if "retry" in spec:
            spec["retry"]["topic"] = rename[spec["retry"]["topic"]]
        if "lookups" in spec:
            spec["lookups"] = {k: rename[v] for k, v in spec["lookups"].items()}
    for name in ("lineage_topic", "failures_topic"):
        if out.get(name):
            out[name] = rename[out[name]]
    if out.get("backfill", {}).get("runs_topic"):
        out["backfill"]["runs_topic"] = rename[out["backfill"]["runs_topic"]]
    if out.get("edge", {}).get("topic"):
        out["edge"]["topic"] = rename[out["edge"]["topic"]]
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
    moved = sorted(
        k
        for k in os.environ
        if k.upper().startswith(("PIPELINE_INGEST__", "PIPELINE_PARSE__", "PIPELINE_AGGREGATE__"))
    )
    if moved:
        section = moved[0].split("__", 1)[0].removeprefix("PIPELINE_")
        raise ConfigError(
            f"environment variable {moved[0]}: stage settings moved under the stage's config; "
            f"use PIPELINE_STAGES__{section}__CONFIG__{moved[0].split('__', 1)[1]}"
        )
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist; set PIPELINE_CONFIG or pass --config"
        )
    token = _config_path.set(path)
    try:
        settings = Settings(**overrides)
        settings._config_dir = path.resolve().parent
        return settings
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {where}: {msg}{more} [{path}]") from None
    finally:
        _config_path.reset(token)
