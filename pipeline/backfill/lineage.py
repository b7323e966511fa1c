"""OpenLineage run events of a backfill: a BATCH job ``<app_prefix>.backfill``.

START when the run begins (and again, same run id, when it is resumed), RUNNING
after a chunk (at most every ``RUNNING_EVERY_S``), then COMPLETE, FAIL (with an
error message facet) or ABORT (cancelled). Input dataset: the Parquet files
(namespace ``file``, name = absolute path) or the Kafka topic; outputs: the topic
the run produced into and the aggregate's output topic. The run id is kept in the
run state, so every event of a run, across resumes, has the same one.

Emission never stops a run: a failure logs one warning.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from openlineage.client.event_v2 import InputDataset, OutputDataset, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    error_message_run,
)
from openlineage.client.transport.transport import Transport

from pipeline.obs.openlineage import (
    PRODUCER,
    _one_line,
    emit_run_event,
    kafka_namespace,
    make_transport,
)
from pipeline.settings import Settings

log = logging.getLogger("pipeline.backfill")

RUNNING_EVERY_S = 10.0


class BackfillLineage:
    def __init__(
        self, settings: Settings, run_id: str, source: dict[str, Any], entry_topic: str
    ) -> None:
        ol = settings.openlineage
        self.run_id = run_id
        self.job_namespace = ol.namespace or settings.app_prefix
        self.job_name = f"{settings.app_prefix}.backfill"
        self._last_running = 0.0
        self._transport: Transport | None = None
        self._inputs: list[InputDataset] = []
        self._outputs: list[OutputDataset] = []
        if ol.transport == "none":
            return
        try:
            namespace = kafka_namespace(settings.kafka_bootstrap_servers or "")
            if source["kind"] == "parquet":
                self._inputs = [InputDataset(namespace="file", name=p) for p in source["files"]]
            else:
                self._inputs = [InputDataset(namespace=namespace, name=source["topic"])]
            self._outputs = [
                OutputDataset(namespace=namespace, name=t)
                for t in dict.fromkeys([entry_topic, *settings.topology.final_topics()])
            ]
            self._transport = make_transport(settings)
        except Exception as exc:
            log.warning("openlineage: disabled for the backfill: %s", _one_line(exc))

    def start(self) -> None:
        self._emit(RunState.START)

    def running(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_running >= RUNNING_EVERY_S:
            self._last_running = now
            self._emit(RunState.RUNNING)

    def complete(self) -> None:
        self._emit(RunState.COMPLETE)

    def abort(self) -> None:
        self._emit(RunState.ABORT)

    def fail(self, message: str) -> None:
        facet = error_message_run.ErrorMessageRunFacet(
            message=message, programmingLanguage="PYTHON", producer=PRODUCER
        )
        self._emit(RunState.FAIL, facet)

    def _emit(self, state: RunState, error: RunFacet | None = None) -> None:
        if self._transport is None:
            return
        emit_run_event(
            self._transport,
            state,
            run_id=self.run_id,
            job=(self.job_namespace, self.job_name),
            job_type=("BATCH", "IOT-PIPELINE", "BACKFILL"),
            run_facets={"errorMessage": error} if error is not None else {},
            inputs=self._inputs,
            outputs=self._outputs,
        )
