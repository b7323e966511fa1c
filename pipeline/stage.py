"""Writing a stage: the ``@stage`` decorator, :class:`StageContext`, :class:`State`.

A stage is plain Python written against this module; the engine (``pipeline.engine``)
runs it and the runtime (``pipeline.runtime``) binds it to Kafka. Five forms:

* **per record**: ``fn(record, ctx) -> None | Emit | Iterable[Emit]``;
* **batch** (``@stage(batch=True)``): ``fn(records, ctx, out) -> None``, calling
  ``out.emit(...)``, ``out.dead_letter(...)``, ``out.retry(...)``,
  ``out.duplicate(...)`` (see :class:`Outputs`) — for hot paths;
* **stateful** (``@stage(stateful=True)``): ``fn(record, ctx, state) -> …`` with keyed
  :class:`State` kept in a table whose changelog the engine writes in a crash-safe
  order, per backfill lane, behind a re-delivery fence;
* a **class** with ``__init__(self, ctx)`` and ``process(self, record[, state])`` or
  ``process_batch(self, records, out)``; a stateful class may also define
  ``event_time(record) -> int`` (ms; the engine keeps a watermark per lane),
  ``on_watermark(state, watermark) -> emits`` (also called when an idle partition's
  watermark advances with the wall clock, and with :data:`END_OF_TIME` when a
  backfill lane ends), ``next_deadline(state) -> int | None`` (the watermark at
  which ``on_watermark`` has work; idle advances are written only then),
  ``on_end_of_lane(state) -> emits`` and ``on_restore(state)`` (rebuild in-memory
  indexes after state was loaded from the changelog);
* a **sink** (a class with ``write``, see :class:`Sink`): a stage whose effect is
  outside Kafka (a table, files). It has no output topic; it reports where each
  record landed (``out.stored(record, ref)``: a ``stored`` lineage hop) and, if it
  buffers, which offsets are durable, since the runtime commits no offset before its
  records are. A sink runs off the event loop (it may block on I/O) and raises
  :class:`~pipeline.errors.Unavailable` when its destination cannot be reached:
  the batch is then run again, whole, until it goes through.

Raising :class:`~pipeline.errors.InvalidMessage` dead-letters the record with its
reason; :class:`~pipeline.errors.RetryableError` retries it with backoff (then
dead-letters it). Reasons are declared per stage (``reasons={code: meaning}``) so
metric labels stay bounded; the framework's own (:data:`dlq.reasons.FRAMEWORK`) are
always declared. Anything else raised is a bug in stage code, handled by the stage's
``on_error`` policy (``dead_letter``: a ``processing_error`` dead letter; ``crash``).

Contract of the engine towards a stage: records of one partition arrive in offset
order; a record is never given to two calls at once; a batch's outputs, retries,
dead letters and state writes are acknowledged by the broker before its offsets are
committed (at-least-once: after a crash a record may be processed again, with the
same lineage id; stateful stages are fenced against re-delivered batches).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Protocol, overload

from pydantic import BaseModel, ValidationError

from dlq.reasons import FRAMEWORK as FRAMEWORK_REASONS
from dlq.reasons import REASON_CODE
from pipeline.errors import ConfigError, InvalidMessage, RetryableError
from pipeline.records import Emit, OutRecord, Record

#: the watermark a lane reaches when it ends: every event-time deadline has passed
END_OF_TIME = (1 << 62) - 1
#: the live lane's name (a backfill lane is named by its source, ``backfill:<run-id>``)
LIVE = ""


Emits = Emit | Iterable[Emit] | None


class Codec(Protocol):
    """How a stateful stage's values become changelog bytes and back."""

    def encode(self, value: Any) -> bytes: ...

    def decode(self, raw: bytes) -> Any: ...


class JsonCodec:
    """The default state codec: JSON-able values (orjson)."""

    def encode(self, value: Any) -> bytes:
        import orjson

        return orjson.dumps(value)

    def decode(self, raw: bytes) -> Any:
        import orjson

        return orjson.loads(raw)


