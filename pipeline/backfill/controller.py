"""The backfill controller: plan, send chunks, checkpoint, wait, declare.

One controller owns one run. It sends each chunk into the entry stage's backfill
lane with ``source=backfill:<run-id>``, at most ``rate`` rows/s, waits for the
broker to acknowledge the chunk, then checkpoints it in the run state. After the
last chunk it waits for the stages (:mod:`.completion`) and only then marks the
run COMPLETE.

The stateless stages between where records enter the pipeline and the entry stage
(:func:`prepare_chain`; in the built-in pipeline, ingest before parse) run inside
the controller, on the same code the workers run (keys, lineage ids derived from
the row, trace context, dead letters to their own dead-letter topics). Entering at
the first stage (``--stage ingest``), the rows go to its input and its workers do
that work.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from openlineage.client.uuid import generate_new_uuid

from dlq.envelope import dead_letter_record
from dlq.summary import dlq_offsets, run_dead_letters
from pipeline import contract
from pipeline.backfill.completion import Completion, RunCancelled, RunFailed
from pipeline.backfill.lineage import BackfillLineage
from pipeline.backfill.source import (
    Chunk,
    ParquetSource,
    PartitionRange,
    Source,
    TopicSource,
)
from pipeline.backfill.state import (
    CANCELLED,
    COMPLETE,
    DRAINING,
    FAILED,
    RUNNING,
    RunState,
    RunStore,
)
from pipeline.engine.build import build_engine, load_stage
from pipeline.engine.retry import route_retries
from pipeline.errors import BrokerError, ConfigError, PipelineError
from pipeline.kafka.clients import producer
from pipeline.kafka.produce import produce_acked
from pipeline.obs import metrics
from pipeline.records import Record
from pipeline.settings import Settings

log = logging.getLogger("pipeline.backfill")

RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,38}[a-z0-9])?$")
#: how often a sending controller looks for a cancel request
CANCEL_CHECK_S = 2.0

Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]


def new_run_id() -> str:
    return f"bf-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ConfigError(
            f"run id {run_id!r}: use 1-40 lowercase letters, digits, '.' or '-' "
            "(it names the Kubernetes Job too)"
        )
    return run_id


def entry_topic(settings: Settings, entry_stage: str) -> str:
    """Where a run enters: the stage's backfill lane, else its first input."""
    spec = settings.stage(entry_stage)
    return spec.backfill_lane or spec.inputs[0]


def open_source(settings: Settings, described: dict[str, Any]) -> Source:
    """Re-open the input a run state describes."""
    if described["kind"] == "parquet":
        return ParquetSource.from_settings(settings, described["pattern"])
    ranges = [PartitionRange(p, s, e) for p, s, e in described["ranges"]]
    return TopicSource(settings, described["topic"], ranges)


def prepare_chain(settings: Settings, entry_stage: str) -> list[str]:
    """The stages the controller runs itself before ``entry_stage``, in order: walking
    back from it while its input is written by exactly one stage that keeps no state
    and joins no lookup (the controller has neither)."""
    chain: list[str] = []
    stage = entry_stage
    while True:
        spec = settings.stage(stage)
        feeders = {w for t in spec.inputs for w in settings.topology.producers.get(t, ())}
        if len(feeders) != 1:
            return chain
        (feeder,) = feeders
        before = settings.stage(feeder)
        if before.state_topic is not None or before.lookups or feeder in chain:
            return chain
        chain.insert(0, feeder)
        stage = feeder


class ChainStep:
    """One stage of the prepare chain: its engine and where its dead letters go."""

    def __init__(self, settings: Settings, stage_id: str) -> None:
        self.stage_id = stage_id
        self.spec = settings.stage(stage_id)
        self.engine = build_engine(stage_id, self.spec, load_stage(settings, stage_id))


def new_run(
    settings: Settings,
    run_id: str,
    source: Source,
    chunks: Sequence[Chunk],
    entry_stage: str,
    chunk_size: int,
    rate: float,
) -> RunState:
    return RunState(
        run_id=run_id,
        state=RUNNING,
        source=source.describe(),
        fingerprint=source.fingerprint(),
        entry_stage=entry_stage,
        entry_topic=entry_topic(settings, entry_stage),
        chunk_size=chunk_size,
        total_chunks=len(chunks),
        total_rows=sum(c.rows for c in chunks),
        rate=rate,
        openlineage_run_id=str(generate_new_uuid()),
    )


