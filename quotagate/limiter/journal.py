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

Nothing in a journal is trusted: each line is checked against what ``_write`` writes (the
fields of one of the three forms above and nothing else; integers, amounts 0 to 2^53 - 1 as
everywhere else; the key an environment id of the grammar, a known route kind or
``meter:<meter>``, a slot's start). A line that is not (cut by a crash, a disk's garbage, a
hand's edit) is skipped — logged with its file and line number, counted in
``quotagate_journal_lines_skipped_total`` — and the rest goes on. A store error on one entry
(an error reply for its keys) is tried again a few times, then the entry is kept in its
journal (rewritten to hold only what is left, under the same ids) for a later attempt while
the other entries and journals go on; only the store being away stops a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, get_args

from quotagate.common import metrics
from quotagate.common.aio import stop_if_cancelling
from quotagate.common.envids import ENV_ID
from quotagate.limiter.errors import StoreError, StoreUnavailable, count_store_error
from quotagate.settings.schema import MAX_EXACT, Meter, RouteKind

log = logging.getLogger("quotagate.journal")

SYNC_S = 1.0
COMPACT_BYTES = 64 * 1024 * 1024

Key = tuple[str, str, int]

#: What a key's second part may be: a route kind (decide.lua) or ``meter:<meter>``
#: (settle.lua; backlog.METER_PREFIX).
KNOWN_WHAT = frozenset([*get_args(RouteKind), *(f"meter:{m}" for m in get_args(Meter))])
#: A key's third part is the start of a slot of this length (backlog.SLOT_MS: backlog.py
#: imports this module, not the other way round).
SLOT_MS = 15 * 60 * 1000
#: The longest line read (the journal's own are under 400 bytes); longer ones are skipped
#: without being held in memory whole.
MAX_LINE = 4096
#: Record ids: the journal's own are ``<instance>.<n>`` (new_instance_id: letters, digits,
#: ``-`` and ``.``) and ``<file>.<what>.<slot>``.
MAX_RECORD_ID = 256
#: Skipped lines logged one by one per journal; beyond, one line says how many more.
LOGGED_PER_FILE = 20
#: Attempts at writing back one entry in one pass, the first RETRY_S after the one before,
#: doubling; then it is kept for a later pass.
ATTEMPTS = 4
RETRY_S = 0.25

_FORMS = (frozenset({"k", "v"}), frozenset({"k", "v", "d"}), frozenset({"k", "w", "id"}))


class BadLine(ValueError):
    """A journal line that is not one the journal writes (its reason)."""


def _reject_constant(name: str) -> Any:
    raise BadLine(f"{name} is not a number the journal writes")


def _reject_float(text: str) -> Any:
    raise BadLine(f"{text[:40]} is not an integer")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    line = dict(pairs)
    if len(line) != len(pairs):
        raise BadLine("a field given twice")
    return line


def _amount(line: dict[str, Any], name: str, low: int) -> int:
    n = line[name]
    if type(n) is not int or not low <= n <= MAX_EXACT:
        raise BadLine(f"{name}: not an integer from {low} to 2^53 - 1")
    return n


def _record_id(line: dict[str, Any], name: str) -> str:
    rid = line[name]
    if (not isinstance(rid, str) or not 0 < len(rid) <= MAX_RECORD_ID
            or not all(c.isalnum() or c in "-._:" for c in rid)):
        raise BadLine(f"{name}: not a record id")
    return rid


def parse_line(raw: bytes) -> tuple[Key, dict[str, Any]]:
    """One journal line, checked: its key and its fields (``v``, ``w`` ints, ``d``, ``id``
    record ids). Raises BadLine (its reason) for anything ``Journal._write`` does not write."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    try:
        line = json.loads(text, parse_constant=_reject_constant, parse_float=_reject_float,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise BadLine("nested too deep") from None
    except BadLine:
        raise
    except ValueError as exc:  # (JSONDecodeError; an integer of too many digits)
        raise BadLine(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(line, dict) or frozenset(line) not in _FORMS:
        raise BadLine("not a journal line (unknown or missing fields)")
    k = line["k"]
    if not isinstance(k, list) or len(k) != 3:
        raise BadLine("k: not [env, what, slot]")
    env, what, slot = k
    if not isinstance(env, str) or not ENV_ID.fullmatch(env):
        raise BadLine("k: not an environment id")
    if not isinstance(what, str) or what not in KNOWN_WHAT:
        raise BadLine("k: not a route kind or meter:<meter>")
    if type(slot) is not int or not 0 <= slot <= MAX_EXACT or slot % SLOT_MS:
        raise BadLine("k: not the start of a slot")
    fields: dict[str, Any] = {}
    if "v" in line:
        fields["v"] = _amount(line, "v", 0)
        if "d" in line:
            fields["d"] = _record_id(line, "d")
    else:
        fields["w"] = _amount(line, "w", 1)
        fields["id"] = _record_id(line, "id")
    return (env, what, slot), fields


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, whole): a line longer than MAX_LINE is given cut (whole False),
    the rest of it read past."""
    number = 0
    while raw := f.readline(MAX_LINE + 1):
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            rest = raw
            while rest and not rest.endswith(b"\n"):
                rest = f.readline(64 * 1024)
            yield number, raw, False
        else:
            yield number, raw, True


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
    already: the id tells the store); the rest under an id of the file and entry. A line
    that is not one the journal writes is skipped (logged, counted)."""
    return _replay(path)[0]


def _replay(path: Path) -> tuple[list[tuple[Key, int, str]], int]:
    """``replay``, and how many lines were skipped."""
    values: dict[Key, int] = {}
    intents: dict[Key, tuple[int, str]] = {}
    skipped = 0
    with open(path, "rb") as f:
        for number, raw, whole in _lines(f):
            if not raw.strip():
                continue
            try:
                if not whole:
                    raise BadLine(f"longer than {MAX_LINE} bytes")
                key, line = parse_line(raw)
            except Exception as exc:  # whatever a line holds, the next ones are read
                skipped += 1
                if skipped <= LOGGED_PER_FILE:
                    reason = str(exc) if isinstance(exc, BadLine) else repr(exc)
                    log.warning("journal %s, line %d: skipped, %s: %r", path, number,
                                reason, raw[:200])
                continue
            if "v" in line:
                values[key] = line["v"]
                if "d" in line and intents.get(key, (0, ""))[1] == line["d"]:
                    intents.pop(key)  # answered
            else:
                intents[key] = (line["w"], line["id"])
    if skipped:
        metrics.JOURNAL_LINES_SKIPPED.inc(skipped)
        if skipped > LOGGED_PER_FILE:
            log.warning("journal %s: %d more lines skipped", path, skipped - LOGGED_PER_FILE)
    out: list[tuple[Key, int, str]] = []
    for key, (n, record_id) in intents.items():
        out.append((key, n, record_id))  # it may have run: the same id tells the store
        values[key] = values.get(key, 0) - n  # the entry's value still includes it
    for key, n in values.items():
        if n > 0:
            out.append((key, n, _derived_id(path, key)))
    return out, skipped


def _derived_id(path: Path, key: Key) -> str:
    """The record id of what a journal holds beyond its open intents."""
    return f"{path.stem}.{key[1]}.{key[2]}"


def _keep(path: Path, entries: list[tuple[Key, int, str]]) -> None:
    """Rewrite ``path`` to hold just ``entries``, each replayed under its own id again: an
    entry's value line (the sum of what is left of it) and its open intent, if any."""
    totals: dict[Key, int] = {}
    lines: list[dict[str, Any]] = []
    for key, n, record_id in entries:
        totals[key] = totals.get(key, 0) + n
        if record_id != _derived_id(path, key):
            lines.append({"k": key, "w": n, "id": record_id})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for line in [*({"k": key, "v": n} for key, n in totals.items()), *lines]:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


