"""Testing stages: in memory (no broker), and whole topologies on a real broker.

* :class:`StageHarness` / :func:`run_stage`: one stage, the same engine a worker
  runs, a fake producer and clock (:mod:`pipeline.testing.memory`);
* :class:`TopologyCluster`: a pipeline.yaml's stages as real worker processes on a
  real broker (the embedded one unless ``KAFKA_BOOTSTRAP_SERVERS`` is set),
  :mod:`pipeline.testing.cluster`.
"""

from pipeline.testing.cluster import TopologyCluster
from pipeline.testing.memory import (
    DeadLetterView,
    FakeClock,
    MemoryProducer,
    Produced,
    RunResult,
    StageHarness,
    record,
    run_stage,
)

__all__ = [
    "DeadLetterView",
    "FakeClock",
    "MemoryProducer",
    "Produced",
    "RunResult",
    "StageHarness",
    "TopologyCluster",
    "record",
    "run_stage",
]
