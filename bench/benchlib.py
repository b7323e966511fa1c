"""Pieces shared by the benchmark driver (``run.py``) and its comparison paths (``paths.py``).

* :func:`transform` is the parse-like work every comparison path does per record:
  orjson decode, validate a reading, encode the normalised reading;
* :func:`emit` writes one JSON event line to stdout (``first``, ``done`` …), which
  the driver reads to know when a path started consuming;
* :func:`process_cpu_s` and :func:`peak_rss_mb` read a process's CPU time and peak
  resident memory (psutil when installed, ``/proc`` otherwise).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

try:  # a bench-only dependency; /proc is the fallback
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None


def transform(value: bytes | None) -> bytes | None:
    """A parse-like transform: the normalised reading, or None for a bad record."""
    if not value:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    device_id = doc.get("device_id")
    metric = doc.get("metric")
    ts = doc.get("ts")
    seq = doc.get("seq")
    number = doc.get("value")
    unit = doc.get("unit") or ""
    if (
        not isinstance(device_id, str)
        or not device_id
        or not isinstance(metric, str)
        or not metric
        or type(ts) is not int
        or type(seq) is not int
        or seq < 0
        or type(number) not in (int, float)
        or not math.isfinite(number)
        or not isinstance(unit, str)
    ):
        return None
    return orjson.dumps(
        {
            "device_id": device_id,
            "ts": ts,
            "seq": seq,
            "metric": metric,
            "value": float(number),
            "unit": unit,
        }
    )


def emit(event: str, **fields: Any) -> None:
    """One event line for the driver: ``{"event": ..., "t": wall clock, ...}``."""
    line = json.dumps({"event": event, "t": time.time(), **fields})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def path_main(path: Callable[[Any], None], args: Any) -> None:
    """A path script's main: run ``path(args)``; on an exception emit an ``error``
    event for the driver first; then exit at once (no interpreter teardown: a
    client's threads would hold it up)."""
    started = time.time()
    try:
        path(args)
    except Exception as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}", after_s=time.time() - started)
        raise
    sys.stdout.flush()
    os._exit(0)


def process_cpu_s(pid: int | None = None) -> float | None:
    """User + system CPU seconds of a process (this one by default), or None if gone."""
    pid = os.getpid() if pid is None else pid
    try:
        if psutil is not None:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None
    except Exception:  # psutil.NoSuchProcess and friends
        return None


def _proc_status_kb(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """Current resident set size in MiB, or None if the process is gone."""
    if psutil is not None:
        try:
            return float(psutil.Process(pid).memory_info().rss) / 2**20
        except Exception:
            return None
    kb = _proc_status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) in MiB since the process started."""
    kb = _proc_status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


# -- the four stages' work, shared by the peers of bench/paths4.py -----------------------
# The quixstreams and raw confluent-kafka four-stage pipelines validate with parse's own
# code and enrich with the same arithmetic, so the comparison is of what runs around it.


def parse_validator() -> Any:
    """parse's Validator with the ranges of config/pipeline.yaml."""
    from pathlib import Path

    import yaml

    from stages.parse import ParseConfig, Validator

    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "config/pipeline.yaml").open())
    return Validator(ParseConfig(**doc["stages"]["parse"]["config"]))


def parse_reading(value: bytes | None, validator: Any, now_ms: int) -> tuple[Any, ...] | str:
    """The reading's fields as parse validates them, or the dead-letter reason."""
    from pipeline.errors import InvalidMessage
    from stages.parse import decode

    try:
        if not value:
            return "decode_error"
        return tuple(validator._fields(decode(value), now_ms))
    except InvalidMessage as exc:
        return str(exc.reason)


def enrich_reading(reading: dict[str, Any], device: dict[str, Any]) -> dict[str, Any]:
    """What enrich adds to a reading from its device's registry entry."""
    value = float(reading["value"])
    reading["raw_value"] = value
    reading["value"] = value + float(device.get("calibration_offset", 0.0))
    reading["site"] = device["site"]
    reading["device_type"] = device["device_type"]
    reading["unit"] = reading.get("unit") or device["unit"]
    if device.get("attributes"):
        reading["attributes"] = device["attributes"]
    return reading
