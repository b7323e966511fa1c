"""Load test of the doors, loopback only and bounded: N concurrent HTTP clients
against `pipeline serve-http`, then M MQTT publishers through Mosquitto and
`pipeline bridge-mqtt`, on the embedded broker.

Reports requests/s and readings/s, p50/p99 per request (HTTP: POST to its 202,
i.e. Kafka acknowledged; MQTT: publish to Kafka, measured per message from the
`ts` in its payload to the record's Kafka timestamp), CPU µs per reading of the door
process (and of Mosquitto), and lost = acknowledged readings missing from Kafka
(read back in full). Results: bench/results/edge.json and edge.md.

    python bench/edge.py [--clients 8 --requests 500 --batch 100 --publishers 4 --messages 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.edge.mosquitto import start_mosquitto  # noqa: E402
from pipeline.kafka.clients import admin  # noqa: E402
from pipeline.kafka.embedded import free_port, start_embedded  # noqa: E402
from pipeline.kafka.offsets import read_topic  # noqa: E402
from pipeline.kafka.topics import create_topics  # noqa: E402
from pipeline.settings import load_settings, namespaced  # noqa: E402

TOKEN = "bench-token"  # noqa: S105 (a throwaway token of a loopback run)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert proc.poll() is None, "door exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("door not ready")


def http_phase(port: int, clients: int, requests: int, batch: int) -> dict[str, object]:
    latencies: list[float] = []
    accepted: list[tuple[str, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {TOKEN}"}
        mine: list[float] = []
        sent: list[tuple[str, int]] = []
        for r in range(requests):
            device = f"http-{c:02d}-{r % 10}"
            now = int(time.time() * 1000)
            body = b"\n".join(
                orjson.dumps(
                    {
                        "device_id": device,
                        "ts": now,
                        "seq": r * batch + i,
                        "metric": "temperature",
                        "value": 21.5,
                        "unit": "C",
                    }
                )
                for i in range(batch)
            )
            started = time.perf_counter()
            while True:
                conn.request("POST", "/v1/readings", body, headers)
                response = conn.getresponse()
                response.read()
                if response.status == 202:
                    break
                if response.status in (429, 503):
                    time.sleep(float(response.getheader("Retry-After") or 1))
                    continue
                errors.append(str(response.status))
                break
            mine.append(time.perf_counter() - started)
            sent.extend((device, r * batch + i) for i in range(batch))
        with lock:
            latencies.extend(mine)
            accepted.extend(sent)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": clients * requests,
        "readings": len(accepted),
        "seconds": round(seconds, 2),
        "requests_per_s": round(clients * requests / seconds, 1),
        "readings_per_s": round(len(accepted) / seconds, 1),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
        "errors": errors,
        "_accepted": accepted,
    }


def mqtt_phase(port: int, publishers: int, messages: int) -> dict[str, object]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    published: list[tuple[str, int]] = []
    lock = threading.Lock()

    def publisher(p: int) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        infos = []
        sent = []
        for i in range(messages):
            device = f"mqtt-{p:02d}-{i % 10}"
            payload = orjson.dumps(
                {
                    "ts": int(time.time() * 1000),
                    "seq": i,
                    "metric": "temperature",
                    "value": 20.0,
                    "unit": "C",
                }
            )
            infos.append(client.publish(f"devices/{device}/readings", payload, qos=1))
            sent.append((device, i))
            if len(infos) >= 500:
                for info in infos:
                    info.wait_for_publish(60)
                infos = []
        for info in infos:
            info.wait_for_publish(60)
        client.disconnect()
        client.loop_stop()
        with lock:
            published.extend(sent)

    threads = [threading.Thread(target=publisher, args=(p,)) for p in range(publishers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "publishers": publishers,
        "messages": len(published),
        "publish_seconds": round(time.perf_counter() - started, 2),
        "_started": started,
        "_published": published,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--messages", type=int, default=10000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    broker = start_embedded()
    doc = namespaced(yaml.safe_load((REPO / "config/pipeline.yaml").read_text()), "bench")
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump(doc))
    settings = load_settings(config, kafka_bootstrap_servers=broker.bootstrap)
    create_topics(settings, admin(settings))
    landing = settings.stages["ingest"].inputs[0]
    tokens = work / "tokens"
    tokens.write_text(f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "PIPELINE_LOG_LEVEL": "warning",
    }
    cli = [sys.executable, "-m", "pipeline.cli", "--config", str(config)]
    procs: list[subprocess.Popen[bytes]] = []
    mosquitto = start_mosquitto(work / "mosquitto")
    try:
        gport = free_port()
        gateway = subprocess.Popen(
            [*cli, "serve-http", "--port", str(gport), "--tokens-file", str(tokens)], env=env
        )
        procs.append(gateway)
        bport = free_port()
        bridge = subprocess.Popen(
            [
                *cli,
                "bridge-mqtt",
                "--mqtt",
                mosquitto.url,
                "--topic",
                "devices/+/readings",
                "--client-id",
                "bench-bridge",
                "--metrics-port",
                str(bport),
            ],
            env=env,
        )
        procs.append(bridge)
        wait_ready(gport, gateway)
        wait_ready(bport, bridge)
        assert mosquitto.proc is not None

        cpu0 = cpu_s(gateway.pid)
        http = http_phase(gport, args.clients, args.requests, args.batch)
        http["door_cpu_us_per_reading"] = round(
            (cpu_s(gateway.pid) - cpu0) / max(1, int(http["readings"])) * 1e6,
            1,  # type: ignore[call-overload]
        )

        cpu_b, cpu_m = cpu_s(bridge.pid), cpu_s(mosquitto.proc.pid)
        mqtt = mqtt_phase(mosquitto.port, args.publishers, args.messages)
        want = len(mqtt["_published"])  # type: ignore[arg-type]

        def bridged() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{bport}/metrics") as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("pipeline_edge_records_total{"):
                        return float(line.rsplit(" ", 1)[1])
            return 0.0

        while bridged() < want:
            time.sleep(0.05)
        seconds = time.perf_counter() - float(mqtt["_started"])  # type: ignore[arg-type]
        mqtt["seconds"] = round(seconds, 2)
        mqtt["readings_per_s"] = round(want / seconds, 1)
        mqtt["door_cpu_us_per_reading"] = round((cpu_s(bridge.pid) - cpu_b) / want * 1e6, 1)
        mqtt["mosquitto_cpu_us_per_reading"] = round(
            (cpu_s(mosquitto.proc.pid) - cpu_m) / want * 1e6, 1
        )

        records = read_topic(settings, landing, timeout=120)
        got_http: set[tuple[str, int]] = set()
        got_mqtt: set[tuple[str, int]] = set()
        delays: list[float] = []
        for m in records:
            doc = orjson.loads(m.value())
            ident = (doc["device_id"], doc["seq"])
            if doc["device_id"].startswith("mqtt-"):
                got_mqtt.add(ident)
                delays.append(m.timestamp()[1] - doc["ts"])
            else:
                got_http.add(ident)
        http["lost"] = len(set(http.pop("_accepted")) - got_http)  # type: ignore[arg-type]
        mqtt["lost"] = len(set(mqtt.pop("_published")) - got_mqtt)  # type: ignore[arg-type]
        mqtt.pop("_started")
        mqtt["publish_to_kafka_p50_ms"] = round(pct(delays, 0.5), 1)
        mqtt["publish_to_kafka_p99_ms"] = round(pct(delays, 0.99), 1)
        mqtt["duplicates_in_kafka"] = len(delays) - len(got_mqtt)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}, load {os.getloadavg()[0]:.1f} at start",
            "broker": "embedded (Tansu)",
            "http": http,
            "mqtt": mqtt,
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        mosquitto.stop()
        broker.stop()
    out = REPO / "bench" / "results"
    (out / "edge.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "| door | load | readings | readings/s | requests/s | p50 | p99 | CPU µs/reading | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| HTTP gateway | {http['clients']} clients x {args.requests} requests x {args.batch} "
        f"readings (NDJSON) | {http['readings']} | {http['readings_per_s']} | "
        f"{http['requests_per_s']} | {http['p50_ms']} ms | {http['p99_ms']} ms (POST → 202) | "
        f"{http['door_cpu_us_per_reading']} | {http['lost']} |",
        f"| MQTT bridge | {mqtt['publishers']} publishers x {args.messages} QoS 1 | "
        f"{mqtt['messages']} | {mqtt['readings_per_s']} | - | {mqtt['publish_to_kafka_p50_ms']} ms "
        f"| {mqtt['publish_to_kafka_p99_ms']} ms (publish → Kafka) | "
        f"{mqtt['door_cpu_us_per_reading']} (+ Mosquitto {mqtt['mosquitto_cpu_us_per_reading']}) "
        f"| {mqtt['lost']} |",
    ]
    (out / "edge.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
