"""The PostgreSQL sink: records upserted into a table, exactly once in effect.

::

    stages:
      store:
        uses: pipeline.sinks:postgres
        inputs: [iot.aggregates]
        dlq: iot.store.dlq
        config:
          dsn: postgresql://pipeline@db:5432/iot     # no password here
          table: public.aggregates

The password comes from the environment (``PIPELINE_STAGES__STORE__CONFIG__PASSWORD``,
which the chart fills from a Secret) or a file (``password_file``), never from
pipeline.yaml (refused there). ``pipeline sink init store`` creates the table.

**Exactly-once results from at-least-once delivery.** The table's primary key is the
sink's ``key`` (by default ``device_id, metric, window_start, source``) and it has a
``version`` column. Each batch is one transaction, committed before the batch's
offsets: a multi-row upsert that writes a row only where its version is newer than
the stored one. A batch delivered again (after a crash), a replayed window or a
rewound sink changes nothing; an older version never overwrites a newer one (a
correction of a late window carries a higher version).

**Failures.** A row the database refuses (a value out of range, a check
constraint) is found with savepoints and becomes a ``db_refused`` dead letter with
the database's SQLSTATE and message; the rest of the batch is written. A database
that cannot be reached (refused, shut down, restarting, timed out, a lost
connection, a deadlock) raises :class:`~pipeline.errors.Unavailable`: the runtime
holds the batch, answers 503 on ``/readyz`` and runs it again with backoff. A
missing table is a :class:`~pipeline.errors.ConfigError` (the worker exits with one
line: run ``pipeline sink init``).

**TimescaleDB.** When the extension is available, ``sink init`` makes the table a
hypertable on ``time_column`` (a plain table otherwise; not required).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from pipeline.errors import ConfigError, InvalidMessage, Unavailable
from pipeline.records import Record
from pipeline.sinks.rows import SCHEMA_VIOLATION, VERSION, RowModel, Rows
from pipeline.stage import SinkOutputs, StageContext, stage

log = logging.getLogger("pipeline.sinks.postgres")

DB_REFUSED = "db_refused"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PG_TYPES = {
    "text": "text",
    "bigint": "bigint",
    "double": "double precision",
    "boolean": "boolean",
    "timestamp": "timestamptz",
    "json": "jsonb",
}
#: SQLSTATE classes of a row the database refuses (data exception, integrity)
_ROW_CLASSES = ("22", "23")
#: ... and of a database that cannot take the batch now (connection, resources,
#: operator intervention, system error, transaction rollback: deadlock, serialization)
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")


class PostgresConfig(RowModel):
    #: libpq connection URL or key=value string, without the password
    dsn: str = Field(min_length=1)
    #: from the environment or a Secret only (pipeline.yaml refuses it)
    password: SecretStr | None = None
    #: a file holding the password (a mounted Secret)
    password_file: str | None = None
    #: [schema.]table
    table: str = "aggregates"
    #: the hypertable's time column when TimescaleDB is there (`sink init`)
    time_column: str = "window_start"
    timescale: Literal["auto", "off"] = "auto"
    connect_timeout_s: int = Field(default=5, ge=1, le=300)
    statement_timeout_s: int = Field(default=30, ge=1, le=3600)

    @field_validator("dsn")
    @classmethod
    def _no_password_in_dsn(cls, value: str) -> str:
        if re.search(r"(?i)\bpassword\s*=", value) or re.search(r"://[^/@:]+:[^/@]*@", value):
            raise ValueError(
                "the dsn holds a password; give it as the PASSWORD setting from the "
                "environment (PIPELINE_STAGES__<ID>__CONFIG__PASSWORD) or password_file"
            )
        return value

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
            raise ValueError("use [schema.]name, letters, digits and '_'")
        return value


def _quote(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


class PostgresSink:
    """Upserts records into a table, one transaction per batch (module docstring)."""

    buffers = False

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        config: PostgresConfig = ctx.config
        self.config = config
        if VERSION not in config.columns:
            raise ConfigError(f"stage {ctx.stage_id}: the sink needs a {VERSION!r} column")
        self.rows = Rows(config)
        self.table = _quote(config.table)
        self._conn: Any = None
        self._upsert = self._upsert_sql()

    # -- SQL ---------------------------------------------------------------------------
    def _upsert_sql(self) -> str:
        cols = self.rows.columns
        names = ", ".join(f'"{c}"' for c in cols)
        arrays = ", ".join(f"%s::{_PG_TYPES[t]}[]" for t in self.rows.types)
        key = ", ".join(f'"{k}"' for k in self.rows.key)
        updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in cols if c not in self.rows.key)
        # identifiers only, each checked by the config model (_IDENT, RowModel); the
        # values travel as parameters
        return (
            f"INSERT INTO {self.table} AS t ({names}) SELECT * FROM unnest({arrays}) "  # noqa: S608
            f"ON CONFLICT ({key}) DO UPDATE SET {updates} "
            f'WHERE t."{VERSION}" < EXCLUDED."{VERSION}"'
        )

    def create_sql(self) -> list[str]:
        """The statements ``pipeline sink init`` runs (idempotent)."""
        columns = ",\n  ".join(
            f'"{c}" {_PG_TYPES[t]}' + (" NOT NULL" if c in self.rows.key else "")
            for c, t in zip(self.rows.columns, self.rows.types, strict=True)
        )
        key = ", ".join(f'"{k}"' for k in self.rows.key)
        statements = []
        if "." in self.config.table:
            statements.append(f'CREATE SCHEMA IF NOT EXISTS "{self.config.table.split(".")[0]}"')
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {self.table} (\n  {columns},\n  PRIMARY KEY ({key})\n)"
        )
        return statements

    # -- the connection -------------------------------------------------------------------
    def _password(self) -> str | None:
        config = self.config
        if config.password is not None:
            return config.password.get_secret_value()
        if config.password_file:
            try:
                return Path(config.password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"stage {self.ctx.stage_id}: cannot read password_file "
                    f"{config.password_file}: {exc.strerror}"
                ) from None
        return None

    def connection(self) -> Any:
        """The open connection, (re)connecting if needed; Unavailable if it cannot."""
        import psycopg

        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn = None
        config = self.config
        kwargs: dict[str, Any] = {
            "connect_timeout": config.connect_timeout_s,
            "options": f"-c statement_timeout={config.statement_timeout_s * 1000}",
            "application_name": f"pipeline-{self.ctx.stage_id}",
        }
        password = self._password()
        if password is not None:
            kwargs["password"] = password
        try:
            self._conn = psycopg.connect(config.dsn, **kwargs)
        except psycopg.OperationalError as exc:
            if (exc.sqlstate or "").startswith("28") or "password" in str(exc):
                env = f"PIPELINE_STAGES__{self.ctx.stage_id.upper()}__CONFIG__PASSWORD"
                raise ConfigError(
                    f"stage {self.ctx.stage_id}: postgres refused the login "
                    f"({_first_line(exc)}); give the password as {env} or password_file"
                ) from None
            raise Unavailable("postgres", _first_line(exc)) from None
        except psycopg.ProgrammingError as exc:  # a malformed dsn
            raise ConfigError(f"stage {self.ctx.stage_id}: dsn: {_first_line(exc)}") from None
        return self._conn

    def _broken(self, exc: Exception) -> Unavailable:
        """Close the connection after a transient failure; the error to raise."""
        try:
            if self._conn is not None:
                self._conn.close()
        finally:
            self._conn = None
        return Unavailable("postgres", _first_line(exc))

    # -- writing ------------------------------------------------------------------------
    def write(self, records: Sequence[Record], out: SinkOutputs) -> None:
        # newest version per key; every record of a key shares its row's outcome
        chosen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        sources: dict[tuple[Any, ...], list[Record]] = {}
        rows = self.rows
        for record in records:
            try:
                row = rows.row(record)
            except InvalidMessage as exc:
                out.dead_letter(record, exc)
                continue
            key = rows.key_of(row)
            best = chosen.get(key)
            if best is None or rows.version_of(row) >= rows.version_of(best):
                chosen[key] = row
            sources.setdefault(key, []).append(record)
        if not chosen:
            return
        refused = self._store(list(chosen.values()))
        for key, row in chosen.items():
            why = refused.get(key)
            for record in sources[key]:
                if why is None:
                    out.stored(record, [self.config.table, *rows.ref(row)])
                else:
                    out.dead_letter(record, InvalidMessage(DB_REFUSED, why))

    def _store(self, rows: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], str]:
        """Upsert ``rows`` in one transaction; the keys of rows the database refused,
        with why. Raises Unavailable (nothing written) or ConfigError."""
        import psycopg

        conn = self.connection()
        columns = [list(col) for col in zip(*rows, strict=True)]
        try:
            with conn.transaction(), conn.cursor() as cur:
                try:
                    with conn.transaction():  # a savepoint: the fast path may fail
                        cur.execute(self._upsert, columns)
                    return {}
                except psycopg.Error as exc:
                    if not _row_level(exc):
                        raise
                # one row at a time, each in its own savepoint
                refused: dict[tuple[Any, ...], str] = {}
                for row in rows:
                    try:
                        with conn.transaction():
                            cur.execute(self._upsert, [[v] for v in row])
                    except psycopg.Error as exc:
                        if not _row_level(exc):
                            raise
                        refused[self.rows.key_of(row)] = f"{exc.sqlstate}: {_first_line(exc)}"
                return refused
        except psycopg.Error as exc:
            raise self._classify(exc) from None

    def _classify(self, exc: Exception) -> Exception:
        import psycopg

        state = getattr(exc, "sqlstate", None) or ""
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or state.startswith(
            _TRANSIENT_CLASSES
        ):
            return self._broken(exc)
        if state in ("42P01", "42703", "3F000"):  # no such table, column, schema
            return ConfigError(
                f"stage {self.ctx.stage_id}: {_first_line(exc)} in {self.config.table}; "
                f"run `pipeline sink init {self.ctx.stage_id}`"
            )
        if state.startswith("28") or state == "42501":  # authentication, privilege
            return ConfigError(f"stage {self.ctx.stage_id}: postgres: {_first_line(exc)}")
        return exc  # a bug (ours or the table's): the engine's on_error decides

    # -- the schema ----------------------------------------------------------------------
    def init_schema(self) -> str:
        """Create the table (and the hypertable where TimescaleDB is there); one line
        saying what was done. Idempotent."""
        import psycopg

        conn = self.connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                for statement in self.create_sql():
                    cur.execute(statement)
                kind = "a plain table"
                if self.config.timescale == "auto":
                    cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
                    if cur.fetchone() is not None:
                        cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                        cur.execute(
                            "SELECT create_hypertable(%s, %s, if_not_exists => TRUE, "
                            "migrate_data => TRUE)",
                            [self.config.table, self.config.time_column],
                        )
                        kind = f"a TimescaleDB hypertable on {self.config.time_column}"
        except psycopg.Error as exc:
            raise self._classify(exc) from None
        return f"table {self.config.table} ready ({kind}; key {', '.join(self.rows.key)})"

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _row_level(exc: Exception) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(_ROW_CLASSES)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


postgres = stage(
    config=PostgresConfig,
    reasons={
        SCHEMA_VIOLATION: "a record without the sink's key fields, or a field of the wrong type",
        DB_REFUSED: "the database refused the row (its SQLSTATE and message say why)",
    },
    name="pipeline.sinks:postgres",
)(PostgresSink)
