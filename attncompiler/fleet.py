"""The optional second cache level shared by a fleet of machines: a Redis hash per environment.

``ATTNCOMPILER_CACHE_URL=redis://[:password@]host[:port][/db]`` (or the ``cache_url`` option)
turns it on. Each environment (see :mod:`attncompiler.cache`) is one hash,
``attncompiler:tuning:<fingerprint>``, whose fields are shape buckets and whose values are JSON
entries, validated like local ones. The client speaks RESP over a plain socket with short
timeouts; when the server cannot be reached the level logs one warning and stays out of the way
for a while, so Redis being down never fails or slows down a model.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

from .cache import Entry, Environment, valid_entries, warn_once

log = logging.getLogger("attncompiler")

RETRY_AFTER_S = 30.0


class RedisError(Exception):
    """An error reply from the server or a broken reply stream."""


def parse_url(url: str) -> tuple[str, int, int, str | None]:
    """``(host, port, db, password)`` of a ``redis://`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"cache URL must look like redis://host:port/db, got {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database of a redis:// URL is a number, got {path!r} in {url!r}")
    return parts.hostname, parts.port or 6379, int(path or 0), parts.password


class RedisClient:
    """A minimal blocking Redis client: one connection, commands as RESP arrays of bulk strings."""

    def __init__(self, host: str, port: int = 6379, db: int = 0, password: str | None = None,
                 timeout: float = 0.5):
        self.host, self.port, self.db, self.password, self.timeout = host, port, db, password, timeout
        self._sock: socket.socket | None = None
        self._reader = None

    @classmethod
    def from_url(cls, url: str, timeout: float = 0.5) -> "RedisClient":
        host, port, db, password = parse_url(url)
        return cls(host, port, db, password, timeout)

    def execute(self, *args: str | bytes | int) -> object:
        """Send one command and return its decoded reply; OSError or RedisError on failure."""
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(encode(args))
            return self._read()
        except (OSError, RedisError):
            self.close()
            raise

    def hgetall(self, key: str) -> dict[str, str]:
        flat = self.execute("HGETALL", key) or []
        return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}

    def hset(self, key: str, field: str, value: str) -> int:
        return self.execute("HSET", key, field, value)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def _connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._reader = self._sock.makefile("rb")
        if self.password is not None:
            self.execute("AUTH", self.password)
        if self.db:
            self.execute("SELECT", self.db)

    def _read(self) -> object:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError("connection closed in the middle of a reply")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RedisError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            data = self._reader.read(size + 2)
            if len(data) != size + 2:
                raise RedisError("connection closed in the middle of a reply")
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            count = int(body)
            return None if count < 0 else [self._read() for _ in range(count)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


def encode(args: tuple) -> bytes:
    """A command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RemoteCache:
    """The Redis level of one environment. Every failure is a single warning, never an exception."""

    def __init__(self, url: str, environment: Environment, timeout: float = 0.5):
        self.url = url
        self.key = f"attncompiler:tuning:{environment.fingerprint()}"
        self.client = RedisClient.from_url(url, timeout)
        self._down_until = 0.0

    def load(self) -> dict[str, Entry]:
        raw = self._call("HGETALL", lambda: self.client.hgetall(self.key))
        if not raw:
            return {}
        decoded = {}
        for field, value in raw.items():
            try:
                decoded[field] = json.loads(value)
            except json.JSONDecodeError:
                decoded[field] = None  # rejected (and counted) by valid_entries
        return valid_entries(decoded, f"{self.url} {self.key}")

    def store(self, key: str, entry: Entry) -> None:
        self._call("HSET", lambda: self.client.hset(self.key, key, json.dumps(entry.to_json())))

    def _call(self, what: str, action):
        if time.monotonic() < self._down_until:
            return None
        try:
            return action()
        except (OSError, RedisError, ValueError) as e:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            warn_once(f"redis:{self.url}", "attncompiler: shared tuning cache %s unavailable (%s failed: %s); "
                      "using the local cache only", self.url, what, e)
            return None