WriteBack = Callable[[str, str, int, int, str], Awaitable[bool]]


@dataclass
class Recovered:
    """What a recovery pass did: entries written back, entries kept for a later pass (a
    store error on each, tried ATTEMPTS times), lines skipped."""

    written: int = 0
    kept: int = 0
    skipped: int = 0


async def recover(directory: Path, own: str, write_back: WriteBack, *,
                  attempts: int = ATTEMPTS, retry_s: float = RETRY_S,
                  leases: Callable[[Path, str], Awaitable[int]] | None = None) -> Recovered:
    """Claim and write back every journal in ``directory`` whose process is gone (not
    ``own``). An entry the store answers with an error is tried ``attempts`` times, then kept
    in its journal for a later pass; the others and the other journals go on. Raises
    StoreUnavailable when the store is away (what is left stays, for the next attempt).
    ``leases``: told each claimed ``<stem>.leases`` (hot.py's lease journal) and the stopped
    instance's name, before the files go; a StoreError keeps them for a later pass."""
    done = Recovered()
    if not directory.is_dir():
        return done
    stems = {p.stem for p in directory.iterdir()
             if p.suffix in (".journal", ".lock", ".tmp", ".leases")}
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
                entries, skipped = _replay(path) if path.exists() else ([], 0)
            except OSError as exc:
                log.error("journal %s cannot be read (%s): left as it is", path.name, exc)
                continue
            done.skipped += skipped
            left = await _write_back(path, entries, skipped, write_back, attempts, retry_s)
            done.written += len(entries) - len(left)
            done.kept += len(left)
            if left:
                continue
            leased = directory / f"{stem}.leases"
            if leases is not None and leased.exists():
                try:
                    told = await leases(leased, stem)
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    count_store_error(exc)
                    log.error("lease journal %s not told to the store (%s): kept for a later "
                              "pass", leased.name, exc)
                    done.kept += 1
                    continue
                leased.unlink(missing_ok=True)
                if told:
                    log.warning("lease journal %s of a gateway that stopped: %d leases told "
                                "to the store", leased.name, told)
            path.unlink(missing_ok=True)
            (directory / f"{stem}.lock").unlink(missing_ok=True)
            if entries:
                log.warning("journal %s of a gateway that stopped during a store outage: "
                            "%d usage entries written back", path.name, len(entries))
        finally:
            os.close(lock)
    return done


