"""py-spy on one process while it is measured (``bench/run.py --profile``): samples of
the threads holding the GIL, summarised by package of the innermost Python frame and
as the hottest frames."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from procs import _die_with_parent, log

#: packages a profile's samples are attributed to (the innermost frame's file)
PACKAGES = frozenset(
    {
        "faust",
        "mode",
        "aiokafka",
        "confluent_kafka",
        "quixstreams",
        "prometheus_client",
        "opentelemetry",
        "pipeline",
        "stages",
        "dlq",
        "asyncio",
        "concurrent",
    }
)


def package_of(frame: str) -> str:
    """``func (path/to/file.py:12)`` → the package the file belongs to."""
    match = re.search(r"\(([^()]+):\d+\)$", frame)
    if match is None:
        return "other"
    path = match.group(1)
    for part in path.split("/"):
        if part in PACKAGES:
            return part
    if path.endswith(("benchlib.py", "paths.py", "paths4.py")):
        return "bench"
    return "stdlib/other"


class Profiler:
    """py-spy (``--profile``) sampling one process while it is measured, only threads
    holding the GIL (the resource one Python process is limited by); summarised as
    samples by package of the innermost Python frame, and the hottest frames."""

    def __init__(self, pid: int, path: Path) -> None:
        exe = Path(sys.executable).parent / "py-spy"
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        if not exe.exists():
            log("--profile: py-spy is not installed (pip install py-spy); not profiling")
            return
        cmd = [str(exe), "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
        self.proc = subprocess.Popen(
            [*cmd, "--gil", "-f", "raw", "--output", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return summarise_profile(self.path)


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any] | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    by_package: dict[str, int] = {}
    by_frame: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        package = package_of(leaf)
        by_package[package] = by_package.get(package, 0) + n
        by_frame[leaf] = by_frame.get(leaf, 0) + n
    if not total:
        return None

    def share(counts: dict[str, int], limit: int) -> dict[str, float]:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return {k: round(100 * v / total, 1) for k, v in ordered}

    return {
        "samples": total,
        "file": str(path),
        "self_pct_by_package": share(by_package, len(by_package)),
        "hottest_frames_pct": share(by_frame, top),
    }