class State(Protocol):
    """Keyed state of one partition and one lane, as a stateful stage sees it.

    Keys are strings, numbers or tuples of them; values anything the stage's codec
    encodes (JSON by default). Call :meth:`set` after changing a value in place:
    only set and deleted keys are written to the changelog. Changes a record made
    are undone if processing it raises. ``cache`` is an in-memory dict for indexes
    (rebuilt by ``on_restore``), never written.
    """

    partition: int
    lane: str
    cache: dict[str, Any]
    #: the watermark at which ``on_watermark`` next has work: a stage that knows may
    #: set it, and the engine calls the hook only from there (0, the default: always)
    next_due: int
    #: the highest event time seen in this lane (the engine moves it; read only)
    watermark: int | None
    get: Callable[..., Any]

    def __contains__(self, key: Any) -> bool: ...

    def __len__(self) -> int: ...

    def set(self, key: Any, value: Any) -> None: ...

    def delete(self, key: Any) -> None: ...

    def items(self) -> Iterator[tuple[Any, Any]]: ...

    def emit(self, emit: Emit) -> None:
        """Write ``emit`` as an output made from state (a new trace, as
        ``on_watermark``'s outputs), not from the record being processed: e.g. a
        window corrected by a late record. Undone with the record's other changes
        if processing it raises."""


class Outputs(Protocol):
    """What a batch stage tells the engine, per input record."""

    def emit(
        self,
        source: Record,
        key: Any,
        value: Any,
        schema: bytes | str | None = None,
        timestamp_ms: int | None = None,
        headers: Any = None,
        topic: str | None = None,
    ) -> None:
        """Write one output made from ``source`` (contract headers carried over)."""

    def append(self, out: OutRecord) -> None:
        """Write ``out`` as it is: the stage built its headers (lineage id,
        traceparent, source, schema) itself."""

    def dead_letter(self, source: Record, exc: InvalidMessage) -> None: ...

    def retry(self, source: Record, exc: RetryableError) -> None: ...

    def duplicate(self, source: Record) -> None:
        """``source`` repeats a record already handled: counted, not written."""


class SinkOutputs(Outputs, Protocol):
    """What a sink tells the engine, besides dead letters (see :class:`Sink`)."""

    def stored(self, source: Record, ref: Any) -> None:
        """``source`` is stored at ``ref`` (JSON-able: a row's key, a file's path)."""

    def durable(self, topic: str, partition: int, through: int) -> None:
        """Every record of ``topic[partition]`` up to offset ``through`` is durable
        (a buffering sink: its offsets may be committed now)."""


class Sink(Protocol):
    """A stage whose effect is outside Kafka. Contract with the engine:

    * ``write(records, out)`` gets one partition's records in offset order. It
      stores them (or buffers them: ``buffers = True``), calls ``out.stored`` for
      each record stored and ``out.dead_letter`` for each it refuses (bad input, a
      row the destination refuses). It must leave no effect when it raises: the
      engine then runs the records one at a time to find the bad one (an
      unexpected exception), or the runtime runs the whole batch again later
      (:class:`~pipeline.errors.Unavailable`). Storing must be idempotent: after a
      crash a record is written again (an upsert, a file rewritten under the same
      name), which is how at-least-once delivery gives exactly-once results.
    * A sink that does not buffer has stored a batch when ``write`` returns; its
      offsets may be committed then. One that buffers reports what became durable
      with ``out.durable(topic, partition, through)``, from ``write`` or from
      ``flush_due(now, out)``, which the runtime calls about once a second (for
      time-based rolling); the runtime commits those offsets at once, and none
      before.
    * ``drop()``: forget everything buffered and not yet durable; the runtime
      calls it before its partitions move to another worker, which gets those
      records again. ``close()``: the worker stops.
    """

    buffers: bool

    def write(self, records: Sequence[Record], out: SinkOutputs) -> None: ...


