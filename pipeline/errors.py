"""The project's error tree, drawn once.

::

    PipelineError
    ├── InvalidMessage   bad input: the record goes to its stage's dead-letter topic
    ├── RetryableError   a dependency is not ready: retried, then dead-lettered
    ├── ConfigError      settings or pipeline.yaml are wrong: exit code 2, one line
    └── BrokerError      no broker could be reached or started: exit code 3

Anything else raised inside a stage is a bug: the worker crashes loudly, the
offset of the record is not committed, and the record is processed again after
the restart.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidMessage(PipelineError):
    """A record that can never be processed as it is.

    ``reason`` is one of :class:`dlq.reasons.Reason`; ``str(exc)`` is a short,
    payload-free description.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RetryableError(PipelineError):
    """A record that may succeed later (e.g. the device registry lags)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(PipelineError):
    """Settings are invalid; the message says which one and what to do."""


class BrokerError(PipelineError):
    """No Kafka-protocol broker could be reached or started."""
