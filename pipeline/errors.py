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
    ├── Overloaded       a door (the HTTP gateway) has as many records waiting for
    │                    the broker as it admits: the client is told to retry (429)
    ├── Unavailable      a system outside Kafka that the stage needs (a database,
    │                    an object store) cannot be reached: the batch is retried
    │                    whole, in place, with backoff; nothing is dead-lettered
    │                    or committed meanwhile, and /readyz answers 503
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


class Overloaded(PipelineError):
    """Too many records are waiting for the broker's acknowledgement to admit more:
    nothing of the request was written; the client retries later (HTTP 429)."""


class Unavailable(PipelineError):
    """A system outside Kafka that the stage depends on (a sink's database or object
    store) cannot be reached, or answers that it cannot take writes now.

    Not the record's fault: the engine neither dead-letters nor retries single
    records for it. The runtime holds the whole batch, marks the worker not ready,
    waits with backoff and runs the batch again until it goes through (or the
    partition moves to another worker). ``dependency`` names the system (a metric
    label: keep it a fixed word such as ``postgres``)."""

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class BudgetExceeded(PipelineError):
    """The stage must stop; ``str(exc)`` says which limit and the numbers."""


class StageStopped(PipelineError):
    """The stage has stopped consuming (dead-letter budget); the batch was not delivered."""


class StateUnreadable(PipelineError):
    """Too many of a partition's state records cannot be read to set them aside one by
    one (a codec or version problem, not a corrupt record): the load stops."""
