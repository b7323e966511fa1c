"""What every ``pipeline`` command shares: error handling, settings, tables.

Kept apart from :mod:`pipeline.cli` so that command modules (``cli_dlq``,
``cli_replay``, ``cli_lineage``) can import it without importing the group.
Errors go to stderr as one line saying what to do, with exit codes:
2 configuration or usage, 3 broker unreachable, 1 anything else that failed.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from confluent_kafka import KafkaException

from pipeline.errors import BrokerError, ConfigError, PipelineError
from pipeline.kafka.clients import broker_error
from pipeline.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CONFIG = 2
EXIT_BROKER = 3


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), EXIT_CONFIG)
        except BrokerError as exc:
            fail(str(exc), EXIT_BROKER)
        except PipelineError as exc:
            fail(str(exc), 1)
        except KafkaException as exc:  # a client call no command wrapped: still one line
            fail(str(broker_error("the broker refused a request", exc)), EXIT_BROKER)
        return None

    return wrapper  # type: ignore[return-value]


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    return load_settings(ctx.obj.get("config"), **overrides)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain table. Cells are made safe (they may hold arbitrary text from
    records, which must neither be read as rich markup nor reach the terminal as
    control characters); output that is not a terminal is not squeezed into 80
    columns (it is for grep)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)
    table = Table(box=None, pad_edge=False)
    for i, header in enumerate(headers):
        table.add_column(header, no_wrap=i == 0)
    for row in rows:
        table.add_row(*(escape(clean(cell(c))) for c in row))
    console.print(table)


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def clean(text: str) -> str:
    """One printable line: control characters (and newlines) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
