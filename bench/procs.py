"""Processes of the benchmark and what is measured of them.

* :class:`Child`: a subprocess in its own process group (stopped with its group, and
  told to die with the bench), optionally reading JSON event lines from its stdout;
* :class:`CpuMeter`: CPU seconds of a set of processes and of the broker from
  ``/proc``, and how busy the rest of the machine was meanwhile (other users' work
  on a shared machine: the figure that says how noisy a measurement was);
* :func:`wait_until`, :func:`scrape`, :func:`ready`: polling workers;
py-spy profiles of one process (``--profile``) are in ``profiling.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import process_cpu_s, rss_mb

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


class BenchError(Exception):
    """A path of the benchmark failed; the message says what and where to look."""


class BenchTimeout(BaseException):
    """The whole benchmark ran past ``--timeout``."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the bench died → we get SIGTERM


class Child:
    """A subprocess in its own process group, stopped with its whole group."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log_path: Path, events: bool = False
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.events: dict[str, dict[str, Any]] = {}
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if events else self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        CHILDREN.append(self)
        if events:
            threading.Thread(target=self._read_events, name=f"{name}-events", daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            start = line.find(b'{"event"')  # Faust may write terminal codes before it
            try:
                event = json.loads(line[start:] if start >= 0 else line)
                self.events[event["event"]] = event
            except (ValueError, KeyError, TypeError):
                with contextlib.suppress(ValueError):
                    self._log.write(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if "error" in self.events:
            raise BenchError(f"{self.name} failed: {self.events['error']['error']}\n{self.tail()}")
        if not self.alive():
            raise BenchError(f"{self.name} exited with code {self.proc.returncode}\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text) + f"\n    (log: {self.log_path})"

    def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM the group, SIGKILL it after ``timeout``; return the seconds it took."""
        started = time.monotonic()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the leader and anything it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(ValueError):
            self._log.close()
        if self in CHILDREN:
            CHILDREN.remove(self)
        return time.monotonic() - started


CHILDREN: list[Child] = []


def stop_children() -> None:
    for child in reversed(list(CHILDREN)):
        with contextlib.suppress(Exception):
            child.stop(timeout=10)
    CHILDREN.clear()


def stop_all(children: Iterable[Child]) -> None:
    """SIGTERM every child first, then wait for each (they stop in parallel)."""
    children = list(children)
    for child in children:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    for child in children:
        child.stop()


def broker_pid() -> int | None:
    """The embedded broker: our child process whose command line says ``--listener-url``."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[1] == me and b"--listener-url" in cmdline:
            return int(entry.name)
    return None


# -- CPU -------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int | None) -> float:
    value = process_cpu_s(pid) if pid is not None else None
    return value or 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, summed by thread name
    (librdkafka names its threads ``rdk:main``, ``rdk:broker…``; Python's are all
    ``python``)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        key = "rdk:broker" if name.startswith("rdk:broke") else name
        out[key] = out.get(key, 0.0) + seconds
    return out


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    procs: dict[str, float]
    broker: float
    bench: float
    machine: float


class CpuMeter:
    """CPU seconds of named processes, the broker and this bench, and of the whole
    machine, between :meth:`start` and :meth:`stop`.

    ``others_cores``: what the rest of the machine used meanwhile (busy time of every
    core minus ours), in cores: 0 on a quiet machine; on these shared 2-core machines
    it says how much other people's test suites competed with the measurement.
    """

    def __init__(self, pids: dict[str, int], broker: int | None) -> None:
        self.pids = pids
        self.broker = broker
        self.first: CpuSnapshot | None = None
        self.last: CpuSnapshot | None = None

    def snapshot(self) -> CpuSnapshot:
        return CpuSnapshot(
            at=time.monotonic(),
            procs={name: cpu_of(pid) for name, pid in self.pids.items()},
            broker=cpu_of(self.broker),
            bench=cpu_of(os.getpid()),
            machine=machine_busy_s(),
        )

    def start(self) -> None:
        self.first = self.snapshot()

    def stop(self) -> dict[str, Any]:
        self.last = self.snapshot()
        return self.delta()

    def delta(self) -> dict[str, Any]:
        a, b = self.first, self.last
        assert a is not None and b is not None
        procs = {name: max(0.0, b.procs[name] - a.procs.get(name, 0.0)) for name in b.procs}
        broker = max(0.0, b.broker - a.broker)
        bench = max(0.0, b.bench - a.bench)
        wall = max(1e-9, b.at - a.at)
        ours = sum(procs.values()) + broker + bench
        return {
            "wall_s": wall,
            "procs_s": procs,
            "path_s": sum(procs.values()),
            "broker_s": broker,
            "bench_s": bench,
            "others_cores": max(0.0, (b.machine - a.machine) - ours) / wall,
        }


# -- polling ---------------------------------------------------------------------------


def scrape_text(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())
    except (OSError, urllib.error.URLError):
        return None


def metric_sum(text: str | None, name: str, match: str = "") -> float | None:
    """Sum of a metric's samples (those whose labels contain ``match``)."""
    if text is None:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            if match and match not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port: int, name: str) -> float | None:
    """Sum of a counter's samples in a worker's /metrics, None if it does not answer."""
    return metric_sum(scrape_text(port), name)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    children: Iterable[Child] = (),
) -> float:
    """Poll until ``predicate()``; return the wall-clock time it held. Raise
    BenchError if a child dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    watched = list(children)
    while True:
        if predicate():
            return time.time()
        for child in watched:
            child.check()
        if time.monotonic() > deadline:
            tails = "\n".join(f"  {c.name}:\n{c.tail(12)}" for c in watched)
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(interval)


class RssWatch:
    """Samples the RSS of some processes in a thread; keeps each one's maximum."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.last: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for name, pid in self.pids.items():
                value = rss_mb(pid)
                if value is not None:
                    self.last[name] = value
                    self.peak[name] = max(self.peak[name], value)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rate(records: float, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0 or records <= 0:
        return None
    return records / seconds
