"""Bearer tokens (pipeline.edge.auth): the tokens file, constant-time matching,
device-id prefixes; and the MQTT bridge's topic filters."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from pipeline.edge.auth import Grant, TokenStore, bearer, match_token, parse_tokens, token_digest
from pipeline.edge.mqtt import check_filter, parse_url, topic_device
from pipeline.errors import ConfigError


def _line(token: str, prefix: str = "") -> str:
    return f"sha256:{hashlib.sha256(token.encode()).hexdigest()} {prefix}".rstrip()


def test_a_tokens_file_is_digests_with_optional_prefixes() -> None:
    text = f"# fleet tokens\n\n{_line('t-a', 'fleet-a-')}\n  {_line('t-all')}  \n"
    grants = parse_tokens(text)

    assert [g.prefix for g in grants] == ["fleet-a-", None]
    assert grants[0].digest == hashlib.sha256(b"t-a").digest()
    assert token_digest("t-all") == _line("t-all")


@pytest.mark.parametrize(
    "line",
    ["t-a fleet-a", "sha256:abc", "sha1:" + "a" * 40, "sha256:" + "g" * 64, _line("x", "a b")],
)
def test_a_bad_line_is_refused_by_number_never_by_content(line: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_tokens(f"{_line('ok')}\n{line}\n")

    assert "line 2" in str(excinfo.value)
    assert line not in str(excinfo.value)


def test_only_a_known_token_gets_its_grant_and_prefixes_bind_devices() -> None:
    grants = parse_tokens(f"{_line('t-a', 'fleet-a-')}\n{_line('t-all')}\n")

    fleet = match_token(grants, "t-a")
    assert fleet is not None and fleet.prefix == "fleet-a-"
    assert match_token(grants, "t-all") == Grant(hashlib.sha256(b"t-all").digest(), None)
    assert match_token(grants, "t-b") is None
    assert match_token(grants, "") is None
    assert fleet.allows("fleet-a-0001")
    assert not fleet.allows("fleet-b-0001")
    assert fleet.allows(None)  # a record naming no device cannot pose as another fleet's


def test_bearer_header_parsing() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer " + "x" * 5000):
        assert bearer(bad) is None


def test_the_store_rereads_a_rotated_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(_line("old") + "\n")
    store = TokenStore(path, check_every_s=0.0)
    assert store.authenticate("Bearer old") is not None

    path.write_text(_line("new") + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert store.authenticate("Bearer new") is not None
    assert store.authenticate("Bearer old") is None

    path.write_text("not a token line\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    assert store.authenticate("Bearer new") is not None
    assert store.problem is not None and "line 1" in store.problem


def test_a_missing_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        TokenStore(tmp_path / "absent")


def test_topic_filters_give_the_device_at_the_first_plus() -> None:
    filters = ("$share/bridges/devices/+/readings", "site/+/dev/+/#")

    assert topic_device("devices/dev-7/readings", filters) == "dev-7"
    assert topic_device("site/s1/dev/d2/temp/x", filters) == "s1"
    assert topic_device("devices/dev-7/other", filters) is None
    assert topic_device("devices/dev-7/readings/x", filters) is None
    assert topic_device("plain/topic", ("plain/topic",)) is None


def test_bad_filters_and_urls_are_config_errors() -> None:
    for bad in ("devices/a+/x", "devices/#/x", "$share//devices/+", ""):
        with pytest.raises(ConfigError):
            check_filter(bad)
    assert check_filter("$share/g/devices/+/readings") == "$share/g/devices/+/readings"
    assert parse_url("mqtt://broker") == ("broker", 1883, False)
    assert parse_url("mqtts://broker:8884") == ("broker", 8884, True)
    for bad in ("http://broker", "mqtt://user:pw@broker", "mqtt://broker:x"):
        with pytest.raises(ConfigError):
            parse_url(bad)
