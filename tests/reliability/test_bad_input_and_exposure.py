"""D2 (oversize, empty, binary, compressed-bomb-like input is rejected cheaply) and
S1/S2 (no ids or payloads in metric labels or logs; endpoints bind where told and
serve nothing but metrics and health), on a real worker."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from pipeline.settings import load_settings
from stages.ingest import ingest as ingest_stage
from stages.parse import parse as parse_stage
from tests.integration.harness import Pipeline, dead_letters, isolated_config, wait_for
from tests.integration.test_dlq_runtime import send
from tests.unit.records import Batchwise, engine, reading, rec

MARKER = "PAYLOAD-MARKER-7f3a"


def test_oversize_empty_binary_and_bomb_like_inputs_are_rejected_without_decoding():
    settings = load_settings()
    config = settings.stages["ingest"].config
    ingest = Batchwise(engine(ingest_stage, config, stage_id="ingest"))
    parse = Batchwise(engine(parse_stage, settings.stages["parse"].config, stage_id="parse"))
    limit = config["max_payload_bytes"]
    huge = b'{"device_id": "' + b"x" * (limit + 1) + b'"}'
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros in ~50 KB
    assert len(bomb) < limit
    binary = bytes(range(256)) * 4
    result = ingest.process([rec(huge), rec(b""), rec(binary), rec(bomb)])
    assert [str(d.reason) for d in result.dead] == ["too_large", "empty"]
    # what ingest passes on is never decompressed or interpreted: parse rejects it
    parsed = parse.process([rec(o.value, headers=tuple(o.headers)) for o in result.outputs])
    assert [str(d.reason) for d in parsed.dead] == ["decode_error", "decode_error"]
    assert not parsed.outputs


def _listening(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp, IPv4)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            octets = [str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)]
            found.append(".".join(octets))
    return found


def test_metric_labels_logs_and_endpoints_expose_no_ids_or_payloads(broker, tmp_path):
    config, settings = isolated_config(tmp_path, broker.bootstrap)
    pipe = Pipeline(config, settings, tmp_path)
    parse = pipe.start("parse", env={"PIPELINE_METRICS_HOST": "127.0.0.1"})
    try:
        wait_for(lambda: parse.get("/readyz")[0] == 200, 60, "parse ready", pipe.logs)
        good = [reading(device="dev-0042", seq=i, ts=1_764_000_000_000 + i) for i in range(20)]
        records = [(b"dev-0042", rec(r).value, []) for r in good]
        records += [(b"dev-0042", f'{{"device_id": "{MARKER}"'.encode(), [])] * 5
        send(settings, settings.stages["parse"].inputs[0], records, 0)
        wait_for(lambda: len(dead_letters(settings, "parse")) == 5, 60, "dead letters", pipe.logs)
        samples = parse.metrics()
        allowed = {"stage", "topic", "partition", "reason", "le", "quantile"}
        for name, labels in samples:
            for key, value in labels:
                assert key in allowed, (name, key)
                assert not re.search(r"dev-\d+", value) and MARKER not in value, (name, value)
        assert _listening(parse.port) == ["127.0.0.1"]
        for path in ("/", "/debug", "/tables", "/graph", "/router"):
            assert parse.get(path)[0] == 404, path
        log = parse.log_path.read_text()
        assert MARKER not in log and "dev-0042" not in log
    finally:
        pipe.stop_all()
