"""Kafka security settings reach every client the project creates, secrets stay secret."""

import faust

from pipeline.kafka.clients import client_config
from pipeline.runtime.app import build_app, faust_credentials
from pipeline.settings import load_settings

SECRET = "s3cr3t-do-not-print"


def sasl_settings(**extra):
    return load_settings(
        kafka_bootstrap_servers="127.0.0.1:9",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="pipeline",
        kafka_sasl_password=SECRET,
        **extra,
    )


def test_confluent_clients_get_protocol_mechanism_and_credentials():
    config = client_config(sasl_settings())
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl.username"], config["sasl.password"]) == ("pipeline", SECRET)


def test_faust_workers_get_the_same_credentials():
    settings = sasl_settings()
    app, binding = build_app(settings, "parse")
    try:
        creds = app.conf.broker_credentials
        assert isinstance(creds, faust.SASLCredentials)
        assert (creds.username, creds.password) == ("pipeline", SECRET)
        assert str(creds.mechanism.value) == "SCRAM-SHA-512"
        assert creds.ssl_context is not None  # SASL over TLS
        assert SECRET not in repr(creds)
    finally:
        binding.close()


def test_plaintext_needs_no_credentials_and_ssl_gets_a_context():
    assert faust_credentials(load_settings(kafka_bootstrap_servers="h:9")) is None
    ssl_only = faust_credentials(
        load_settings(kafka_bootstrap_servers="h:9", kafka_security_protocol="SSL")
    )
    assert isinstance(ssl_only, faust.SSLCredentials)


def test_the_password_is_never_shown_by_settings():
    settings = sasl_settings()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
    assert SECRET not in settings.model_dump_json()


def test_an_unknown_security_protocol_is_a_config_error():
    import pytest

    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="kafka_security_protocol"):
        load_settings(kafka_bootstrap_servers="h:9", kafka_security_protocol="SASL")


def test_repeated_librdkafka_lines_are_let_through_once_per_interval():
    import logging

    from pipeline.kafka.clients import RepeatFilter

    gate = RepeatFilter(every_s=60)

    def line(text: str) -> logging.LogRecord:
        return logging.LogRecord("pipeline.rdkafka", logging.ERROR, "", 0, text, (), None)

    failed = "FAIL [thrd:127.0.0.1:{}/bootstrap]: Connect to 127.0.0.1:{} failed after {}ms"
    passed = [gate.filter(line(failed.format(port, port, ms))) for port, ms in [(9, 1), (9, 2)]]
    assert passed == [True, False]  # the same failure again, other numbers: dropped
    assert gate.filter(line("another kind of line"))
