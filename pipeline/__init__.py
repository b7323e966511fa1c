"""A streaming data-pipeline framework on Kafka: stages as plug-ins.

The public API is what ``__all__`` lists; everything else is implementation::

    from pipeline import Emit, InvalidMessage, Record, StageContext, stage

    @stage(reasons={"no_mean": "a window without a mean"})
    def alert(record: Record, ctx: StageContext):
        window = record.json()
        if "mean" not in window:
            raise InvalidMessage("no_mean", "window has no mean")
        if window["mean"] > ctx.config["threshold"]:
            yield Emit(key=record.key, value=record.value, schema="alert/1")

See :mod:`pipeline.stage` for the forms a stage takes and what the engine
guarantees it, :mod:`pipeline.operators` for reusable stages (windowed
aggregation), :mod:`pipeline.testing` to run a stage in memory, and
:mod:`pipeline.contract` for the headers every record carries.
"""

from pipeline import contract
from pipeline.errors import (
    ConfigError,
    InvalidMessage,
    PipelineError,
    RetryableError,
)
from pipeline.records import Emit, OutRecord, Record
from pipeline.stage import (
    END_OF_TIME,
    Codec,
    JsonCodec,
    Lookup,
    Outputs,
    StageContext,
    StageDef,
    State,
    stage,
)

__all__ = [
    "END_OF_TIME",
    "Codec",
    "ConfigError",
    "Emit",
    "InvalidMessage",
    "JsonCodec",
    "Lookup",
    "OutRecord",
    "Outputs",
    "PipelineError",
    "Record",
    "RetryableError",
    "StageContext",
    "StageDef",
    "State",
    "contract",
    "stage",
]
