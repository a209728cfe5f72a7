"""The audit trail: every change made through the admin API (and so through the CLI), and
every config reload, recorded once in a stream in the store.

An entry's id is the store's (``XADD … *``): its time is the store's clock, the same for every
instance. Entries older than ``audit_retention_days`` (gateway.yaml) are trimmed as new ones
are added (``MINID ~``: whole stream nodes at a time, so a few may outlive it a little).

Fields of an entry (all strings): ``actor`` (token id: ``admin-token`` for
QUOTAGATE_ADMIN_TOKEN, ``config`` for a reload), ``actor_name``, ``role``, ``action`` (the
route's handler: ``buy_pack``, ``change_plan``, …, or ``config_reload``), ``method``, ``path``,
``env`` (the environment of the route, if any), ``envs`` (a reload: the environments it
changed or removed, space-separated, at most ``MAX_ENVS``; ``envs_count``: how many in all),
``body`` (the request's JSON, at most ``MAX_BODY`` characters; other bodies by size and
type), ``status`` (the HTTP status answered), ``request_id``, ``instance``. Never a token's
secret: requests carry none in their bodies, and answers are not recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from quotagate.limiter.keys import PREFIX

log = logging.getLogger("quotagate.audit")

STREAM = f"{PREFIX}:{{audit}}:log"
#: A reload from the same files to the same files by several instances is recorded once:
#: the first to claim the change (the digests before and after) here records it. Kept long
#: enough for every instance's poll or signal; the same change made again after that is
#: recorded again.
RELOAD_CLAIM = f"{PREFIX}:{{audit}}:reload:"
RELOAD_CLAIM_MS = 10 * 60_000
MAX_BODY = 4096
MAX_ENVS = 1000
#: Entries read from the store per page at most (a filtered page may come back with fewer
#: than asked, and a cursor to go on).
SCAN_MAX = 5000
_RECORD_RELOAD = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return false
"""


@dataclass(frozen=True)
class Filters:
    env: str | None = None
    actor: str | None = None
    action: str | None = None
    #: Entry times, ms since the epoch: from (inclusive), until (exclusive).
    since_ms: int | None = None
    until_ms: int | None = None

    def keep(self, fields: dict[str, str]) -> bool:
        if self.env is not None and fields.get("env") != self.env \
                and self.env not in fields.get("envs", "").split():
            return False
        if self.actor is not None and fields.get("actor") != self.actor:
            return False
        return self.action is None or fields.get("action") == self.action


def entry_time_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def as_dict(entry_id: str, fields: dict[str, str]) -> dict[str, object]:
    at_ms = entry_time_ms(entry_id)
    out: dict[str, object] = {"id": entry_id, "at_ms": at_ms, "at": dt.datetime.fromtimestamp(
        at_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    out.update(fields)
    if "status" in fields:
        out["status"] = int(fields["status"])
    if "envs_count" in fields:
        out["envs_count"] = int(fields["envs_count"])
    return out


class Audit:
    def __init__(self, redis: Any, now_ms: Callable[[], int],
                 retention_days: Callable[[], int], instance: str):
        #: A redis-py asyncio client, or a cluster's (bytes replies).
        self.redis = redis
        self.now_ms = now_ms
        self.retention_days = retention_days
        self.instance = instance

    def _oldest_kept(self) -> str:
        return str(max(0, self.now_ms() - self.retention_days() * 86_400_000))

    async def record(self, fields: dict[str, str]) -> str | None:
        """Add one entry (its id), or log why it could not be (never raises: the change it
        records is made)."""
        try:
            entry = await self.redis.xadd(STREAM, {**fields, "instance": self.instance},
                                          minid=self._oldest_kept(), approximate=True)
        except (RedisError, OSError) as exc:
            log.error("audit entry not written (%s): %s", exc, fields)
            return None
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def record_reload(self, change: str, why: str, changed: list[str],
                            removed: list[str], everything: bool) -> str | None:
        """A config reload, once across the instances that apply the same ``change`` (the
        files' digests before and after)."""
        envs = [*changed, *removed]
        fields = {"actor": "config", "actor_name": "config files", "role": "",
                  "action": "config_reload", "method": "", "path": "", "env": "",
                  "envs": " ".join(envs[:MAX_ENVS]), "envs_count": str(len(envs)),
                  "body": (f"{why}; " + ("plans or time zone changed: every environment "
                                         "written again; " if everything else "")
                           + f"{len(changed)} written, {len(removed)} removed"),
                  "status": "200", "request_id": "", "instance": self.instance}
        args = [RELOAD_CLAIM_MS, self._oldest_kept(),
                *(x for kv in fields.items() for x in kv)]
        try:
            claim = RELOAD_CLAIM + hashlib.sha256(change.encode()).hexdigest()[:32]
            entry = await self.redis.eval(_RECORD_RELOAD, 2, claim, STREAM, *args)
        except (RedisError, OSError) as exc:
            log.error("audit entry of a config reload not written (%s)", exc)
            return None
        if entry is None:
            return None  # another instance recorded these files
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def page(self, filters: Filters, limit: int, cursor: str | None
                   ) -> tuple[list[dict[str, object]], str | None]:
        """Entries newest first, up to ``limit``, and the cursor to go on with (None: no
        more). At most ``SCAN_MAX`` entries are read per call."""
        top = f"({cursor}" if cursor else (
            f"({filters.until_ms}-0" if filters.until_ms is not None else "+")
        bottom = f"{filters.since_ms}-0" if filters.since_ms is not None else "-"
        out: list[dict[str, object]] = []
        scanned = 0
        while scanned < SCAN_MAX:
            batch = await self.redis.xrevrange(STREAM, top, bottom,
                                               count=min(500, SCAN_MAX - scanned))
            if not batch:
                return out, None
            for raw_id, raw_fields in batch:
                scanned += 1
                entry_id = raw_id.decode()
                fields = {k.decode(): v.decode(errors="replace")
                          for k, v in raw_fields.items()}
                if filters.keep(fields):
                    out.append(as_dict(entry_id, fields))
                    if len(out) == limit:
                        return out, entry_id
                top = f"({entry_id}"
        return out, top[1:]
