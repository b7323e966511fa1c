"""Real doors for the edge tests: the gateway and the bridge as `pipeline` processes,
a Mosquitto of the test's own, an MQTT publisher and an HTTP client."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.kafka.embedded import free_port
from pipeline.kafka.offsets import read_topic
from pipeline.settings import Settings
from tests.integration.harness import REPO, wait_for

#: tokens of the tests' gateways: one for any device, one for fleet A only
TOKEN_ALL = "t0k3n-all-devices"
TOKEN_FLEET_A = "t0k3n-fleet-a"


def write_tokens(path: Path) -> Path:
    lines = [
        "# test tokens",
        f"sha256:{hashlib.sha256(TOKEN_ALL.encode()).hexdigest()}",
        f"sha256:{hashlib.sha256(TOKEN_FLEET_A.encode()).hexdigest()} fleet-a-",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Door:
    """A `pipeline serve-http` or `pipeline bridge-mqtt` process."""

    args: list[str]
    config: Path
    bootstrap: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Door:
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "PIPELINE_LOG_LEVEL": "info",
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "--config", str(self.config), *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> Door:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return self.get("/readyz")[0] == 200

        wait_for(ready, timeout, f"{self.args[0]} ready", self.log)
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        if status != 200:
            return 0.0
        return sum(
            s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def gateway(
    config: Path, bootstrap: str, tmp_path: Path, env: dict[str, str] | None = None
) -> Door:
    port = free_port()
    door = Door(
        [
            "serve-http",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tokens-file",
            str(write_tokens(tmp_path / "tokens")),
        ],
        config,
        bootstrap,
        tmp_path / f"gateway-{port}.log",
        env or {},
        port,
    )
    return door.start().wait_ready()


def bridge(
    config: Path,
    bootstrap: str,
    mqtt_url: str,
    tmp_path: Path,
    *,
    client_id: str,
    topics: Iterable[str] = ("devices/+/readings",),
) -> Door:
    port = free_port()
    args = ["bridge-mqtt", "--mqtt", mqtt_url, "--client-id", client_id]
    for topic in topics:
        args += ["--topic", topic]
    args += ["--metrics-port", str(port)]
    door = Door(args, config, bootstrap, tmp_path / f"bridge-{client_id}-{port}.log", {}, port)
    return door.start().wait_ready()


def post(
    port: int,
    body: bytes,
    content_type: str = "application/json",
    token: str | None = TOKEN_ALL,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, object], dict[str, str]]:
    """Status, JSON body and headers of POST /v1/readings."""
    sent = {"Content-Type": content_type, **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/readings", data=body, headers=sent, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, orjson.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}"), dict(exc.headers)


def reading(device: str, seq: int, value: float = 21.5) -> dict[str, object]:
    ts = int(time.time() * 1000) - 60_000
    return {"device_id": device, "ts": ts, "seq": seq, "metric": "temperature", "value": value}


def landed(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes]]:
    return [(m.key(), m.value() or b"") for m in read_topic(settings, topic)]


def identities(values: Iterable[bytes]) -> list[tuple[str, int]]:
    """(device_id, seq) of each JSON reading."""
    out = []
    for value in values:
        doc = orjson.loads(value)
        out.append((doc["device_id"], doc["seq"]))
    return out


class Publisher:
    """An MQTT 5 client publishing QoS 1 readings and waiting for each PUBACK."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, messages: Iterable[tuple[str, bytes]], timeout: float = 60.0) -> int:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout)
            assert info.is_published(), "the MQTT broker did not acknowledge a publish"
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_in_thread(
    port: int, messages: list[tuple[str, bytes]], per_tick: int, errors: list[str]
) -> threading.Thread:
    """Publish ``messages`` ``per_tick`` at a time (each tick acknowledged) in a thread."""

    def run() -> None:
        try:
            pub = Publisher(port, f"pub-{os.getpid()}-{time.monotonic_ns()}")
            for i in range(0, len(messages), per_tick):
                pub.publish(messages[i : i + per_tick])
                time.sleep(0.02)
            pub.close()
        except Exception as exc:  # surfaced by the test
            errors.append(repr(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
