"""The audit trail: every change made through the admin API (and so through the CLI), and
every config reload, recorded once in a stream in the store.

An entry's id is the store's (``XADD … *``): its time is the store's clock, the same for every
instance. Entries older than ``audit_retention_days`` (gateway.yaml) are trimmed as new ones
are added (``MINID ~``: whole stream nodes at a time, so a few may outlive it a little).

Fields of an entry (all strings): ``actor`` (token id: ``admin-token`` for
QUOTAGATE_ADMIN_TOKEN, ``config`` for a reload, ``lifecycle`` for the tokens of a released
environment revoked), ``actor_name``, ``role``, ``action`` (the route's handler:
``buy_pack``, ``change_plan``, …, or ``config_reload``), ``method``, ``path``, ``env`` (the
environment of the route, or the one environment its body names: a token's, a batch's),
``envs`` (a reload, an import or a usage batch naming several: the environments, space-separated,
at most ``MAX_ENVS``; ``envs_count``: how many in all),
``body`` (the request's JSON, at most ``MAX_BODY`` characters; other bodies by size and
type), ``status`` (the HTTP status answered), ``request_id``, ``instance``. Never a token's
secret: requests carry none in their bodies, and answers are not recorded.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from quotagate.common.aio import stop_if_cancelling
from quotagate.limiter.keys import PREFIX

log = logging.getLogger("quotagate.audit")

STREAM = f"{PREFIX}:{{audit}}:log"
#: The files' digest of the last reload recorded: a reload to the files recorded last is
#: not recorded again, so the instances that apply the same change record it once (and a
#: change made, undone and made again is recorded each time).
LAST_RELOAD = f"{PREFIX}:{{audit}}:last-reload"
MAX_BODY = 4096
MAX_ENVS = 1000
#: Entries read from the store per page at most (a filtered page may come back with fewer
#: than asked, and a cursor to go on).
SCAN_MAX = 5000
_RECORD_RELOAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[2], '*', unpack(ARGV, 3))
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
        except Exception as exc:  # (any: a cluster's errors are not all RedisErrors) the
            # change is made; its answer must not become a 500 a client would retry
            stop_if_cancelling(exc)
            log.error("audit entry not written (%s: %s): %s", type(exc).__name__, exc, fields)
            return None
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def record_reload(self, digest: str, why: str, changed: list[str],
                            removed: list[str], everything: bool,
                            files: Sequence[str] = ()) -> str | None:
        """A config reload to the files of ``digest``, unless the last one recorded was to
        those files (another instance applying the same change recorded it). ``files``:
        the config's files other than the environments' that changed."""
        envs = [*changed, *removed]
        fields = {"actor": "config", "actor_name": "config files", "role": "",
                  "action": "config_reload", "method": "", "path": "", "env": "",
                  "envs": " ".join(envs[:MAX_ENVS]), "envs_count": str(len(envs)),
                  "body": (f"{why}; " + "".join(f"{name} changed; " for name in files)
                           + ("plans or time zone changed: every environment "
                              "written again; " if everything else "")
                           + f"{len(changed)} written, {len(removed)} removed"),
                  "status": "200", "request_id": "", "instance": self.instance}
        args = [self._oldest_kept(),
                *(x for kv in fields.items() for x in kv)]
        try:
            entry = await self.redis.eval(_RECORD_RELOAD, 2, LAST_RELOAD, STREAM, digest,
                                          *args)
        except Exception as exc:  # (as in record)
            stop_if_cancelling(exc)
            log.error("audit entry of a config reload not written (%s: %s)",
                      type(exc).__name__, exc)
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
        found, after = await newest(self.redis, STREAM, top, bottom, filters.keep, limit,
                                    SCAN_MAX)
        return [as_dict(entry_id, fields) for entry_id, fields in found], after


async def newest(redis: Any, stream: str, top: str, bottom: str,
                 keep: Callable[[dict[str, str]], bool], limit: int, budget: int
                 ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
    """The entries of ``stream`` from ``top`` down to ``bottom`` (XREVRANGE bounds) that
    ``keep`` keeps, newest first, at most ``limit``, reading at most ``budget``; and the id
    to go on after (the last one read; None: the stream's end was reached)."""
    found: list[tuple[str, dict[str, str]]] = []
    scanned = 0
    while scanned < budget:
        batch = await redis.xrevrange(stream, top, bottom, count=min(1000, budget - scanned))
        if not batch:
            return found, None
        for raw_id, raw_fields in batch:
            scanned += 1
            entry_id = raw_id.decode()
            top = f"({entry_id}"
            fields = {k.decode(): v.decode(errors="replace") for k, v in raw_fields.items()}
            if keep(fields):
                found.append((entry_id, fields))
                if len(found) == limit:
                    return found, entry_id
    return found, top[1:]
