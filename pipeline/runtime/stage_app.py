"""The Faust app class of a stage worker (what the runtime's modules share)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust

from pipeline.obs.lag_time import LandingClocks
from pipeline.obs.openlineage import StageLineage
from pipeline.runtime.transport import BatchTransport


class StageApp(faust.App):
    """A Faust app whose consumer batches the stage's input topics."""

    batch_topics: frozenset[str] = frozenset()
    #: the dead-letter budget stopped the stage: nothing more is processed or acked
    halted: bool = False
    #: how long a Fetch may wait for data (pipeline.transport.BatchConsumerThread)
    fetch_max_wait_ms: int | None = None
    #: OpenLineage run events of this worker (START, then COMPLETE or FAIL)
    run_events: StageLineage | None = None
    kafka_client_config: dict[str, Any] | None = None
    #: batches that will never be acked (a sink's held ones, ones waiting for a
    #: dependency), given up before a rebalance or a stop (pipeline.runtime.holding)
    forget_unacked: Callable[[], list[Any]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: when records of each input partition landed (lag in seconds)
        self.landing_clocks = LandingClocks()

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)
