"""A worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``; nothing else.

* ``/healthz`` (liveness) answers 503 while any problem is reported, with the
  problems as JSON: the dead-letter budget stopped the stage, a batch has been
  processing for longer than ``runner.liveness_timeout_s``, or the event loop
  has not ticked for that long (something blocks it).
* ``/readyz`` answers 200 once the worker has its partitions and its tables are
  recovered, and 503 while any liveness problem is reported or a part of the worker
  is not ready (:meth:`Health.not_ready`: a sink's destination is unreachable).

The server binds to ``metrics_host`` (127.0.0.1 by default). There are no table
browsing or debug routes; every other path is 404.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.obs.metrics import REGISTRY


class Health:
    """Problems reported by parts of the worker, and whether it is ready."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._watchdogs: dict[str, Callable[[], str | None]] = {}
        self._not_ready: dict[str, str] = {}
        self._ready = False

    def watch(self, component: str, check: Callable[[], str | None]) -> None:
        """``check`` runs on every health request (in the HTTP thread, so it sees a
        blocked event loop) and returns a problem or None."""
        with self._lock:
            self._watchdogs[component] = check

    def fail(self, component: str, message: str) -> None:
        with self._lock:
            self._problems[component] = message

    def clear(self, component: str) -> None:
        with self._lock:
            self._problems.pop(component, None)

    def not_ready(self, component: str, message: str | None) -> None:
        """Fail readiness (not liveness) while ``message`` is set; None clears it."""
        with self._lock:
            if message is None:
                self._not_ready.pop(component, None)
            else:
                self._not_ready[component] = message

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = ready

    def problems(self) -> dict[str, str]:
        with self._lock:
            problems = dict(self._problems)
            watchdogs = list(self._watchdogs.items())
        for component, check in watchdogs:
            problem = check()
            if problem is not None:
                problems[component] = problem
        return problems

    def liveness(self) -> tuple[bool, dict[str, object]]:
        problems = self.problems()
        return not problems, {"status": "ok" if not problems else "failing", "problems": problems}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        with self._lock:
            ready = self._ready
            waiting = dict(self._not_ready)
        ready = ready and not waiting and not self.problems()
        body: dict[str, object] = {"status": "ready" if ready else "not ready"}
        if waiting:
            body["waiting"] = waiting
        return ready, body


HEALTH = Health()


class _Handler(BaseHTTPRequestHandler):
    server_version = "pipeline"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, body = HEALTH.liveness() if path == "/healthz" else HEALTH.readiness()
            self._send(200 if ok else 503, orjson.dumps(body), "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds are not worth a log line."""


def serve(host: str, port: int) -> int:
    """Serve the endpoints on host:port in a daemon thread (port 0 picks one)."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return int(server.server_port)
