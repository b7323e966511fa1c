"""Bearer tokens of the HTTP gateway: stored hashed, compared in constant time,
optionally bound to a device-id prefix.

The tokens file (the chart mounts it from a Secret) holds one token a line::

    # comments and blank lines are ignored
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 fleet-a-
    sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

``sha256:<64 hex digits>`` is the SHA-256 of the token's UTF-8 bytes
(``printf %s "$TOKEN" | sha256sum``); the optional second field is a device-id
prefix: that token may only write readings of devices whose id starts with it.
A line without a prefix may write for any device.

:meth:`TokenStore.authenticate` hashes the presented token once and compares it
with every entry using :func:`hmac.compare_digest`, never stopping early, so the
time taken says nothing about which entry (or how much of one) matched. Tokens
never appear in logs, errors or metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

_LINE = re.compile(r"^sha256:([0-9a-fA-F]{64})(?:\s+(\S+))?\s*$")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token may do: write for devices whose id starts with ``prefix``
    (every device when None)."""

    digest: bytes
    prefix: str | None = None

    def allows(self, device_id: str | None) -> bool:
        """True if the token may write a reading of ``device_id``. A record naming no
        readable device is let through: it cannot be written as another fleet's
        device, and parse dead-letters it."""
        if self.prefix is None or device_id is None:
            return True
        return device_id.startswith(self.prefix)


def parse_tokens(text: str, source: str = "tokens file") -> tuple[Grant, ...]:
    """The grants of a tokens file; ConfigError naming the first bad line (by number,
    never its content: it may hold a token pasted in clear)."""
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(
                f"{source} line {number}: expected 'sha256:<64 hex digits> [device-id prefix]' "
                "(store the SHA-256 of each token, never the token)"
            )
        grants.append(Grant(bytes.fromhex(match.group(1)), match.group(2)))
    return tuple(grants)


def token_digest(token: str) -> str:
    """The line a tokens file holds for ``token`` (without a prefix)."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def match_token(grants: Iterable[Grant], token: str) -> Grant | None:
    """The grant whose digest is the token's, compared in constant time with every grant."""
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    found: Grant | None = None
    for grant in grants:
        if hmac.compare_digest(grant.digest, digest) and found is None:
            found = grant
    return found


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None otherwise."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 4096:
        return None
    return token


class TokenStore:
    """The grants of a tokens file, re-read when the file changes (a rotated Secret),
    checked at most every ``check_every_s``. A file that turns unreadable or invalid
    keeps the last good grants (and says so once per change)."""

    def __init__(self, path: str | Path, check_every_s: float = 5.0) -> None:
        self._path = Path(path)
        self._every = check_every_s
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._grants = self._read()
        self._checked = time.monotonic()
        self.problem: str | None = None

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {self._path}: {exc.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[Grant, ...]:
        try:
            text = self._path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read tokens file {self._path}: {exc}") from None
        return parse_tokens(text, f"tokens file {self._path}")

    @property
    def grants(self) -> tuple[Grant, ...]:
        now = time.monotonic()
        if now - self._checked >= self._every:
            with self._lock:
                self._checked = now
                self._reload()
        return self._grants

    def _reload(self) -> None:
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._grants, self._stamp, self.problem = self._read(), stamp, None
        except ConfigError as exc:
            self.problem = str(exc)

    def authenticate(self, authorization: str | None) -> Grant | None:
        """The grant of the request's bearer token; None when missing or unknown."""
        token = bearer(authorization)
        if token is None:
            return None
        return match_token(self.grants, token)
