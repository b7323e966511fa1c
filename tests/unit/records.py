"""Helpers to build stage inputs."""

from __future__ import annotations

import itertools

import orjson

from pipeline.records import Record

_offsets = itertools.count()


def rec(
    value: bytes | dict | None,
    key: bytes | None = None,
    topic: str = "in",
    partition: int = 0,
    headers: tuple[tuple[str, bytes], ...] = (),
    ts: int = 1_700_000_000_000,
) -> Record:
    if isinstance(value, dict):
        value = orjson.dumps(value)
    return Record(topic, partition, next(_offsets), ts, key, value, headers)


def reading(
    device: str = "dev-0001",
    ts: int = 1_700_000_000_000,
    seq: int = 0,
    metric: str = "temperature",
    value: float = 21.5,
    unit: str = "C",
) -> dict:
    return {
        "device_id": device,
        "ts": ts,
        "seq": seq,
        "metric": metric,
        "value": value,
        "unit": unit,
    }


# -- stage engines for unit tests: the same engine a worker builds ---------------------
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

from pipeline.engine.build import build_engine  # noqa: E402
from pipeline.settings import StageSpec  # noqa: E402
from pipeline.stage import StageDef  # noqa: E402


def engine(
    definition: StageDef,
    config: dict[str, Any] | None = None,
    clock: Any = None,
    lookups: dict[str, Any] | None = None,
    stage_id: str = "stage",
    **spec: Any,
) -> Any:
    """A stage's engine (what a worker runs), without a broker."""
    import time

    declared = StageSpec(
        uses=definition.name,
        inputs=spec.pop("inputs", ("in",)),
        output=spec.pop("output", "out"),
        dlq=spec.pop("dlq", "dlq"),
        state_topic="state" if definition.stateful else None,
        lookups={name: f"lookup.{name}" for name in lookups or {}},
        config=config or {},
        **spec,
    )
    return build_engine(stage_id, declared, definition, lookups, clock or time.time)


class Batchwise:
    """A stateless engine with the old one-argument ``process(records)``."""

    def __init__(self, eng: Any) -> None:
        self.engine = eng

    def process(self, records: Any) -> Any:
        return self.engine.process(0, records)


class Windows:
    """A stateful (window) engine seen the way the tests look at it."""

    def __init__(self, eng: Any) -> None:
        self.engine = eng

    def process(self, partition: int, records: Any) -> Any:
        return self.engine.process(partition, records)

    def tick(self, partition: int, quiet_since: float) -> Any:
        return self.engine.tick(partition, quiet_since) or self.engine.new_result()

    def load(self, partition: int, items: Any) -> None:
        self.engine.load(partition, list(items))

    @property
    def partitions(self) -> dict[int, Any]:
        return {
            p: SimpleNamespace(windows=store.live._data, watermark=store.live.watermark)
            for p, store in self.engine.stores.items()
        }

    @property
    def lanes(self) -> dict[tuple[int, str], Any]:
        return {
            (p, lane): state
            for p, store in self.engine.stores.items()
            for lane, state in store.lanes.items()
            if lane
        }

    @property
    def ended(self) -> dict[int, set[str]]:
        return {p: store.ended for p, store in self.engine.stores.items()}
