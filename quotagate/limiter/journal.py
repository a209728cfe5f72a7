"""The fail-open backlog's local journal: usage admitted while the store was away survives a
gateway killed before it could write it back.

Each gateway process (each worker) owns one file, ``<instance>.journal``, locked through
``<instance>.lock`` (``flock``) for as long as it lives. One JSON line per change:

- ``{"k": [env, what, slot_ms], "v": n}`` — the entry now holds ``n`` (0: gone);
- ``{"k": [...], "w": n, "id": "..."}`` — about to write ``n`` of it back under that id (at
  most one such intent per entry is open: a write-back that timed out is sent again as it
  was until it is answered);
- ``{"k": [...], "v": n, "d": "..."}`` — that write-back answered, and the entry's value now
  (one line: no crash can leave the one without the other).

Lines are written at once (a killed process loses none: the OS has them) and ``fsync``-ed at
most every ``SYNC_S`` (a power loss may lose the last second). When the backlog is empty the
file is emptied; past ``COMPACT_BYTES`` it is rewritten with what is pending.

On start, every journal whose lock is free belongs to a process that is gone: it is claimed
(its lock taken, so of two instances starting at once one claims it), replayed, and each entry
written back under an id derived from the file and the entry — the store remembers ids for 40
days (decide.lua / settle.lua ``seen``), so an entry written back before a crash, or by an
earlier claim, is not counted again. Then the files are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("quotagate.journal")

SYNC_S = 1.0
COMPACT_BYTES = 64 * 1024 * 1024

Key = tuple[str, str, int]


def _lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created), or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Journal:
    """This process's journal (``open`` takes its lock)."""

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.path = directory / f"{name}.journal"
        self._lock_path = directory / f"{name}.lock"
        self._lock_fd: int | None = None
        self._fd = -1
        self._dirty = False
        self._sync: asyncio.TimerHandle | None = None
        self.size = 0

    def open(self) -> Journal:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self._lock_path)
        if self._lock_fd is None:
            raise RuntimeError(f"journal {self.path} is locked by another process")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o600)
        self.size = os.fstat(self._fd).st_size
        return self

    def value(self, key: Key, n: int, done: str | None = None) -> None:
        self._write({"k": key, "v": n} if done is None else {"k": key, "v": n, "d": done})

    def intent(self, key: Key, n: int, record_id: str) -> None:
        self._write({"k": key, "w": n, "id": record_id})

    def _write(self, line: dict) -> None:
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # a short write (a full disk) must not leave half a line
            view = view[os.write(self._fd, view):]
        self.size += len(data)
        if not self._dirty:
            self._dirty = True
            with contextlib.suppress(RuntimeError):  # no loop (closing): synced at close
                self._sync = asyncio.get_running_loop().call_later(SYNC_S, self.sync)

    def sync(self) -> None:
        self._sync = None
        if self._dirty and self._fd >= 0:
            self._dirty = False
            try:
                os.fsync(self._fd)
            except OSError as exc:
                log.error("journal %s: fsync failed (%s)", self.path, exc)

    def reset(self, pending: dict[Key, int], in_doubt: dict[Key, tuple[str, int]]) -> None:
        """The file is rewritten to hold only ``pending`` and the open intents (empty:
        nothing)."""
        if pending or in_doubt:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for key, n in pending.items():
                    f.write(json.dumps({"k": key, "v": n}, separators=(",", ":")) + "\n")
                for key, (record_id, n) in in_doubt.items():
                    f.write(json.dumps({"k": key, "w": n, "id": record_id},
                                       separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        else:
            os.ftruncate(self._fd, 0)
        self.size = os.fstat(self._fd).st_size

    def abandon(self) -> None:
        """The journal failed (a full disk): its file goes — nobody may replay entries this
        process still holds in memory — but the lock stays held until the process ends."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self._sync is not None:
            self._sync.cancel()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        _abandoned.append(self._lock_fd)  # kept open: released when the process ends
        self._lock_fd = None

    def close(self, remove: bool = False) -> None:
        """Sync and release; ``remove``: nothing is pending, the files go too (before the
        lock is released, so no other process claims them meanwhile)."""
        if self._sync is not None:
            self._sync.cancel()
        self.sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            for path in (self.path, self._lock_path):
                with contextlib.suppress(OSError):
                    path.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


#: Lock descriptors of abandoned journals, held for the life of the process.
_abandoned: list[int | None] = []


def replay(path: Path) -> list[tuple[Key, int, str]]:
    """What a journal still holds: (key, amount, record id) to write back. An intent its
    answer (``d``) never closed is sent again under its own id (it may have been written
    already: the id tells the store); the rest under an id of the file and entry."""
    values: dict[Key, int] = {}
    intents: dict[Key, tuple[int, str]] = {}
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
                key = (str(line["k"][0]), str(line["k"][1]), int(line["k"][2]))
                if "v" in line:
                    value = int(line["v"])
                    values[key] = value
                    if "d" in line and intents.get(key, (0, ""))[1] == line["d"]:
                        intents.pop(key)  # answered
                elif "w" in line:
                    intents[key] = (int(line["w"]), str(line["id"]))
            except (ValueError, KeyError, IndexError, TypeError):
                log.warning("journal %s: a line that cannot be read is skipped: %r",
                            path.name, raw[:200])  # cut by the crash
    out: list[tuple[Key, int, str]] = []
    for key, (n, record_id) in intents.items():
        out.append((key, n, record_id))  # it may have run: the same id tells the store
        values[key] = values.get(key, 0) - n  # the entry's value still includes it
    for key, n in values.items():
        if n > 0:
            out.append((key, n, f"{path.stem}.{key[1]}.{key[2]}"))
    return out


WriteBack = Callable[[str, str, int, int, str], Awaitable[bool]]


async def recover(directory: Path, own: str, write_back: WriteBack) -> int:
    """Claim and write back every journal in ``directory`` whose process is gone (not
    ``own``); returns the entries written. Raises what ``write_back`` raises (the store is
    away: the file stays, for the next attempt)."""
    if not directory.is_dir():
        return 0
    written = 0
    stems = {p.stem for p in directory.iterdir() if p.suffix in (".journal", ".lock", ".tmp")}
    for stem in sorted(stems - {own}):
        path = directory / f"{stem}.journal"
        try:
            lock = _lock(directory / f"{stem}.lock")
        except OSError as exc:
            log.error("journal %s cannot be claimed (%s): left as it is", path.name, exc)
            continue
        if lock is None:
            continue  # its process lives, or another instance is claiming it
        try:
            (directory / f"{stem}.tmp").unlink(missing_ok=True)  # a compaction cut short
            try:
                entries = replay(path) if path.exists() else []
            except OSError as exc:
                log.error("journal %s cannot be read (%s): left as it is", path.name, exc)
                continue
            for (env, what, slot_ms), n, record_id in entries:
                if not await write_back(env, what, n, slot_ms, record_id):
                    log.error("journal %s: usage of %s (%d %s) lost: the store has no such "
                              "environment", path.name, env, n, what)
                written += 1
            path.unlink(missing_ok=True)
            (directory / f"{stem}.lock").unlink(missing_ok=True)
            if entries:
                log.warning("journal %s of a gateway that stopped during a store outage: "
                            "%d usage entries written back", path.name, len(entries))
        finally:
            os.close(lock)
    return written
