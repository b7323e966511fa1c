"""A real PostgreSQL server for tests: the Debian package's binaries, run as a plain
process on a free 127.0.0.1 port, with its data in a temporary directory.

::

    with PostgresServer() as pg:
        # the sink's config: {"dsn": pg.dsn}; its password from the environment:
        # PIPELINE_STAGES__<ID>__CONFIG__PASSWORD=pg.password
        pg.restart()     # the same data, a new postmaster (a database restarted mid-run)
        pg.kill()        # SIGKILL, as a crashed server; start() recovers it

Password authentication (scram-sha-256) is on, so a sink's password really travels
the way it does in production (from the environment, never the config file).
PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user
the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.kafka.embedded import free_port


def postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ConfigError(
        "PostgreSQL is not installed: apt-get install postgresql (or run `make system-deps`)"
    )


class PostgresServer:
    """One PostgreSQL server; :meth:`start` initialises it on first use."""

    def __init__(self, user: str = "pipeline", port: int | None = None) -> None:
        self.bindir = postgres_bindir()
        self.user = user
        self.password = secrets.token_urlsafe(12)
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self._initialised = False

    @property
    def dsn(self) -> str:
        """A libpq URL without the password (give that as :attr:`password`)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def connect_kwargs(self) -> dict[str, Any]:
        return {"conninfo": self.dsn, "password": self.password, "connect_timeout": 5}

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")

    def _init(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        self.socket_dir.mkdir()
        if self._as:
            owner = pwd.getpwnam("postgres")
            for path in (pwfile, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        pwfile.unlink()
        self._initialised = True

    def start(self) -> PostgresServer:
        if not self._initialised:
            self._init()
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: clients disconnected; ``immediate``: no checkpoint)."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crashed machine would (start() recovers)."""
        pid_file = self.data / "postmaster.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        # the backends notice their postmaster is gone and exit; wait for the port
        time.sleep(0.5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
