"""Crash points, to test what a worker dying at the worst moment does.

``PIPELINE_FAILPOINT=<name>[:<n>]`` makes the worker kill itself with SIGKILL the
``n``-th time (default: the first) it passes the point ``name``; a point whose
name ends in ``-stall`` blocks the worker's thread instead (an hour), as a call
that never returns would. Unset — the
default and the only sane production value — every point is a no-op costing
one comparison.

A point whose name ends in ``-fail`` is awaited (:func:`reached`): armed as
``<name>[:<n>][@<seconds>]``, it waits that long (default 0) without blocking the
worker, then raises :class:`FailpointError` where the call it stands for would
have failed.

Points: ``dlq-delivered`` (dead letters acknowledged by the broker, batch not yet
acked, so its offsets are not committed); ``batch-stall`` (processing a batch);
``landing-fail`` (a batch in flight had its outputs acknowledged; the rest of its
landing, state writes or lineage hops, fails as with a broker gone down).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

_name = ""
_remaining = 0
_delay_s = 0.0


class FailpointError(RuntimeError):
    """Raised by an armed ``-fail`` point."""


def arm(spec: str | None) -> None:
    """Arm the point ``spec`` (``<name>[:<n>][@<seconds>]``, from ``Settings.failpoint``);
    None disarms. Called once by the worker's composition root, never at import."""
    global _name, _remaining, _delay_s
    spec, _, delay = (spec or "").partition("@")
    name, _, count = spec.partition(":")
    _name, _remaining = name, (int(count or 1) if name else 0)
    _delay_s = float(delay or 0)


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


async def reached(name: str) -> None:
    """An awaitable point (name ending in ``-fail``): raise FailpointError when armed
    and due, after the armed delay."""
    global _remaining
    if not _remaining or name != _name:
        return
    _remaining -= 1
    if _remaining == 0:
        log = logging.getLogger("pipeline.failpoints")
        log.warning("failpoint %s: failing in %gs", name, _delay_s)
        await asyncio.sleep(_delay_s)
        raise FailpointError(f"failpoint {name}")
