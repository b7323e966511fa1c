"""Crash points, to test what a worker dying at the worst moment does.

``PIPELINE_FAILPOINT=<name>[:<n>]`` makes the worker kill itself with SIGKILL the
``n``-th time (default: the first) it passes the point ``name``; a point whose
name ends in ``-stall`` blocks the worker's thread instead (an hour), as a call
that never returns would. Unset — the
default and the only sane production value — every point is a no-op costing
one comparison.

Points: ``dlq-delivered`` (dead letters acknowledged by the broker, batch not yet
acked, so its offsets are not committed); ``batch-stall`` (processing a batch).
"""

from __future__ import annotations

import logging
import os
import signal
import time

_name = ""
_remaining = 0


def arm(spec: str | None) -> None:
    """Arm the point ``spec`` (``<name>[:<n>]``, from ``Settings.failpoint``); None disarms.
    Called once by the worker's composition root, never at import."""
    global _name, _remaining
    name, _, count = (spec or "").partition(":")
    _name, _remaining = name, (int(count or 1) if name else 0)


def hit(name: str) -> None:
    global _remaining
    if not _remaining or name != _name:
        return
    _remaining -= 1
    if _remaining == 0 and name.endswith("-stall"):
        logging.getLogger("pipeline.failpoints").warning("failpoint %s: blocking", name)
        time.sleep(3600)
    elif _remaining == 0:
        logging.getLogger("pipeline.failpoints").warning("failpoint %s: SIGKILL", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