class RateLimiter:
    """At most ``rate`` rows per second on average since it started (0: no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._start = clock()
        self._sent = 0

    def delay(self, rows: int) -> float:
        """Seconds to wait before ``rows`` more may go."""
        if self.rate <= 0:
            return 0.0
        self._sent += rows
        return max(0.0, self._sent / self.rate - (self._clock() - self._start))

    def wait(self, rows: int) -> None:
        pause = self.delay(rows)
        if pause > 0:
            time.sleep(pause)


@dataclass
class ChunkOutcome:
    sent: int
    dead_lettered: int
    duplicates: int
    ends: dict[int, int]  # entry-topic partition -> one past the highest offset acked


class Progress:
    """What the controller reports as it goes (the CLI draws it)."""

    def started(self, run: RunState) -> None: ...

    def chunk(self, run: RunState, rows: int) -> None: ...

    def waiting(self, run: RunState, stage: str, left: int) -> None: ...

    def finished(self, run: RunState) -> None: ...


class Controller:
    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        run: RunState,
        source: Source,
        chunks: Sequence[Chunk],
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.run = run
        self.source = source
        self.chunks = chunks
        self.progress = progress or Progress()
        self.lineage = BackfillLineage(
            settings, run.openlineage_run_id, run.source, run.entry_topic
        )
        self.source_header = contract.backfill_source(run.run_id)
        self._producer: Any = None
        self._cancel_checked = time.monotonic()

    # -- the run ------------------------------------------------------------
    def execute(self) -> RunState:
        """Send what is left, wait for the stages, declare the run. Returns its final
        state (COMPLETE, FAILED or CANCELLED)."""
        run = self.run
        if not run.dlq_from and not run.done:
            # the run's dead letters all come after these: its summary reads from here
            run.dlq_from = dlq_offsets(self.settings)
        self.store.save(run)
        self.lineage.start()
        self.progress.started(run)
        try:
            if run.state == RUNNING:
                self._send_all()
                run.state = DRAINING
                self.store.save(run)
            self._drain()
            run.state = COMPLETE
            self.lineage.complete()
        except RunCancelled:
            run.state, run.reason = CANCELLED, "cancel requested"
            self.lineage.abort()
        except (RunFailed, BrokerError) as exc:
            run.state, run.reason = FAILED, str(exc)
            self.lineage.fail(str(exc))
        finally:
            if self._producer is not None:
                self._producer.flush(10)
            self.source.close()
        run.finished_at = time.time()
        try:
            run.dead_letters = run_dead_letters(
                self.settings, self.source_header, run.dlq_from, int(run.created_at * 1000)
            )
        except PipelineError as exc:
            log.warning("backfill %s: dead letters not counted: %s", run.run_id, exc)
        self.store.save(run)
        self.progress.finished(run)
        return run

    def _send_all(self) -> None:
        run = self.run
        done = run.done_chunks
        chain = [ChainStep(self.settings, s) for s in prepare_chain(self.settings, run.entry_stage)]
        limiter = RateLimiter(run.rate)
        for chunk in self.chunks:
            if chunk.index in done:
                metrics.BACKFILL_CHUNKS.labels(run.entry_stage, run.run_id, "skipped").inc()
                continue
            self._maybe_cancelled()
            outcome = self._send_chunk(chunk, chain, limiter)
            run.mark_done(chunk.index)
            run.rows_sent += outcome.sent
            run.rows_dead_lettered += outcome.dead_lettered
            run.rows_duplicate += outcome.duplicates
            for partition, end in outcome.ends.items():
                key = str(partition)
                run.end_offsets[key] = max(run.end_offsets.get(key, 0), end)
            self.store.save(run)
            metrics.BACKFILL_CHUNKS.labels(run.entry_stage, run.run_id, "sent").inc()
            metrics.BACKFILL_ROWS.labels(run.entry_stage, run.run_id).inc(outcome.sent)
            self.progress.chunk(run, chunk.rows)
            self.lineage.running()

    def _maybe_cancelled(self) -> None:
        if self._cancel_now():
            raise RunCancelled("cancel requested")

    def _send_chunk(
        self, chunk: Chunk, chain: Sequence[ChainStep], limiter: RateLimiter
    ) -> ChunkOutcome:
        """Produce one chunk and wait until the broker acknowledged all of it."""
        run = self.run
        src = (contract.H_SOURCE, self.source_header.encode())
        tag = (contract.H_BACKFILL_CHUNK, str(chunk.index).encode())
        rows = [
            Record(r.topic, r.partition, r.offset, r.timestamp_ms, r.key, r.value, (src,))
            for r in self.source.read(chunk)
        ]
        if len(rows) != chunk.rows:
            raise RunFailed(
                f"chunk {chunk.index} of {chunk.part} [{chunk.unit}] has {len(rows)} rows, the "
                f"plan said {chunk.rows}: the input changed or was truncated"
            )
        out: list[Outgoing] = []
        dead_lettered = duplicates = 0
        now_ms = int(time.time() * 1000)
        records: Sequence[Record] = rows
        for step in chain:
            result = step.engine.process(chunk.index, records)
            out += route_retries(step.spec.retry, result, now_ms)
            limit = self.settings.dlq.max_payload_bytes
            out += [dead_letter_record(d, step.spec.dlq, now_ms, limit) for d in result.dead]
            dead_lettered += len(result.dead)
            duplicates += result.duplicates
            records = [
                Record(
                    o.topic or step.spec.default_output or "",
                    0,
                    i,
                    o.timestamp_ms or 0,
                    o.key,
                    o.value,
                    tuple(o.headers),
                )
                for i, o in enumerate(result.outputs)
            ]
        entry = (
            [(run.entry_topic, r.key, r.value, [src, tag], r.timestamp_ms or None) for r in rows]
            if not chain
            else [
                (run.entry_topic, r.key, r.value, [*r.headers, tag], r.timestamp_ms or None)
                for r in records
            ]
        )
        acked = self._produce([*entry, *out], limiter)
        ends = {p: end for (t, p), end in acked.items() if t == run.entry_topic}
        return ChunkOutcome(len(entry), dead_lettered, duplicates, ends)

    def _produce(
        self, records: Sequence[Outgoing], limiter: RateLimiter
    ) -> dict[tuple[str, int], int]:
        if self._producer is None:
            self._producer = producer(self.settings)
        return produce_acked(
            self._producer,
            records,
            "send a chunk of the backfill",
            pace=limiter.wait,
            pace_every=max(1, int(limiter.rate / 20)) if limiter.rate > 0 else 1000,
            hint="resume the run once the broker is healthy",
        )

    def _drain(self) -> None:
        run = self.run
        completion = Completion(
            self.settings,
            self.source_header,
            stall_timeout_s=self.settings.backfill.stall_timeout_s,
            on_wait=self._on_wait,
            check_cancel=self._cancel_now,
        )
        targets = {(run.entry_topic, int(p)): end for p, end in run.end_offsets.items()}

        def end_lane(stage: str) -> dict[tuple[str, int], int]:
            """The stage's end-of-input markers: sent once, recalled on a resume."""
            spec = self.settings.stage(stage)
            marked = {spec.backfill_lane} if spec.backfill_lane else set(spec.inputs)
            saved = {
                (key.rsplit(":", 1)[0], int(key.rsplit(":", 1)[1])): end
                for key, end in run.end_markers.items()
                if key.rsplit(":", 1)[0] in marked
            }
            if saved:
                return saved
            markers = completion.send_end_of_input(stage)
            run.end_markers.update({f"{t}:{p}": end for (t, p), end in markers.items()})
            self.store.save(run)
            return markers

        completion.through_stages(run.entry_stage, targets, end_lane)
        run.waiting_for = None

    _last_save = 0.0

    def _on_wait(self, stage: str, left: int) -> None:
        run = self.run
        self.progress.waiting(run, stage, left)
        now = time.monotonic()
        if run.waiting_for != stage or now - self._last_save > 10:  # a heartbeat too
            run.waiting_for = stage
            self._last_save = now
            self.store.save(run)
            self.lineage.running()

    def _cancel_now(self) -> bool:
        """Was a cancel requested? Asks the runs topic at most every CANCEL_CHECK_S."""
        if time.monotonic() - self._cancel_checked < CANCEL_CHECK_S:
            return False
        self._cancel_checked = time.monotonic()
        return self.store.cancel_requested(self.run.run_id)
