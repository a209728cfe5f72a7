"""The access log: one JSON line per request on the public listener (``access_log``, on by
default), to stderr — as Kong, APISIX and Envoy operators read theirs — or appended to
``access_log_file`` (opened again at each reload: SIGHUP after a rotation).

Each line: ``ts``, ``level``, ``logger`` (``quotagate.access``), ``msg`` (the members of every
``--log-format json`` line), ``request_id``, ``method``, ``path`` (no query: it may carry
tokens), ``env``, ``route``, ``kind``, ``status``, ``decision`` (``admitted``, ``bypassed``,
``shadow-refused``, ``off``, ``queued``, or the refusal's problem type — the word
``quotagate_decisions_total`` and ``quotagate_invalid_requests_total`` use),
``upstream_status``, ``bytes`` (response body), ``duration_ms`` and ``upstream_ms``. Every
request is logged once, refusals before the store included.

Lines are encoded with msgspec and written every ``FLUSH_S`` (50 ms) or 64 KiB, cut at line
boundaries below the pipe's atomic size so workers sharing stderr never interleave within a
line; a stopping gateway writes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec

log = logging.getLogger("quotagate.server")

#: Lines are written in pieces no larger than this (POSIX: writes up to PIPE_BUF bytes to a
#: pipe are atomic).
ATOMIC_BYTES = 4096


class Entry(msgspec.Struct, kw_only=True):
    """One request, filled in as the handler learns it. The first four members are those of
    every line of ``--log-format json`` (common/logs.py), so one pipeline reads both."""

    ts: str = ""
    level: str = "info"
    logger: str = "quotagate.access"
    msg: str = ""
    request_id: str = ""
    method: str
    path: str
    env: str | None = None
    route: str | None = None
    kind: str | None = None
    status: int = 0
    decision: str = ""
    upstream_status: int | None = None
    bytes: int = 0
    duration_ms: float = 0.0
    upstream_ms: int | None = None


_ENCODER = msgspec.json.Encoder()
#: Lines are written at most this often (or when this many bytes wait): a few writes a second
#: however busy, rather than one per loop iteration.
FLUSH_S = 0.05
FLUSH_BYTES = 64 * 1024


class AccessLog:
    def __init__(self, fd: int = 2, path: Path | None = None):
        self.fd = fd
        #: The file it appends to (its descriptor its own), or None for stderr.
        self.path = path
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    @classmethod
    def to(cls, path: Path | None) -> AccessLog:
        """To stderr, or appended to ``path`` (created; O_APPEND: workers sharing it never
        write over each other's lines)."""
        if path is None:
            return cls()
        try:
            return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640), path)
        except OSError as exc:  # a request is never refused for its log line
            log.error("access_log_file %s cannot be written (%s): the access log goes to "
                      "stderr", path, exc.strerror or exc)
            return cls()

    def close(self) -> None:
        """Write what is left; close the file, if it is one of its own."""
        self.flush()
        if self.path is not None:
            os.close(self.fd)
            self.path = None
            self.fd = -1

    def _now(self) -> str:
        """ISO 8601 UTC with milliseconds; the date and time formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def write(self, entry: Entry, started: float) -> None:
        entry.duration_ms = round((time.perf_counter() - started) * 1000, 3)
        entry.ts = self._now()
        entry.msg = f"{entry.method} {entry.path} {entry.status}"
        line = _ENCODER.encode(entry) + b"\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > ATOMIC_BYTES:
                self._out(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._out(b"".join(chunk))

    def _out(self, data: bytes) -> None:
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError:  # a full non-blocking pipe, a closed stderr: dropped, never queued
            pass
