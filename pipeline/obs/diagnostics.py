"""A state dump for a stuck worker: ``kill -QUIT <pid>`` (like a JVM thread dump).

Logs where every suspended coroutine and async generator waits, and the
consumer's flow and partition state. It reads Faust and aiokafka internals, so
it is a diagnostic aid, not an interface.
"""

from __future__ import annotations

import gc
import logging
import signal
import types
from typing import Any

log = logging.getLogger("pipeline.diagnostics")


def coroutine_frames() -> list[str]:
    lines = []
    for obj in gc.get_objects():
        if isinstance(obj, types.CoroutineType):
            frame, name = obj.cr_frame, obj.cr_code.co_qualname
        elif isinstance(obj, types.AsyncGeneratorType):
            frame, name = obj.ag_frame, obj.ag_code.co_qualname
        else:
            continue
        if frame is not None:
            lines.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
    return sorted(lines)


def consumer_state(app: Any) -> list[str]:
    c = app.consumer
    lines = [
        f"flow_active={c.flow_active} flow_control_active={app.flow_control.is_active()} "
        f"in_recovery={app.in_recovery} rebalancing={app.rebalancing}",
        f"assignment={sorted(map(str, c.assignment()))}",
        f"active={sorted(map(str, c._active_partitions or ()))} "
        f"paused={sorted(map(str, c._paused_partitions))}",
        f"read_offset={ {str(k): v for k, v in c._read_offset.items()} }",
        f"committed={ {str(k): v for k, v in c._committed_offset.items()} }",
        f"unacked={len(c._unacked_messages)} expected={getattr(c, '_expected', {})}",
    ]
    position = getattr(c, "_fetch_position", None)
    if position is not None:
        lines.append(f"positions={ {str(tp): position(tp) for tp in c.assignment()} }")
    return lines


def install(app: Any) -> None:
    """Dump on SIGQUIT (mode already uses SIGUSR1 and SIGUSR2)."""

    def dump(*_: object) -> None:
        try:
            state = consumer_state(app)
        except (AttributeError, KeyError, RuntimeError) as exc:
            state = [f"consumer state unavailable: {exc!r}"]
        log.warning("state dump:\n%s\n%s", "\n".join(state), "\n".join(coroutine_frames()))

    signal.signal(signal.SIGQUIT, dump)