class Lookup:
    """A read-only table a stage joins (a compacted topic, kept current by the
    runtime): ``get(key)`` gives the latest value, decoded by ``decode`` if given
    (cached while the stored bytes are unchanged), or None."""

    def __init__(
        self,
        name: str,
        data: Mapping[bytes, bytes],
        decode: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.name = name
        self._data = data
        self._decode = decode
        self._cache: dict[bytes, tuple[bytes, Any]] = {}

    def raw(self, key: bytes | str) -> bytes | None:
        return self._data.get(key.encode("utf-8") if isinstance(key, str) else key)

    def get(self, key: bytes | str) -> Any:
        k = key.encode("utf-8") if isinstance(key, str) else key
        raw = self._data.get(k)
        if raw is None or self._decode is None:
            return raw
        hit = self._cache.get(k)
        if hit is not None and hit[0] == raw:
            return hit[1]
        value = self._decode(raw)
        self._cache[k] = (raw, value)
        return value

    def __len__(self) -> int:
        return len(self._data)


class StageContext:
    """What a stage knows of where it runs. One per worker, made by the engine.

    ``config`` is the stage's ``config:`` from pipeline.yaml, validated by the
    stage's config model if it declares one (else a read-only mapping).
    """

    def __init__(
        self,
        stage_id: str,
        config: Any = None,
        outputs: Sequence[str] = (),
        lookups: Mapping[str, Mapping[bytes, bytes]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stage_id = stage_id
        self.config: Any = config if config is not None else MappingProxyType({})
        self.outputs = tuple(outputs)
        self.clock = clock
        self.log = logging.getLogger(f"pipeline.stage.{stage_id}")
        self._lookups = dict(lookups or {})
        self._opened: dict[str, Lookup] = {}
        # per-record marks of the record being processed (reset by the engine)
        self._duplicate = False
        self._counted: list[Any] | None = None
        self._lineage_id: str | None = None

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def lookup(self, name: str, decode: Callable[[bytes], Any] | None = None) -> Lookup:
        """The lookup table ``name`` the stage declares under ``lookups:``."""
        opened = self._opened.get(name)
        if opened is None:
            if name not in self._lookups:
                raise ConfigError(
                    f"stage {self.stage_id} uses lookup {name!r}; declare it under "
                    f"stages.{self.stage_id}.lookups (known: {sorted(self._lookups) or 'none'})"
                )
            opened = self._opened[name] = Lookup(name, self._lookups[name], decode)
        return opened

    def duplicate(self) -> None:
        """The record being processed repeats one already handled (not a dead letter)."""
        self._duplicate = True

    def counted(self, ref: Any, lineage_id: str | None = None) -> None:
        """A stateful stage absorbed the record being processed into ``ref`` (e.g. a
        window); lineage records it so the record can be traced into its result.
        ``lineage_id``: the record's, if the stage has it at hand (saves a look-up)."""
        if self._counted is None:
            self._counted = [ref]
        else:
            self._counted.append(ref)
        if lineage_id is not None:
            self._lineage_id = lineage_id


@dataclass(frozen=True)
class StageDef:
    """A stage as the engine runs it; made by :func:`stage`."""

    name: str
    build: Callable[[StageContext], Any]
    kind: Literal["record", "batch", "sink"]
    stateful: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)
    config_model: type[BaseModel] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    state_codec: Codec | None = None
    doc: str = ""

    @property
    def all_reasons(self) -> Mapping[str, str]:
        return {**FRAMEWORK_REASONS, **self.reasons}

    def configured(self, **defaults: Any) -> StageDef:
        """The same stage with other config defaults (pipeline.yaml still overrides)."""
        return replace(self, config_defaults={**self.config_defaults, **defaults})

    def make_config(self, stage_id: str, given: Mapping[str, Any]) -> Any:
        """The stage's config from ``given`` over its defaults; ConfigError naming the
        setting if the stage's model refuses it."""
        merged = {**self.config_defaults, **given}
        if self.config_model is None:
            return MappingProxyType(merged)
        try:
            return self.config_model(**merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            raise ConfigError(
                f"invalid setting stages.{stage_id}.config.{where}: {err['msg']}"
            ) from None


@overload
def stage(obj: Callable[..., Any], /) -> StageDef: ...


@overload
def stage(
    *,
    reasons: Mapping[str, str] | None = None,
    config: type[BaseModel] | None = None,
    batch: bool = False,
    stateful: bool = False,
    event_time: str | Callable[[Record], int] | None = None,
    state_codec: Codec | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], StageDef]: ...


def stage(
    obj: Callable[..., Any] | None = None,
    /,
    *,
    reasons: Mapping[str, str] | None = None,
    config: type[BaseModel] | None = None,
    batch: bool = False,
    stateful: bool = False,
    event_time: str | Callable[[Record], int] | None = None,
    state_codec: Codec | None = None,
    name: str | None = None,
) -> StageDef | Callable[[Callable[..., Any]], StageDef]:
    """Declare a stage (see the module docstring for the forms).

    ``reasons``: the dead-letter reason codes the stage raises, with what each means;
    ``config``: a pydantic model that validates the stage's ``config:``;
    ``event_time`` (stateful functions): the JSON field or a function giving a
    record's event time in ms, for the engine's per-lane watermark.
    Raises ConfigError for a reason code that is not ``snake_case``.
    """

    def decorate(target: Any) -> StageDef:
        declared = dict(reasons or {})
        for code in declared:
            if not REASON_CODE.match(code):
                raise ConfigError(
                    f"stage {target.__qualname__}: reason {code!r} must be snake_case "
                    "(a-z, 0-9, _; it is a metric label)"
                )
        if inspect.isclass(target):
            kind: Literal["record", "batch", "sink"] = (
                "sink"
                if hasattr(target, "write")
                else "batch"
                if hasattr(target, "process_batch")
                else "record"
            )
            if not hasattr(target, "process") and kind == "record":
                raise ConfigError(
                    f"stage class {target.__qualname__} needs process(), process_batch() "
                    "or write() (a sink)"
                )
            if kind == "sink" and stateful:
                raise ConfigError(f"sink {target.__qualname__} cannot be stateful")
            build: Callable[[StageContext], Any] = target
        else:
            kind = "batch" if batch else "record"
            build = _function_processor(target, kind, stateful, event_time)
        return StageDef(
            name=name or f"{target.__module__}:{target.__qualname__}",
            build=build,
            kind=kind,
            stateful=stateful,
            reasons=MappingProxyType(declared),
            config_model=config,
            state_codec=state_codec or (JsonCodec() if stateful else None),
            doc=inspect.getdoc(target) or "",
        )

    return decorate(obj) if obj is not None else decorate


def _function_processor(
    fn: Callable[..., Any],
    kind: str,
    stateful: bool,
    event_time: str | Callable[[Record], int] | None,
) -> Callable[[StageContext], Any]:
    """A processor class around a stage function."""
    if kind == "batch":

        class _Batch:
            def __init__(self, ctx: StageContext) -> None:
                self.ctx = ctx

            def process_batch(self, records: Sequence[Record], out: Outputs) -> None:
                fn(records, self.ctx, out)

        return _Batch
    if not stateful:

        class _PerRecord:
            def __init__(self, ctx: StageContext) -> None:
                self.ctx = ctx

            def process(self, record: Record) -> Emits:
                return fn(record, self.ctx)  # type: ignore[no-any-return]

        return _PerRecord

    timer = _event_time_of(event_time)

    class _Stateful:
        def __init__(self, ctx: StageContext) -> None:
            self.ctx = ctx
            if timer is not None:
                self.event_time = timer

        def process(self, record: Record, state: State) -> Emits:
            return fn(record, self.ctx, state)  # type: ignore[no-any-return]

    return _Stateful


def _event_time_of(
    event_time: str | Callable[[Record], int] | None,
) -> Callable[[Record], int] | None:
    if event_time is None or callable(event_time):
        return event_time
    field_name = event_time

    def from_field(record: Record) -> int:
        doc = record.json()
        value = doc.get(field_name) if isinstance(doc, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidMessage(
                "decode_error", f"event time field {field_name!r} is not an integer (ms)"
            )
        return value

    return from_field
