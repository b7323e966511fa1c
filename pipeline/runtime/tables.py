"""Faust tables whose changelog topic has the name pipeline.yaml gives it.

Faust's partition assignor derives a table's changelog topic name from the app id
and table name (``Collection._changelog_topic_name``) even when a custom
``changelog_topic`` is passed, so a table fed by a topic of another name
(``iot.devices``) never gets its partitions assigned. Overriding the name at the
source keeps the assignor, recovery and writes on one topic.
"""

from __future__ import annotations

from typing import Any

import faust


class NamedTable(faust.Table[bytes, bytes]):
    def __init__(self, app: Any, *, changelog_name: str, **kwargs: Any) -> None:
        self._changelog_name = changelog_name
        super().__init__(app, **kwargs)

    def _changelog_topic_name(self) -> str:
        return self._changelog_name


class NamedGlobalTable(faust.GlobalTable):
    def __init__(self, app: Any, *, changelog_name: str, **kwargs: Any) -> None:
        self._changelog_name = changelog_name
        super().__init__(app, **kwargs)

    def _changelog_topic_name(self) -> str:
        return self._changelog_name


def _raw_schema() -> Any:
    """Keys and values are bytes; the stages encode and decode them."""
    return faust.Schema(
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def _options(app: Any, name: str, changelog: str, partitions: int) -> dict[str, Any]:
    """What both kinds of table share: bytes in and out, the changelog's own name."""
    return {
        "name": name,
        "changelog_name": changelog,
        "partitions": partitions,
        "default": None,
        "beacon": app.tables.beacon,
        "schema": _raw_schema(),
        "key_type": bytes,
        "value_type": bytes,
    }


def named_table(app: Any, name: str, changelog: str, partitions: int) -> NamedTable:
    """A partitioned table (one changelog partition per input partition)."""
    table = NamedTable(app, **_options(app, name, changelog, partitions))
    return app.tables.add(table)  # type: ignore[no-any-return]


def named_global_table(app: Any, name: str, changelog: str, partitions: int) -> NamedGlobalTable:
    """A table every worker holds whole, kept in sync with its topic after recovery
    (``synchronize_all_active_partitions``: the topic is written by other processes).

    Both buffer sizes are 1: Faust assigns a global table's changelog partitions as
    active *and* standby, and after recovery buffers each new record of an active
    partition until ``recovery_buffer_size`` (default 1000) have arrived — a device
    registered while the worker runs would stay invisible until 999 more follow.
    """
    table = NamedGlobalTable(
        app,
        **_options(app, name, changelog, partitions),
        recovery_buffer_size=1,
        standby_buffer_size=1,
        is_global=True,
        synchronize_all_active_partitions=True,
    )
    return app.tables.add(table)  # type: ignore[no-any-return]
