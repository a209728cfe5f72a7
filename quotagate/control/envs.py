"""The control plane's environments: who owns each, their records, and every change operators
make (overage, packs, promos, plan changes) — validated, then written with the snapshot the
scripts read, in one optimistic transaction.

Ownership is explicit: an environment declared in environments.yaml is owned by the file
(changes through the API are refused, ``Conflict``); any other is owned by the API, its record
kept in the store (``qg:{env}:def``) and listed in ``qg:envs:api`` (and, for listing in id
order from a position, in the index ``{qg:envs:api}:by-id``: see ``Environments.page``).
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import secrets
import zoneinfo
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import redis.asyncio as aredis
from redis.exceptions import WatchError

from quotagate.billing import versions
from quotagate.billing.pricing import Quote, downgrade_refund, upgrade_fee
from quotagate.common import calendar as cal
from quotagate.common.aio import stop_if_cancelling
from quotagate.common.clock import Clock
from quotagate.control.events import emit
from quotagate.limiter import due, keys
from quotagate.limiter.entitlements import (
    ISOLATION_DAYS,
    build_snapshot,
    effective_limits,
    encode,
)
from quotagate.settings import Config
from quotagate.settings.load import check_environments
from quotagate.settings.schema import (
    GATEWAY_TERMS,
    EnforcementMode,
    Environment,
    EnvironmentsFile,
    GatewayGrant,
    PackGrant,
    PackMeter,
    PlansFile,
    PromoGrant,
)

#: How long a lifecycle claim (``keys.lifecycle_claim``) is kept: longer than any transition
#: could be looked at again.
CLAIM_TTL_S = 400 * 86400
#: Days from purchase in which an unused pack can be refunded (the purchase day and 6 more).
REFUND_DAYS = 7
#: Longest promo bought at once.
MAX_PROMO_DAYS = 366
#: Meters compared with the target plan before a downgrade (SPEC §11).
DOWNGRADE_METERS = ("calls", "gbs", "outbound_bytes", "storage_traffic_bytes",
                    "cdn_origin_bytes", "ai_tokens")

log = logging.getLogger("quotagate.control")

#: Sorted set, every score 0 so ordered by id: the API-owned ids, for listing in id order from
#: a position (``qg:envs:api`` is a set: no order). Its hash tag is the set's own name, so both
#: are in one hash slot on a cluster and one script reads them together. It is an index: the
#: set says what exists; an id here no longer in the set (released, taken over by the file) is
#: skipped, and dropped, by the listing.
API_ENV_INDEX = "{" + keys.API_OWNED_ENVS + "}:by-id"
#: Set once the index holds every id written before it existed (``_ensure_index``): then no
#: process walks the set again.
API_ENV_INDEX_COMPLETE = API_ENV_INDEX + ":complete"
#: States of an environment by its dates today, as decide.lua and the scheduler see them.
STATES = ("not-started", "active", "isolated", "released-pending")
#: Most records one listing call looks at (filters may keep few of them): each page costs at
#: most this much, whatever the number of environments; a page can then hold fewer than asked.
SCAN_BUDGET = 5_000
#: Records read from the store at once while filtering.
FILTER_BATCH = 200
#: Environments written per round trip by ``put_many`` (a bulk import).
PUT_MANY_BATCH = 500
#: Snapshots built between two yields to the event loop (~40 µs each): a bulk import never
#: holds the gateway's requests up for more than a few milliseconds.
BUILD_SLICE = 100

#: The next live API-owned ids after ARGV[1] ("" = from the first) in id order: at most
#: ARGV[2] of them, looking at no more than ARGV[3] entries of the index; entries whose id has
#: left the set are removed from the index on the way (atomically with the check, so an id
#: created again meanwhile is never dropped). Returns {exhausted (1: nothing after the last
#: entry looked at), the last id looked at, live ids...}.
_API_AFTER = """
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local want, most = tonumber(ARGV[2]), tonumber(ARGV[3])
local got = redis.call('ZRANGEBYLEX', KEYS[2], from, '+', 'LIMIT', 0, most)
local out, stale, last, looked = {0, ''}, {}, '', 0
for _, id in ipairs(got) do
  looked = looked + 1
  last = id
  if redis.call('SISMEMBER', KEYS[1], id) == 1 then
    out[#out + 1] = id
    if #out - 2 >= want then break end
  else
    stale[#stale + 1] = id
  end
end
if #stale > 0 then redis.call('ZREM', KEYS[2], unpack(stale)) end
if looked == #got and #got < most then out[1] = 1 end
out[2] = last
return out
"""


class ControlError(Exception):
    """A refused operation: ``status`` is the HTTP status the admin API answers with."""

    status = 400

    def __init__(self, message: str, **detail: Any):
        super().__init__(message)
        self.detail = detail


class NotFound(ControlError):
    status = 404


class Conflict(ControlError):
    status = 409


class Invalid(ControlError):
    status = 422


@dataclass(frozen=True)
class Record:
    env_id: str
    owner: str  # "file" | "api"
    env: Environment


def lifecycle_state(env: Environment, today: dt.date) -> str:
    """The environment's state on its local ``today``, as decide.lua decides it: released
    (``released-pending``: from 00:00 of day 16 after expiry, until the scheduler removes an
    API-owned record; a file-owned one stays until the file drops it), ``isolated`` from the
    expiry day, ``not-started`` before the anchor, else ``active``."""
    if today >= env.expires + dt.timedelta(days=ISOLATION_DAYS):
        return "released-pending"
    if today >= env.expires:
        return "isolated"
    if today < env.anchor:
        return "not-started"
    return "active"


@dataclass(frozen=True)
class Filters:
    """What a listing keeps; None: any."""

    state: str | None = None
    plan: str | None = None
    owner: str | None = None
    #: A gateway version bought (whatever its state), or "none": no gateway version.
    gateway: str | None = None
    #: Expiring strictly before this date.
    expiring_before: dt.date | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.state, self.plan, self.owner, self.gateway,
                                           self.expiring_before))


def _tz(config: Config, env: Environment) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(env.timezone or config.gateway.timezone)


def local_today(config: Config, env: Environment, now_ms: int) -> dt.date:
    """The environment's local date at ``now_ms``."""
    return dt.datetime.fromtimestamp(now_ms / 1000, _tz(config, env)).date()


def renewed_expiry(anchor: dt.date, expires: dt.date, months: int) -> dt.date:
    """``months`` after the original expiry, on the anchor's day when the expiry is a cycle
    boundary (anchor 31: Nov 30 + 1 month = Dec 31, not Dec 30)."""
    held = (expires.year - anchor.year) * 12 + expires.month - anchor.month
    if cal.add_months_clamped(anchor, held) == expires:
        return cal.add_months_clamped(anchor, held + months)
    return cal.add_months_clamped(expires, months)


async def api_id_batches(redis: aredis.Redis) -> AsyncIterator[list[str]]:
    """Every API-owned id, a thousand at a time (``SSCAN``: no reply of 10^6 ids that holds
    the store up)."""
    cursor: int = 0
    while True:
        stop_if_cancelling()
        cursor, batch = await redis.sscan(keys.API_OWNED_ENVS, cursor, count=1000)
        if batch:
            yield [m.decode() if isinstance(m, bytes) else str(m) for m in batch]
        if not cursor:
            return


class Environments:
    """Reads and changes environments; ``config`` is read through a callable (hot reload)."""

    def __init__(self, redis: aredis.Redis, config: Callable[[], Config], clock: Clock):
        self.redis = redis
        self._config = config
        self.clock = clock
        #: The file's ids in order, for the EnvironmentsFile they were taken from (kept so its
        #: identity is not reused): sorted once per (re)load, not per page.
        self._file_sorted: tuple[EnvironmentsFile, list[str]] | None = None
        #: The API-owned ids stored before the index existed are put in it once per process,
        #: before its first listing.
        self._indexed = False
        self._indexing = asyncio.Lock()

    @property
    def config(self) -> Config:
        return self._config()

    def today(self, env: Environment) -> dt.date:
        """The environment's local date now."""
        return local_today(self.config, env, self.clock.now_ms())

    def midnight_ms(self, env: Environment, day: dt.date) -> int:
        """Epoch ms of 00:00 of ``day`` where the environment is."""
        return cal.local_midnight_ms(day, _tz(self.config, env))

    # --------------------------------------------------------------------------- reading

    async def existing(self, env_ids: set[str]) -> set[str]:
        """Those of ``env_ids`` that exist (declared by the file or API-owned): one round
        trip for those the file does not declare, whatever the number of environments."""
        declared = self.config.environments.environments
        ask = sorted(e for e in env_ids if e not in declared)
        out = {e for e in env_ids if e in declared}
        if ask:
            found = await self.redis.smismember(keys.API_OWNED_ENVS, ask)
            out.update(e for e, yes in zip(ask, found, strict=True) if yes)
        return out

    async def ids(self) -> dict[str, str]:
        """Every environment: id -> owner."""
        api = {m.decode() if isinstance(m, bytes) else m
               for m in await self.redis.smembers(keys.API_OWNED_ENVS)}
        out = {e: "api" for e in sorted(api)}
        out.update({e: "file" for e in self.config.environments.environments})
        return dict(sorted(out.items()))

    # --------------------------------------------------------------------------- listing

    def _file_ids(self) -> list[str]:
        declared = self.config.environments
        if self._file_sorted is None or self._file_sorted[0] is not declared:
            self._file_sorted = (declared, sorted(declared.environments))
        return self._file_sorted[1]

    async def _ensure_index(self) -> None:
        """Put the API-owned ids in the listing's index, a batch at a time (SSCAN): those
        written before it existed (every put since writes its id there too). Once per store:
        the first process to list does it and says so in the store (API_ENV_INDEX_COMPLETE);
        any other only asks. An id released meanwhile is only a stale entry, which the listing
        skips."""
        if self._indexed:
            return
        async with self._indexing:
            if self._indexed:
                return
            if await self.redis.exists(API_ENV_INDEX_COMPLETE):
                self._indexed = True
                return
            async for ids in api_id_batches(self.redis):
                await self.redis.zadd(API_ENV_INDEX, dict.fromkeys(ids, 0), nx=True)
            await self.redis.set(API_ENV_INDEX_COMPLETE, 1)
            self._indexed = True

    async def _api_after(self, after: str, want: int) -> tuple[list[str], str, bool]:
        """Up to ``want`` API-owned ids after ``after`` in order; the last id looked at (all
        up to it were seen) and whether none follow it."""
        reply = await self.redis.eval(_API_AFTER, 2, keys.API_OWNED_ENVS, API_ENV_INDEX,
                                      after, want, want * 4)
        text = [m.decode() if isinstance(m, bytes) else str(m) for m in reply[1:]]
        return text[1:], text[0], int(reply[0]) == 1

    async def _ids_after(self, after: str, n: int) -> tuple[list[tuple[str, str]], str | None]:
        """The next (at most ``n``) ids after ``after`` with their owner, file and API merged
        in id order (an id the file declares is the file's, once); and the position reached:
        every id up to it has been looked at (None: nothing follows). Memory: O(n)."""
        file_ids = self._file_ids()
        i = bisect.bisect_right(file_ids, after)
        files = file_ids[i:i + n]
        files_done = i + n >= len(file_ids)
        api, api_last, api_done = await self._api_after(after, n)
        bounds = ([] if files_done else [files[-1]]) + ([] if api_done else [api_last])
        bound = min(bounds) if bounds else None
        declared = self.config.environments.environments
        merged = sorted({*files, *(e for e in api if e not in declared)})
        if bound is not None:
            merged = [e for e in merged if e <= bound]
        taken = merged[:n]
        out = [(e, "file" if e in declared else "api") for e in taken]
        if len(merged) > n:
            return out, taken[-1]
        return out, bound  # all up to the bound seen (None: to the end)

    async def _records(self, ids: list[tuple[str, str]]) -> list[Record | None]:
        """The records of ``ids`` (None: gone meanwhile, or unreadable); the API-owned ones in
        one round trip."""
        declared = self.config.environments.environments
        api = [e for e, owner in ids if owner == "api"]
        raw: dict[str, Any] = {}
        if api:
            async with self.redis.pipeline(transaction=False) as pipe:
                for env_id in api:
                    pipe.get(keys.definition(env_id))
                raw = dict(zip(api, await pipe.execute(), strict=True))
        out: list[Record | None] = []
        for env_id, owner in ids:
            if owner == "file":
                out.append(Record(env_id, "file", declared[env_id]))
                continue
            blob = raw.get(env_id)
            if blob is None:
                out.append(None)
                continue
            try:
                out.append(Record(env_id, "api", msgspec.json.decode(blob, type=Environment)))
            except msgspec.ValidationError as exc:  # e.g. stored before a bound existed
                log.warning("listing: the stored record of %s is unreadable: %s", env_id, exc)
                out.append(None)
        return out

    def state(self, env: Environment, now_ms: int) -> str:
        return lifecycle_state(env, local_today(self.config, env, now_ms))

    def _keeps(self, filters: Filters, now_ms: int) -> Callable[[Record], bool]:
        def keep(record: Record) -> bool:
            env = record.env
            if filters.owner is not None and record.owner != filters.owner:
                return False
            if filters.plan is not None and env.plan != filters.plan:
                return False
            if filters.gateway is not None and (
                    (env.gateway.version if env.gateway is not None else "none")
                    != filters.gateway):
                return False
            if filters.expiring_before is not None and not env.expires < filters.expiring_before:
                return False
            return filters.state is None or self.state(env, now_ms) == filters.state
        return keep

    async def page(self, after: str, limit: int, filters: Filters | None = None,
                   budget: int = SCAN_BUDGET) -> tuple[list[Record], str | None]:
        """One page of the listing: the environments after id ``after`` ("" = from the first)
        in id order that ``filters`` keep, at most ``limit``; and the position to go on from
        (the last id looked at; None: the end). An environment present for the whole listing
        is on exactly one page, whatever is created or removed meanwhile (the position is an
        id, not an offset). Bounded whatever the number of environments: records are read
        ``limit`` (filtering: ``FILTER_BATCH``) at a time, at most ``budget`` per page — with
        filters a page may then hold fewer than ``limit``, even none, before the end."""
        filters = filters or Filters()
        await self._ensure_index()
        keep = self._keeps(filters, self.clock.now_ms()) if filters.any() else None
        out: list[Record] = []
        pos, looked = after, 0
        while True:
            need = limit - len(out)
            n = need + 1 if keep is None else max(need + 1, FILTER_BATCH)
            batch, reached = await self._ids_after(pos, min(n, budget - looked + 1))
            for (env_id, _), record in zip(batch, await self._records(batch), strict=True):
                if len(out) == limit:
                    return out, pos  # another follows
                pos, looked = env_id, looked + 1
                if record is not None and (keep is None or keep(record)):
                    out.append(record)
            if reached is None:
                return out, None
            pos = reached
            if len(out) == limit or looked >= budget:
                return out, pos

    async def get(self, env_id: str) -> Record:
        declared = self.config.environments.environments.get(env_id)
        if declared is not None:
            return Record(env_id, "file", declared)
        raw = await self.redis.get(keys.definition(env_id))
        if raw is None or not await self.redis.sismember(keys.API_OWNED_ENVS, env_id):
            raise NotFound(f"no environment {env_id}")
        return Record(env_id, "api", msgspec.json.decode(raw, type=Environment))

    # --------------------------------------------------------------------------- writing

    def validate(self, env_id: str, env: Environment) -> None:
        try:  # every field's own constraints (ids, patterns), as a file would be checked
            msgspec.convert(msgspec.to_builtins(env), Environment)
        except msgspec.ValidationError as exc:
            raise Invalid(f"invalid environment: {exc}") from None
        issues = check_environments(EnvironmentsFile(environments={env_id: env}),
                                    self.config.plans, "admin API")
        if issues:
            raise Invalid("; ".join(f"{i.path}: {i.reason}" for i in issues),
                          issues=[{"path": i.path, "reason": i.reason} for i in issues])

    async def put(self, env_id: str, env: Environment) -> Record:
        """Create or replace an API-owned environment (usage and pack consumption stay)."""
        self._refuse_file_owned(env_id)
        self.validate(env_id, env)
        await self._due_now(env_id)
        async with self.redis.pipeline(transaction=True) as pipe:  # one hash slot: {env}
            self._write(pipe, env_id, env)
            await pipe.execute()
        # Another slot on a cluster: the set and the listing's index share one (its hash tag),
        # so an id is in both or in neither.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.API_OWNED_ENVS, env_id)
            pipe.zadd(API_ENV_INDEX, {env_id: 0})
            await pipe.execute()
        await self._due_now(env_id)
        return Record(env_id, "api", env)

    async def put_many(self, items: list[tuple[str, Environment]],
                       checked_with: PlansFile | None = None) -> dict[str, int]:
        """``put`` for many (a bulk import), each already ``validate``d: what ``put`` writes,
        ``PUT_MANY_BATCH`` at a time in a few round trips, not four per environment. An
        environment whose stored record is the same, byte for byte, and which is listed as
        API-owned is left alone (``unchanged``: a repeated import writes nothing and makes
        nothing due; unless its snapshot is missing), so importing the same lines again, or
        again after a failure, is safe. Each batch is built from the config in force when it
        is written: if plans.yaml changed since the environments were checked, they are
        checked again (``Invalid``: the batches before are written; the client sends the
        request again once it is fixed).
        Each record and its snapshot are written together (MSET, one hash slot); ids are
        listed, and marked due before and after, as ``put`` does. Returns the counts of
        ``created``, ``updated`` and ``unchanged``. ``checked_with``: the plans the items were
        validated against (default: those in force now)."""
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        checked_with = checked_with if checked_with is not None else self.config.plans
        for start in range(0, len(items), PUT_MANY_BATCH):
            part = items[start:start + PUT_MANY_BATCH]
            config = self.config  # (a reload meanwhile: this batch is built from the new one)
            plans, tz = config.plans, config.gateway.timezone
            for env_id, env in part:
                self._refuse_file_owned(env_id)  # (the file may have been reloaded since)
                if plans is not checked_with:  # ... and plans.yaml with it
                    self.validate(env_id, env)
            ids = [env_id for env_id, _ in part]
            blobs = [msgspec.json.encode(env) for _, env in part]
            async with self.redis.pipeline(transaction=False) as pipe:
                for env_id in ids:
                    pipe.get(keys.definition(env_id))
                    pipe.exists(keys.entitlements(env_id))
                pipe.smismember(keys.API_OWNED_ENVS, ids)
                *stored, listed = await pipe.execute()
            changed: list[tuple[str, Environment, bytes]] = []
            for i, ((env_id, env), blob, member) in enumerate(zip(part, blobs, listed,
                                                                 strict=True)):
                old, has_snapshot = stored[2 * i], stored[2 * i + 1]
                if member and old == blob and has_snapshot:
                    counts["unchanged"] += 1
                    continue
                counts["updated" if member else "created"] += 1
                changed.append((env_id, env, blob))
            if not changed:
                continue
            changed_ids = [env_id for env_id, _, _ in changed]
            await due.mark(self.redis, changed_ids, self.clock.now_ms())
            snapshots: list[str] = []
            for i, (_, env, _) in enumerate(changed):
                if i and i % BUILD_SLICE == 0:
                    await asyncio.sleep(0)
                snapshots.append(encode(build_snapshot(env, plans, tz)))
            async with self.redis.pipeline(transaction=False) as pipe:
                for (env_id, _, blob), snapshot in zip(changed, snapshots, strict=True):
                    # (pipe.mset is refused by redis-py's cluster pipeline; both keys are
                    # in one slot, which is all MSET needs)
                    pipe.execute_command("MSET", keys.definition(env_id), blob,
                                         keys.entitlements(env_id), snapshot)
                await pipe.execute()
            async with self.redis.pipeline(transaction=True) as pipe:  # one slot, as put()
                pipe.sadd(keys.API_OWNED_ENVS, *changed_ids)
                pipe.zadd(API_ENV_INDEX, dict.fromkeys(changed_ids, 0))
                await pipe.execute()
            await due.mark(self.redis, changed_ids, self.clock.now_ms())
        return counts

    async def _due_now(self, env_id: str) -> None:
        """The scheduler looks at the environment at its next round (the due index). Before
        a write (a crash after it still leaves the change looked at) and after it (a round
        that read the record before the write looks again)."""
        await due.mark(self.redis, [env_id], self.clock.now_ms())

    def _refuse_file_owned(self, env_id: str) -> None:
        if env_id in self.config.environments.environments:
            raise Conflict(f"environment {env_id} is owned by environments.yaml: change the "
                           "file (and reload) instead", owner="file")

    def _write(self, pipe: Any, env_id: str, env: Environment) -> None:
        pipe.set(keys.definition(env_id), msgspec.json.encode(env))
        pipe.set(keys.entitlements(env_id), encode(
            build_snapshot(env, self.config.plans, self.config.gateway.timezone)))

    async def change(self, env_id: str,
                     edit: Callable[[Environment, dict[str, int]], Environment],
                     watch_usage: bool = False, watch_packs: bool = False) -> Environment:
        """Apply ``edit`` to an API-owned environment atomically: the record (and, with
        ``watch_usage``, its usage and pack consumption, passed to ``edit``) is watched, so a
        concurrent change or a request using a pack makes it start over."""
        self._refuse_file_owned(env_id)
        if not await self.redis.sismember(keys.API_OWNED_ENVS, env_id):
            raise NotFound(f"no environment {env_id}")
        watched = [keys.definition(env_id)]
        if watch_usage:
            watched += [keys.usage(env_id), keys.pack_usage(env_id)]
        elif watch_packs:
            watched += [keys.pack_usage(env_id)]
        for _ in range(20):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watched)
                    raw = await pipe.get(keys.definition(env_id))
                    if raw is None:
                        raise NotFound(f"no environment {env_id}")
                    current = msgspec.json.decode(raw, type=Environment)
                    used: dict[str, int] = {}
                    if len(watched) > 1:
                        for key in watched[1:]:
                            for f, v in (await pipe.hgetall(key)).items():
                                name = f.decode() if isinstance(f, bytes) else f
                                used[f"{key}|{name}"] = int(v)
                    new = edit(current, used)
                    self.validate(env_id, new)
                    await self._due_now(env_id)  # (another connection: not watched)
                    pipe.multi()
                    self._write(pipe, env_id, new)
                    await pipe.execute()
                    await self._due_now(env_id)
                    return new
                except WatchError:
                    continue
        raise Conflict(f"environment {env_id} kept changing; try again")

    # --------------------------------------------------------------------- operations

    async def set_overage(self, env_id: str, on: bool) -> Environment:
        return await self.change(env_id, lambda e, _: msgspec.structs.replace(e, overage=on))

    async def set_mode(self, env_id: str, mode: EnforcementMode | None) -> Environment:
        """The environment's enforcement (None: the gateway's ``enforcement`` applies)."""
        return await self.change(env_id, lambda e, _: msgspec.structs.replace(e, mode=mode))

    async def buy_pack(self, env_id: str, pack: str = "", meter: PackMeter | None = None,
                       amount: int | None = None, pack_id: str | None = None) -> PackGrant:
        plans = self.config.plans
        if pack and pack not in plans.resource_packs:
            raise Invalid(f"unknown pack {pack!r} (packs: {', '.join(plans.resource_packs)})")
        grant: PackGrant | None = None

        def edit(env: Environment, _: dict[str, int]) -> Environment:
            nonlocal grant
            if not plans.plans[env.plan].packs_allowed:
                raise Conflict(f"plan {env.plan} cannot buy resource packs: upgrade first")
            today = self.today(env)
            new_id = pack_id or f"p{today:%Y%m%d}-{secrets.token_hex(3)}"
            if any(p.id == new_id for p in env.packs):
                raise Conflict(f"pack id {new_id} exists already")
            grant = PackGrant(id=new_id, purchased=today, pack=pack, meter=meter, amount=amount)
            # Expired packs are dropped from the record (their consumption stays for bills).
            live = tuple(p for p in env.packs if (today - p.purchased).days < 60)
            return msgspec.structs.replace(env, packs=(*live, grant))

        await self.change(env_id, edit)
        assert grant is not None
        await emit(self.redis, env_id, "pack-purchased", pack_id=grant.id,
                   pack=grant.pack or f"{grant.meter}:{grant.amount}",
                   purchased=grant.purchased.isoformat())
        return grant

    def _pack_meter(self, grant: PackGrant) -> str | None:
        if grant.pack:
            return self.config.plans.resource_packs[grant.pack].meter
        return grant.meter

    async def refund_pack(self, env_id: str, pack_id: str) -> PackGrant:
        refunded: PackGrant | None = None

        def edit(env: Environment, used: dict[str, int]) -> Environment:
            nonlocal refunded
            found = [p for p in env.packs if p.id == pack_id]
            if not found:
                raise NotFound(f"environment {env_id} has no pack {pack_id}")
            grant = found[0]
            age = (self.today(env) - grant.purchased).days
            if age >= REFUND_DAYS:
                raise Conflict(f"pack {pack_id} was bought {age} days ago: refunds only within "
                               f"{REFUND_DAYS} days of purchase")
            spent = used.get(f"{keys.pack_usage(env_id)}|{pack_id}", 0)
            if spent:
                raise Conflict(f"pack {pack_id} has been used ({spent}): only unused packs are "
                               "refunded")
            if self._pack_meter(grant) == "capacity_bytes" and capacity_now > effective_limits(
                    self.config.plans.plans[env.plan], env.limits)["capacity_bytes"]:
                raise Conflict(f"capacity pack {pack_id} is in use: the stored data exceeds "
                               "the plan's capacity")
            refunded = grant
            return msgspec.structs.replace(
                env, packs=tuple(p for p in env.packs if p.id != pack_id))

        capacity_now = int(await self.redis.hget(keys.usage(env_id), "gauge:capacity_bytes")
                           or 0)
        await self.change(env_id, edit, watch_packs=True)
        assert refunded is not None
        await emit(self.redis, env_id, "pack-refunded", pack_id=pack_id)
        return refunded

    async def buy_promo(self, env_id: str, pack: str, days: int,
                        start: dt.date | None = None) -> PromoGrant:
        plans = self.config.plans
        if pack not in plans.promo_packs:
            raise Invalid(f"unknown promo pack {pack!r} (promos: {', '.join(plans.promo_packs)})")
        if not 1 <= days <= MAX_PROMO_DAYS:
            raise Invalid(f"days must be 1 to {MAX_PROMO_DAYS}")
        grant: PromoGrant | None = None

        def edit(env: Environment, _: dict[str, int]) -> Environment:
            nonlocal grant
            today = self.today(env)
            first = start or today
            if first < today:
                raise Invalid(f"a promo cannot start before today ({today})")
            grant = PromoGrant(id=f"r{first:%Y%m%d}-{secrets.token_hex(3)}", pack=pack,
                               start=first, days=days)
            live = tuple(p for p in env.promos
                         if p.start + dt.timedelta(days=p.days) > today)
            return msgspec.structs.replace(env, promos=(*live, grant))

        await self.change(env_id, edit)
        assert grant is not None
        await emit(self.redis, env_id, "promo-purchased", promo_id=grant.id, pack=pack,
                   start=grant.start.isoformat(), days=days)
        return grant

    async def renew(self, env_id: str, months: int) -> Environment:
        """Renew for ``months``: from the original expiry, also while isolated (within the 15
        days); refused in arrears and once released."""
        if not 1 <= months <= 120:
            raise Invalid("months must be 1 to 120")

        def edit(env: Environment, _: dict[str, int]) -> Environment:
            if env.arrears:
                raise Conflict(f"environment {env_id} is in arrears: it cannot renew until "
                               "paid up")
            today = self.today(env)
            if today >= env.expires + dt.timedelta(days=ISOLATION_DAYS):
                raise Conflict(f"environment {env_id} was released; it cannot be renewed")
            price = self.config.plans.plans[env.plan].price
            if price is None:
                raise Invalid(f"plan {env.plan} is priced per contract: renew by contract")
            new_expiry = renewed_expiry(env.anchor, env.expires, months)
            bought = Decimal(price) * months
            if today < env.expires:  # still active: the paid period grows
                return msgspec.structs.replace(env, expires=new_expiry,
                                               paid=f"{self._paid(env) + bought:.2f}")
            return msgspec.structs.replace(env, expires=new_expiry, period_start=env.expires,
                                           paid=f"{bought:.2f}")

        changed = await self.change(env_id, edit)
        await emit(self.redis, env_id, "plan-renewed", months=months,
                   expires=changed.expires.isoformat())
        return changed

    # ---------------------------------------------------------------- gateway versions

    def check_version(self, version: str) -> None:
        """A version sold; else Invalid, naming those that are."""
        sold = self.config.plans.gateway_versions
        if version not in sold:
            raise Invalid(f"unknown gateway version {version!r} (versions: "
                          f"{', '.join(sold) or 'none in plans.yaml'})")

    def check_term(self, version: str | None, months: int) -> None:
        """A version sold (when named) and a term it is sold for; else Invalid."""
        if version is not None:
            self.check_version(version)
        if months not in GATEWAY_TERMS:
            raise Invalid(f"months must be a term sold: {', '.join(map(str, GATEWAY_TERMS))} "
                          "(1-5 months, half a year, 1-4 years)")

    async def _bill_renewals(self, env_id: str, grant: GatewayGrant | None,
                             today: dt.date) -> None:
        """Automatic renewals due by today that a change is about to fold into ``months``
        are told now (the scheduler would not see them after), each once: under the claim
        the scheduler uses for them."""
        if grant is None:
            return
        version = self.config.plans.gateway_versions.get(grant.version)
        term = versions.term_of(grant)
        for renewed, new_expiry in versions.renewals(grant, today):
            claimed = await self.redis.set(
                keys.lifecycle_claim(env_id, f"gateway-renewed:{renewed}"), "1", nx=True,
                ex=CLAIM_TTL_S)
            if claimed and version is not None:
                await emit(self.redis, env_id, "gateway-renewed", version=grant.version,
                           months=term, amount=f"{versions.price(version, term):.2f}",
                           expires=new_expiry.isoformat(), auto=1)

    async def _change_gateway(
            self, env_id: str, edit: Callable[[GatewayGrant | None, versions.Status | None,
                                               dt.date, Environment], GatewayGrant],
            refused_in_arrears: str = "") -> GatewayGrant:
        """Apply ``edit`` (the grant now, its status today, today, the environment) to the
        environment's gateway version atomically; ``refused_in_arrears``: what arrears
        forbid."""
        plans = self.config.plans
        changed: list[GatewayGrant] = []
        before: list[tuple[GatewayGrant | None, dt.date]] = []

        def edit_env(env: Environment, _: dict[str, int]) -> Environment:
            if refused_in_arrears and env.arrears:
                raise Conflict(f"environment {env_id} is in arrears: it cannot "
                               f"{refused_in_arrears} until paid up")
            today = self.today(env)
            now = None if env.gateway is None else versions.status(env.gateway, plans, today)
            changed[:] = [edit(env.gateway, now, today, env)]
            before[:] = [(env.gateway, today)]
            return msgspec.structs.replace(env, gateway=changed[0])

        await self.change(env_id, edit_env)
        await self._bill_renewals(env_id, *before[0])
        return changed[0]

    def _running(self, env_id: str, grant: GatewayGrant | None,
                 now: versions.Status | None) -> GatewayGrant:
        """The grant, refused when there is none or it has expired."""
        if grant is None or now is None:
            raise Conflict(f"environment {env_id} has no gateway version: buy one")
        if now.state == "expired":
            raise Conflict(f"gateway version {grant.version} of {env_id} expired on "
                           f"{now.expires}: renewal is only before expiry; buy it again")
        return grant

    async def buy_gateway(self, env_id: str, version: str, months: int,
                          auto_renew: bool = False) -> tuple[GatewayGrant, Decimal]:
        """Buy a gateway version from today, prepaid for ``months``. Refused while one runs
        (renew it instead) and in arrears."""
        self.check_term(version, months)

        def buy(grant: GatewayGrant | None, now: versions.Status | None,
                today: dt.date, _: Environment) -> GatewayGrant:
            if grant is not None and now is not None and now.state != "expired":
                raise Conflict(
                    f"environment {env_id} has gateway version {grant.version} until "
                    f"{now.expires}: renew it, or buy another once it has ended")
            return GatewayGrant(version=version, purchased=today, months=months,
                                auto_renew=auto_renew, renew_months=months)

        grant = await self._change_gateway(env_id, buy, "buy")
        amount = versions.price(self.config.plans.gateway_versions[version], months)
        await emit(self.redis, env_id, "gateway-purchased", version=version, months=months,
                   amount=f"{amount:.2f}", expires=versions.expiry(grant).isoformat(),
                   auto_renew=int(auto_renew))
        return grant, amount

    async def renew_gateway(self, env_id: str, months: int) -> tuple[GatewayGrant, Decimal]:
        """Renew by hand for ``months``, only before the version expires (after: buy)."""
        self.check_term(None, months)

        def renew(grant: GatewayGrant | None, now: versions.Status | None,
                  today: dt.date, _: Environment) -> GatewayGrant:
            grant = self._running(env_id, grant, now)
            # The last term bought is what an automatic renewal buys, unless told otherwise.
            return msgspec.structs.replace(
                grant, months=versions.months_bought(grant, today) + months,
                renew_months=months)

        grant = await self._change_gateway(env_id, renew, "renew")
        amount = versions.price(self.config.plans.gateway_versions[grant.version], months)
        await emit(self.redis, env_id, "gateway-renewed", version=grant.version, months=months,
                   amount=f"{amount:.2f}", expires=versions.expiry(grant).isoformat(), auto=0)
        return grant, amount

    async def gateway_auto_renew(self, env_id: str, on: bool,
                                 months: int | None = None) -> GatewayGrant:
        """Turn automatic renewal on (by ``months``, default the grant's term) or off."""
        if months is not None:
            self.check_term(None, months)

        def switch(grant: GatewayGrant | None, now: versions.Status | None,
                   today: dt.date, _: Environment) -> GatewayGrant:
            grant = self._running(env_id, grant, now)
            # Renewals made so far stay bought when it is turned off.
            return msgspec.structs.replace(
                grant, months=versions.months_bought(grant, today), auto_renew=on,
                renew_months=months or versions.term_of(grant))

        return await self._change_gateway(env_id, switch)

    def _version_change(self, env_id: str, grant: GatewayGrant | None,
                        now: versions.Status | None, target: str, today: dt.date,
                        env: Environment) -> Quote:
        """The price of changing the running version for ``target`` (its expiry kept)."""
        self.check_version(target)
        if env.arrears:
            raise Conflict(f"environment {env_id} is in arrears: it cannot change its gateway "
                           "version until paid up")
        grant = self._running(env_id, grant, now)
        assert now is not None
        if now.state == "pending":
            raise Conflict(f"gateway version {grant.version} of {env_id} starts on "
                           f"{grant.purchased}: change it once it runs")
        if target == grant.version:
            raise Invalid(f"environment {env_id} has gateway version {target} already")
        table = self.config.plans.gateway_versions
        return versions.change_quote(table[grant.version], table[target], today,
                                     grant.purchased, now.expires,
                                     versions.months_bought(grant, today))

    async def quote_gateway_change(self, env_id: str, target: str) -> Quote:
        """What changing to ``target`` today costs (an upgrade) or refunds (a downgrade)."""
        self._refuse_file_owned(env_id)
        env = (await self.get(env_id)).env
        today = self.today(env)
        grant = env.gateway
        now = None if grant is None else versions.status(grant, self.config.plans, today)
        return self._version_change(env_id, grant, now, target, today, env)

    async def change_gateway(self, env_id: str, target: str) -> tuple[GatewayGrant, Quote]:
        """Change the running version for ``target`` at once, its expiry (and automatic
        renewal) kept; priced inside the transaction, so a renewal meanwhile reprices it.
        Refused in arrears, for a version not running, and for a file-owned environment."""
        quotes: list[Quote] = []
        previous: list[str] = []

        def change(grant: GatewayGrant | None, now: versions.Status | None,
                   today: dt.date, env: Environment) -> GatewayGrant:
            quotes[:] = [self._version_change(env_id, grant, now, target, today, env)]
            assert grant is not None
            previous[:] = [grant.version]
            # Automatic renewals so far stay bought (and are told by _change_gateway, at the
            # version they were bought at); the next ones are of the new version, by the same
            # term (pinned: folded months must not become the term).
            return msgspec.structs.replace(grant, version=target,
                                           months=versions.months_bought(grant, today),
                                           renew_months=versions.term_of(grant))

        grant = await self._change_gateway(env_id, change, "change its gateway version")
        quote = quotes[0]
        await emit(self.redis, env_id, f"gateway-{quote.change}d", version=target,
                   previous=previous[0], amount=f"{quote.amount:.2f}",
                   days_left=quote.days_left, expires=versions.expiry(grant).isoformat())
        return grant, quote

    # ------------------------------------------------------------------- plan changes

    def _paid(self, env: Environment) -> Decimal:
        if env.paid is not None:
            return Decimal(env.paid)
        price = self.config.plans.plans[env.plan].price
        if price is None:
            raise Invalid(f"plan {env.plan} is priced per contract: set the environment's paid")
        # cycle_starts lists the starts and, last, the end of the last cycle
        months = len(cal.cycle_starts(env.period_start or env.anchor, env.expires)) - 1
        return Decimal(price) * months

    async def quote(self, env_id: str, target: str) -> tuple[Quote, list[str]]:
        """The price of moving to ``target`` and, for a downgrade, the meters whose usage
        exceeds the target plan (empty: allowed)."""
        record = await self.get(env_id)
        return self._quote(env_id, record.env, target, await self._usage_now(env_id))

    async def _usage_now(self, env_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.usage(env_id))
        return {f"{keys.usage(env_id)}|{k.decode() if isinstance(k, bytes) else k}": int(v)
                for k, v in raw.items()}

    def _quote(self, env_id: str, env: Environment, target: str, used: dict[str, int]
               ) -> tuple[Quote, list[str]]:
        plans = self.config.plans.plans
        if target not in plans:
            raise Invalid(f"unknown plan {target!r} (plans: {', '.join(plans)})")
        if target == env.plan:
            raise Invalid(f"environment {env_id} is on plan {target} already")
        old, new = plans[env.plan], plans[target]
        if old.price is None or new.price is None:
            raise Invalid("a plan priced per contract cannot be quoted: agree the price")
        today = self.today(env)
        if today >= env.expires:
            raise Conflict(f"the plan of {env_id} has expired: renew it first")
        if Decimal(new.price) > Decimal(old.price):
            return upgrade_fee(Decimal(old.price), Decimal(new.price), today, env.expires,
                               Decimal(env.discount)), []
        quote = downgrade_refund(self._paid(env), env.period_start or env.anchor, env.expires,
                                 today, Decimal(new.price))
        return quote, self._over_target(env_id, env, target, used)

    def _over_target(self, env_id: str, env: Environment, target: str,
                     used: dict[str, int]) -> list[str]:
        """Meters whose usage this cycle (capacity: its size now) exceeds the target plan."""
        limits = effective_limits(self.config.plans.plans[target], env.limits)
        start, _ = cal.cycle_of(env.anchor, self.today(env))
        prefix = f"{keys.usage(env_id)}|"
        cycle = cal.day_number(start)
        over = [m for m in DOWNGRADE_METERS
                if used.get(f"{prefix}{cycle}:{m}", 0) > limits[m]]
        if used.get(f"{prefix}gauge:capacity_bytes", 0) > limits["capacity_bytes"]:
            over.append("capacity_bytes")
        return over

    async def change_plan(self, env_id: str, target: str) -> tuple[Environment, Quote]:
        """Priced and checked inside the transaction: a renewal or usage arriving meanwhile
        makes it start over with the new figures."""
        self._refuse_file_owned(env_id)
        quote: Quote | None = None

        def edit(env: Environment, used: dict[str, int]) -> Environment:
            nonlocal quote
            if env.arrears:
                raise Conflict(f"environment {env_id} is in arrears: it cannot change plan "
                               "until paid up")
            quote, over = self._quote(env_id, env, target, used)
            if over:
                raise Conflict(f"downgrade to {target} refused: usage exceeds it for "
                               + ", ".join(over), meters=over)
            paid = self._paid(env)
            paid = paid + quote.amount if quote.change == "upgrade" else paid - quote.amount
            return msgspec.structs.replace(env, plan=target, paid=f"{paid:.2f}")

        changed = await self.change(env_id, edit, watch_usage=True)
        assert quote is not None
        await emit(self.redis, env_id, f"plan-{quote.change}", plan=target,
                   amount=str(quote.amount))
        return changed, quote
