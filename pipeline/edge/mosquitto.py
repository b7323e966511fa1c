"""A Mosquitto of its own on a 127.0.0.1 port, for the demo, the tests and the bench
(never production: there the MQTT broker is the fleet's).

It writes its own config file: one listener on 127.0.0.1, anonymous access (or a
password file), persistence in ``data_dir`` so a restart keeps QoS 1 sessions and
their queued messages, no limit on messages queued for an offline client (the
default of 1000 drops the rest: a bridge that is down for a while would lose
readings), and ``user`` set to the current user (Mosquitto started as root drops
to user "mosquitto" otherwise, which cannot write ``data_dir``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.kafka.embedded import _die_with_parent, free_port


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise ConfigError(
            "mosquitto is not installed; run `make system-deps` (apt-get install mosquitto)"
        )
    return found


@dataclass
class Mosquitto:
    """A running (or stopped) Mosquitto; :meth:`restart` keeps port and data."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "autosave_interval 1",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            f"user {getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *self.extra,
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # never outlives its starter
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(
                    f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not listen on {self.port} within {timeout:.0f}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its sessions and queued messages, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(
    data_dir: Path, port: int | None = None, extra: tuple[str, ...] = ()
) -> Mosquitto:
    """Start Mosquitto on 127.0.0.1 (a free port unless given) with its data in ``data_dir``."""
    os.makedirs(data_dir, exist_ok=True)
    return Mosquitto(port or free_port(), data_dir, extra=extra).start()
