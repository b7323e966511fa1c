"""The project's error tree, drawn once.

::

    PipelineError
    ├── InvalidMessage   bad input: the record goes to its stage's dead-letter topic
    ├── RetryableError   a dependency is not ready: retried, then dead-lettered
    ├── ConfigError      settings, pipeline.yaml or a stage's declaration are wrong:
    │                    exit code 2, one line
    ├── BrokerError      no broker could be reached or started: exit code 3
    │   └── DeliveryError   the broker did not acknowledge a produced record
    │       └── RecordsRefused  ... and never will (too large, invalid): those
    │                           records become ``unwritable`` dead letters
    ├── BudgetExceeded   a stage dead-lettered more than its budget allows
    └── StageStopped     the stage stopped consuming (its budget); the batch was
                         not delivered

Anything else raised inside a stage is a bug in stage code. The stage's
``on_error`` policy decides: ``dead_letter`` (the default: a ``processing_error``
dead letter, counted by the budget) or ``crash`` (the worker exits with code 70
without committing, and the record is processed again after the restart).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidMessage(PipelineError):
    """A record that can never be processed as it is.

    ``reason`` is a reason code the stage declared (or a framework one, see
    :mod:`dlq.reasons`); ``str(exc)`` is a short, payload-free description.
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


class DeliveryError(BrokerError):
    """The broker did not acknowledge a produced record."""


class RecordsRefused(DeliveryError):
    """Some records of a batch were refused for good (too large, invalid); retrying
    them cannot help. ``refused`` maps each one's index in the batch to why;
    ``deliveries`` holds the coordinates of the others, which were written."""

    def __init__(self, message: str, refused: dict[int, str], deliveries: object) -> None:
        super().__init__(message)
        self.refused = refused
        self.deliveries = deliveries


class BudgetExceeded(PipelineError):
    """The stage must stop; ``str(exc)`` says which limit and the numbers."""


class StageStopped(PipelineError):
    """The stage has stopped consuming (dead-letter budget); the batch was not delivered."""
