"""Dataset lineage: OpenLineage run events of a stage worker.

Each stage worker is one run of a STREAMING job ``<app_prefix>.<stage>`` (namespace
``settings.openlineage.namespace``, default ``app_prefix``). It emits ``START`` once it
consumes, and ``COMPLETE`` (clean shutdown) or ``FAIL`` (crash, with an error message
facet) when it stops; the run id is a UUIDv7 per worker process. Its datasets are
Kafka topics, named as the OpenLineage naming spec says: namespace
``kafka://<first bootstrap host:port>``, name = topic.

* inputs: the stage's input topics, its backfill lane, its retry topic, the enrich
  registry topic;
* outputs: its output topic, the next stage's backfill lane, its dead-letter topic,
  retry topic, the aggregate state topic.

The record lineage topic (:mod:`pipeline.lineage`) is bookkeeping, not data: left out.

Events go through the client's own transports (``file``, ``console``, ``http``;
``none`` emits nothing), chosen by :class:`pipeline.settings.OpenLineageSettings`.
Emission never stops a worker: a failure logs one warning line. ``START`` is sent
from a background thread (the caller is the event loop); ``COMPLETE``/``FAIL`` are
sent in the caller's thread, bounded by the HTTP timeout (no retries), so they are
out before the process exits.

This is record-free metadata; per-record lineage is :mod:`pipeline.lineage`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    JobFacet,
    RunFacet,
    error_message_run,
    job_type_job,
    processing_engine_run,
)
from openlineage.client.transport.console import ConsoleConfig, ConsoleTransport
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import (
    ApiKeyTokenProvider,
    HttpConfig,
    HttpTransport,
    TokenProvider,
)
from openlineage.client.transport.transport import Transport
from openlineage.client.uuid import generate_new_uuid

from pipeline.settings import Settings

log = logging.getLogger("pipeline.openlineage")

#: the Kafka default port, for a bootstrap server given without one
_KAFKA_PORT = 9092


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


PRODUCER = f"urn:iot-pipeline:{_version('iot-pipeline')}"


def kafka_namespace(bootstrap_servers: str) -> str:
    """``kafka://host:port`` of the first bootstrap server (OpenLineage naming spec)."""
    first = bootstrap_servers.split(",")[0].strip()
    if "://" in first:  # kafka://h:p, PLAINTEXT://h:p
        first = first.split("://", 1)[1]
    first = first.rstrip("/")
    if not first:
        raise ValueError(f"no bootstrap server in {bootstrap_servers!r}")
    has_port = first.rsplit("]", 1)[-1].count(":") == 1 if first.startswith("[") else ":" in first
    return f"kafka://{first}" if has_port else f"kafka://{first}:{_KAFKA_PORT}"


def stage_topics(settings: Settings, stage_id: str) -> tuple[list[str], list[str]]:
    """The topics a stage reads and the topics it writes, each once, in a fixed order."""
    spec = settings.stage(stage_id)
    retry = spec.retry.topic if spec.retry else None
    inputs = [*spec.inputs, spec.backfill_lane, retry, *spec.lookups.values()]
    lanes = (
        [t for targets in settings.topology.lane_targets(stage_id).values() for t in targets]
        if spec.backfill_lane
        else []
    )
    outputs = [*spec.all_outputs, *lanes, spec.dlq, retry, spec.state_topic]
    return (
        list(dict.fromkeys(t for t in inputs if t is not None)),
        list(dict.fromkeys(t for t in outputs if t is not None)),
    )


def default_file_path(settings: Settings) -> str:
    """``<tempdir>/openlineage-<app_prefix>.jsonl``: writable with a read-only root FS."""
    return str(Path(tempfile.gettempdir()) / f"openlineage-{settings.app_prefix}.jsonl")


def make_transport(settings: Settings) -> Transport | None:
    """The client transport the settings ask for; ``None`` for ``none``."""
    ol = settings.openlineage
    if ol.transport == "none":
        return None
    if ol.transport == "console":
        return ConsoleTransport(ConsoleConfig())
    if ol.transport == "file":
        return FileTransport(
            FileConfig(log_file_path=ol.file_path or default_file_path(settings), append=True)
        )
    assert ol.url is not None  # settings validation: http needs a url
    auth = (
        ApiKeyTokenProvider({"apiKey": ol.api_key.get_secret_value()})
        if ol.api_key is not None
        else TokenProvider({})
    )
    config = HttpConfig(
        url=ol.url,
        endpoint=ol.endpoint,
        timeout=ol.timeout_s,
        auth=auth,
        # one attempt: a lineage backend that is down must not hold up a worker
        retry={"total": 0, "raise_on_status": False},
    )
    return HttpTransport(config)


