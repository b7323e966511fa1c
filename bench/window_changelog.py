"""The aggregate's changelog: bytes of state writes per reading, by how many readings
a device's window holds (in-process: the aggregate's own engine, no broker).

Each batch writes every window it touched in full (its aggregates and every lineage
id it counted, as JSON), so a window that gets a reading in each of k batches is
written k times with 1, 2 … k ids: bytes per reading grow with the readings per
device-window, not with the data. Readings here: ``devices`` devices at ``hz``
readings per second of event time, batches of 2,000 in event-time order, each
reading with a 26-character lineage id (as ingest gives them). Bytes are
deterministic (key + value of every state write, no timing).

Writes ``bench/results/window_changelog.json`` and ``.md``. Run (≈ 1 min):
``.venv/bin/python bench/window_changelog.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline import contract
from pipeline.engine.build import build_engine, load_stage
from pipeline.records import Record
from pipeline.settings import load_settings

RESULTS = Path(__file__).parent / "results"
BATCH = 2000
#: (window_s, devices, readings per second per device): the benchmarks' own pattern
#: (1 Hz of event time over 100 devices), the soak's (100 Hz), and the default
#: config's 60 s windows over many devices at 1 Hz
CASES = [(10, 100, 1.0), (10, 100, 100.0), (60, 2000, 1.0), (60, 100, 10.0)]


def changelog_bytes(window_s: int, devices: int, hz: float, readings: int) -> dict[str, Any]:
    os.environ["PIPELINE_STAGES__AGGREGATE__CONFIG__WINDOW_S"] = str(window_s)
    settings = load_settings()
    spec = settings.stage("aggregate")
    engine = build_engine("aggregate", spec, load_stage(settings, "aggregate"))
    engine.load(0, [])
    topic = spec.inputs[0]
    start = int(time.time() * 1000) - 86_400_000
    rate = devices * hz
    written = writes = 0
    for first in range(0, readings, BATCH):
        batch = []
        for n in range(first, first + BATCH):
            ts = start + int(n * 1000 / rate)
            device = f"dev-{n % devices + 1:04d}"
            doc = {"device_id": device, "ts": ts, "seq": n, "metric": "power", "value": 1.0}
            headers = ((contract.H_LINEAGE, b"01J%023d" % n),)
            batch.append(Record(topic, 0, n, ts, device.encode(), orjson.dumps(doc), headers))
        result = engine.process(0, batch)
        writes += len(result.writes)
        written += sum(len(k) + len(v or b"") for k, v in result.writes)
    return {
        "window_s": window_s,
        "devices": devices,
        "hz_per_device": hz,
        "readings_per_device_window": window_s * hz,
        "readings": readings,
        "state_writes": writes,
        "changelog_bytes_per_reading": written / readings,
    }


def main() -> int:
    readings = int(sys.argv[1]) if len(sys.argv) > 1 else 120_000
    rows = [changelog_bytes(w, d, hz, readings) for w, d, hz in CASES]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "window_changelog.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# The aggregate's changelog bytes per reading",
        "",
        f"{readings:,} readings per case, batches of {BATCH:,}; `bench/window_changelog.py`.",
        "",
        "| window | devices | readings/s per device | readings per device-window "
        "| state writes | changelog bytes per reading |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['window_s']} s | {r['devices']:,} | {r['hz_per_device']:g} | "
            f"{r['readings_per_device_window']:g} | {r['state_writes']:,} | "
            f"{r['changelog_bytes_per_reading']:,.0f} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "window_changelog.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