async def _write_back(path: Path, entries: list[tuple[Key, int, str]], skipped: int,
                      write_back: WriteBack, attempts: int, retry_s: float
                      ) -> list[tuple[Key, int, str]]:
    """Write back one journal's ``entries``; returns those kept (the journal rewritten to
    hold just them, and without the lines skipped, when anything changed)."""
    left = dict(enumerate(entries))
    failed: dict[int, BaseException] = {}
    try:
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(retry_s * 2 ** (attempt - 1))
            failed = {}
            for i, ((env, what, slot_ms), n, record_id) in list(left.items()):
                try:
                    found = await write_back(env, what, n, slot_ms, record_id)
                except StoreUnavailable:
                    raise  # the store is away: every entry waits for it alike
                except Exception as exc:  # an error reply for this entry's keys
                    stop_if_cancelling(exc)
                    if isinstance(exc, StoreError):
                        count_store_error(exc)
                    failed[i] = exc
                    continue
                if not found:
                    log.error("journal %s: usage of %s (%d %s) lost: the store has no such "
                              "environment", path.name, env, n, what)
                del left[i]
            if not left:
                break
    finally:
        if len(left) < len(entries) or skipped:
            try:
                if left:
                    _keep(path, list(left.values()))
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("journal %s cannot be rewritten (%s): left as it was (what was "
                          "written back is not counted again: its ids tell the store)",
                          path.name, exc)
    for i, ((env, what, slot_ms), n, record_id) in left.items():
        log.error("journal %s: usage of %s (%d %s of the slot at %d ms, record %s) not "
                  "written back after %d attempts (%r): kept in the journal for a later "
                  "attempt", path.name, env, n, what, slot_ms, record_id, attempts,
                  failed.get(i))
    return list(left.values())
