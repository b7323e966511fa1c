"""rate: a stateful stage; each reading gets the rate of change of its metric.

Keyed state per (device, metric) holds the last reading seen (by event time);
the output is the reading plus ``rate_per_s`` (None for a device's first reading,
or one that is not newer than the last). The state lives in the table the engine
keeps for the stage (changelog ``gw.rate.state``), so it survives restarts.
"""

from __future__ import annotations

from pipeline import Emit, InvalidMessage, Record, StageContext, State, stage


@stage(stateful=True, event_time="ts", reasons={"bad_reading": "no device_id, metric or value"})
def rate(record: Record, ctx: StageContext, state: State) -> Emit:
    reading = record.json()
    try:
        key = (str(reading["device_id"]), str(reading["metric"]))
        ts, value = int(reading["ts"]), float(reading["value"])
    except (KeyError, TypeError, ValueError):
        raise InvalidMessage(
            "bad_reading", "a reading needs device_id, metric, ts, value"
        ) from None
    last = state.get(key)
    per_s = None
    if last is not None and ts > last["ts"]:
        per_s = round((value - last["value"]) / ((ts - last["ts"]) / 1000), 6)
    if last is None or ts > last["ts"]:
        state.set(key, {"ts": ts, "value": value})
    return Emit(key=record.key, value={**reading, "rate_per_s": per_s}, schema="rate/1")
