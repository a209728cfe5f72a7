"""The fail-open backlog: usage admitted while the store was away, summed per (environment,
what, 15-minute slot) until it is written back (writeback.py), and kept in a journal on disk
(journal.py) so a gateway that dies meanwhile does not lose it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from quotagate.limiter.journal import COMPACT_BYTES, Journal

log = logging.getLogger("quotagate.limiter")

#: Fail-open usage is summed per slot of this length and written back at the slot's start, so
#: it lands on the right day and cycle (every zone's midnight is on a 15-minute boundary).
SLOT_MS = 15 * 60 * 1000
#: Write-back attempts that find no snapshot (store lost its data) before an entry is given up.
MAX_MISSING_ATTEMPTS = 20

#: env, what (a route kind: calls through decide.lua; or "meter:<name>": through settle.lua),
#: slot start (epoch ms)
BacklogKey = tuple[str, str, int]
METER_PREFIX = "meter:"


class Backlog:
    """Usage admitted while the store was unreachable, summed per (env, kind, 15-min slot),
    written back later.

    Bounded: past ``max_entries`` keys further usage is counted in ``dropped`` and logged,
    never held without limit.
    """

    def __init__(self, max_entries: int = 100_000, max_per_env: int = 10_000):
        self.max_entries = max_entries
        #: Entries one environment may hold (kinds x 15-minute slots: about ten days of an
        #: outage), so one environment cannot take the room of all others.
        self.max_per_env = max_per_env
        self.per_env: dict[str, int] = {}
        self.pending: dict[BacklogKey, int] = {}
        self.missing_attempts: dict[BacklogKey, int] = {}
        self.dropped = 0
        self.written = 0
        #: Every change is also written here (journal.py), when the gateway keeps one.
        self.journal: Journal | None = None
        #: Write-backs sent and not answered yet (they may have run): (record id, amount),
        #: sent again exactly so until answered.
        self.in_doubt: dict[BacklogKey, tuple[str, int]] = {}

    def _journal(self, key: BacklogKey, write: Callable[[Journal], None] | None = None
                 ) -> None:
        """Write this change (the entry's new value, or ``write``) to the journal."""
        journal = self.journal
        if journal is None:
            return
        try:
            if not self.pending and not self.in_doubt:
                journal.reset({}, {})  # all written back: nothing to keep
            elif journal.size > COMPACT_BYTES:
                journal.reset(self.pending, self.in_doubt)
            elif write is not None:
                write(journal)
            else:
                journal.value(key, self.pending.get(key, 0))
        except OSError as exc:  # a full or failing disk must not fail the request
            log.error("the fail-open journal %s failed (%s): it is no longer kept, the "
                      "backlog stays in memory only", journal.path, exc)
            journal.abandon()  # nobody may replay what this process still holds
            self.journal = None

    def note_intent(self, key: BacklogKey, record_id: str, cost: int) -> None:
        self._journal(key, lambda j: j.intent(key, cost, record_id))

    def note_done(self, key: BacklogKey, record_id: str) -> None:
        """A write-back answered: its intent closed, with the entry's value now."""
        self._journal(key, lambda j: j.value(key, self.pending.get(key, 0), record_id))

    def add(self, key: BacklogKey, cost: int) -> None:
        """Keep usage that has passed already (metered after a response): dropped, and
        logged, only when full."""
        if not self.admit(key, cost):
            self.dropped += cost
            log.error("fail-open backlog full (%d entries): usage of %s dropped",
                      self.max_entries, key[0])

    def admit(self, key: BacklogKey, cost: int) -> bool:
        """Keep a request's cost if there is room; False (nothing kept) when full: the
        request is then refused rather than admitted uncounted."""
        if key in self.pending:
            self.pending[key] += cost
        elif (len(self.pending) < self.max_entries
              and self.per_env.get(key[0], 0) < self.max_per_env):
            self.pending[key] = cost
            self.per_env[key[0]] = self.per_env.get(key[0], 0) + 1
        else:
            return False
        self._journal(key)
        return True

    def remove(self, key: BacklogKey, cost: int, done: str | None = None) -> int:
        """Take ``cost`` out (what is there of it); returns what was taken. ``done``: the
        write-back (record id) that took it, closed in the journal on the same line."""
        held = self.pending.get(key, 0)
        if held > cost:
            self.pending[key] = held - cost
        elif self.pending.pop(key, None) is not None:
            self.missing_attempts.pop(key, None)
            left = self.per_env.get(key[0], 1) - 1
            if left > 0:
                self.per_env[key[0]] = left
            else:
                self.per_env.pop(key[0], None)
        if done is None:
            self._journal(key)
        else:
            self.note_done(key, done)
        return min(held, cost)

    def total(self, env: str) -> int:
        return sum(c for (e, _, _), c in self.pending.items() if e == env)

    def __len__(self) -> int:
        return len(self.pending)