class StageLineage:
    """The OpenLineage run of one stage worker: ``start()``, then ``complete()`` or
    ``fail(message)``. Each event is emitted at most once per instance; calls out of
    order are ignored (a terminal event without ``start()`` is still emitted)."""

    def __init__(self, settings: Settings, stage_id: str) -> None:
        ol = settings.openlineage
        self.stage_id = stage_id
        self.run_id = str(generate_new_uuid())
        self.job_namespace = ol.namespace or settings.app_prefix
        self.job_name = f"{settings.app_prefix}.{stage_id}"
        self._join_s = 2 * ol.timeout_s + 1.0  # connect + read timeouts, and some slack
        self._lock = threading.Lock()
        self._started = False
        self._finished = False
        self._start_thread: threading.Thread | None = None
        self._inputs: list[InputDataset] = []
        self._outputs: list[OutputDataset] = []
        self._transport: Transport | None = None
        if ol.transport == "none":
            return
        try:
            if not settings.kafka_bootstrap_servers:
                raise ValueError("no Kafka bootstrap server configured")
            namespace = kafka_namespace(settings.kafka_bootstrap_servers)
            inputs, outputs = stage_topics(settings, stage_id)
            self._inputs = [InputDataset(namespace=namespace, name=t) for t in inputs]
            self._outputs = [OutputDataset(namespace=namespace, name=t) for t in outputs]
            self._transport = make_transport(settings)
        except Exception as exc:
            self._transport = None
            log.warning("openlineage: disabled for stage %s: %s", stage_id, _one_line(exc))

    def start(self) -> None:
        """Emit ``START`` (once), from a background thread: returns at once."""
        with self._lock:
            if self._started or self._finished:
                return
            self._started = True
            if self._transport is None:
                return
            self._start_thread = threading.Thread(
                target=self._emit,
                args=(RunState.START,),
                name=f"openlineage-{self.stage_id}",
                daemon=True,
            )
            self._start_thread.start()

    def complete(self) -> None:
        """Emit ``COMPLETE`` (clean shutdown); returns when it is sent or failed."""
        self._finish(RunState.COMPLETE, None)

    def fail(self, message: str) -> None:
        """Emit ``FAIL`` with an error message facet (and the stack trace of the
        exception being handled, if any); returns when it is sent or failed."""
        exc_type = sys.exc_info()[0]
        stack = traceback.format_exc() if exc_type is not None else None
        facet = error_message_run.ErrorMessageRunFacet(
            message=message, programmingLanguage="PYTHON", stackTrace=stack, producer=PRODUCER
        )
        self._finish(RunState.FAIL, facet)

    def _finish(self, state: RunState, error: RunFacet | None) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            start_thread = self._start_thread
        if self._transport is None:
            return
        if start_thread is not None:
            start_thread.join(self._join_s)  # START first, as far as we can wait
        self._emit(state, error)

    def _emit(self, state: RunState, error: RunFacet | None = None) -> None:
        if self._transport is None:
            return
        run_facets: dict[str, RunFacet] = {
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
                version=_version("faust-streaming"),
                name="Faust",
                openlineageAdapterVersion=_version("iot-pipeline"),
                producer=PRODUCER,
            )
        }
        if error is not None:
            run_facets["errorMessage"] = error
        emit_run_event(
            self._transport,
            state,
            run_id=self.run_id,
            job=(self.job_namespace, self.job_name),
            job_type=("STREAMING", "FAUST", "JOB"),
            run_facets=run_facets,
            inputs=self._inputs,
            outputs=self._outputs,
        )


def emit_run_event(
    transport: Transport,
    state: RunState,
    *,
    run_id: str,
    job: tuple[str, str],
    job_type: tuple[str, str, str],
    run_facets: dict[str, RunFacet],
    inputs: list[InputDataset],
    outputs: list[OutputDataset],
) -> None:
    """Build one run event of ``job`` (namespace, name), its ``jobType`` facet from
    ``job_type`` (processingType, integration, jobType), and emit it. A failure logs
    one warning and never raises: lineage must not stop the work it describes."""
    processing_type, integration, job_kind = job_type
    job_facets: dict[str, JobFacet] = {
        "jobType": job_type_job.JobTypeJobFacet(
            processingType=processing_type,
            integration=integration,
            jobType=job_kind,
            producer=PRODUCER,
        )
    }
    event = RunEvent(
        eventType=state,
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=run_id, facets=run_facets),
        job=Job(namespace=job[0], name=job[1], facets=job_facets),
        inputs=list(inputs),
        outputs=list(outputs),
        producer=PRODUCER,
    )
    try:
        transport.emit(event)
    except Exception as exc:
        log.warning(
            "openlineage: %s event of %s not emitted (%s transport): %s",
            state.value,
            job[1],
            transport.kind,
            _one_line(exc),
        )
    else:
        log.debug("openlineage: %s event of %s emitted", state.value, job[1])


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
