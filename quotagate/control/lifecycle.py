"""Lifecycle (SPEC §11) and reminders, driven by a scheduler that any number of instances run.

Requests are refused by date in decide.lua already (isolated from the expiry day, 404 from
00:00 of the 16th day). The scheduler adds what happens once: each transition or reminder is
claimed in the store with ``SET NX`` (``qg:{env}:lc:<what>``), so exactly one instance acts
and one event is written, whichever runs first:

- ``plan-expiring`` 7 days before expiry; ``environment-isolated`` at expiry;
  ``environment-released`` at 00:00 of day 16, when the environment's state is deleted (its
  pay-as-you-go usage stays for the bills) and an API-owned record is removed;
- ``pack-expiring`` 7 days before a pack ends (``pack-used-up`` is the scripts', written by
  the request that spends the pack);
- a gateway version's reminder, end and automatic renewals;
- the capacity size carried into each day's bill.

A round reads only the environments due (``limiter.due``: a sorted set per shard, scored
with the next time each environment has work), never every environment: an environment
that changes is due at once, and after its work it is scored with the next day something
happens to it by its dates (or taken out once released).

Asynchronous function invocations (``X-Invocation-Type: Event``) that arrive while the
environment is isolated are queued durably (``qg:{env}:queue``), replayed in order once it is
active again (renewed), and dropped once older than 7 x 24 h.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import random
import secrets
import time
from collections.abc import Iterator
from typing import Any

import aiohttp

from quotagate.billing import versions
from quotagate.common import metrics
from quotagate.common.aio import pause, stop_if_cancelling
from quotagate.common.clock import Clock
from quotagate.control.audit import Audit
from quotagate.control.envs import API_ENV_INDEX, ControlError, Environments, Record, api_id_batches
from quotagate.control.envs import CLAIM_TTL_S as _CLAIM_TTL_S
from quotagate.control.events import emit as events_emit
from quotagate.control.tokens import Token, Tokens
from quotagate.limiter import due, keys
from quotagate.limiter.entitlements import ISOLATION_DAYS
from quotagate.settings.schema import Environment, PackGrant, PlansFile

log = logging.getLogger("quotagate.lifecycle")

REMIND_DAYS = 7
#: Queued asynchronous invocations older than this are dropped (SPEC §11).
QUEUE_MAX_AGE_MS = 7 * 24 * 3600 * 1000
#: At most this many invocations queued per environment; more are refused (429).
QUEUE_MAX = 1_000
#: Largest queued request body.
QUEUE_MAX_BODY = 256 * 1024
#: At most this many bytes queued per environment (bodies as stored); more are refused.
QUEUE_MAX_BYTES = 32 * 1024 * 1024
#: A shard of the due index is claimed for this long, extended after each batch.
CLAIM_MS = 60_000
#: Due entries read at once, and environments of a batch worked on at once.
DUE_BATCH = 200
PARALLEL = 16
#: Every environment is put in the due index (if missing) this often, once per store...
INDEX_EVERY_S = 86_400
#: ... which each instance asks about at most this often.
INDEX_CHECK_S = 3_600


#: Claim a transition and write its event to the environment's stream, atomically (one
#: hash slot): the event exists if and only if the claim does.
_CLAIM_EMIT = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', unpack(ARGV, 2))
  return 1
end
return 0
"""
#: ``pack-used-up`` with the scripts' own once-mark (common.lua's alert_on).
_USED_UP = """
if redis.call('HSETNX', KEYS[1], 'pack:' .. ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 10000, '*', 'type', 'pack-used-up',
             'pack_id', ARGV[1], 'at_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 400 * 86400000)
  return 1
end
return 0
"""
#: Pop the queue's head only if it is still the entry just handled.
_POP_IF_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then
  redis.call('DECRBY', KEYS[2], #ARGV[1])
  return redis.call('LPOP', KEYS[1])
end
return false
"""
#: Extend / release a lock only while it is still ours.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: Append one entry unless the environment's queue is full (entries or bytes): -1 if full.
_ENQUEUE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
if (tonumber(redis.call('GET', KEYS[2])) or 0) + #ARGV[1] > tonumber(ARGV[3]) then
  return -1
end
redis.call('INCRBY', KEYS[2], #ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""


async def enqueue(redis: Any, env: str, method: str, path_qs: str, headers: dict[str, str],
                  body: bytes, now_ms: int) -> int:
    """Queue one asynchronous invocation; returns the queue's length, -1 if it is full."""
    entry = json.dumps({"at_ms": now_ms, "method": method, "path": path_qs,
                        "headers": headers, "body": base64.b64encode(body).decode()})
    # Due first (the scheduler drops it once too old, or replays it after a renewal): a
    # failure then queues nothing, rather than a queued entry the client would send again.
    await due.mark(redis, [env], now_ms)
    return int(await redis.eval(_ENQUEUE, 2, keys.queue(env), keys.queue(env) + ":bytes",
                                entry, QUEUE_MAX, QUEUE_MAX_BYTES, QUEUE_MAX_AGE_MS + 86_400_000))


def pack_ends(env: Environment, plans: PlansFile) -> Iterator[tuple[PackGrant, dt.date]]:
    """Each resource pack of ``env`` with the day it ends (its first day without it)."""
    for grant in env.packs:
        days = plans.resource_packs[grant.pack].days if grant.pack else 30
        yield grant, grant.purchased + dt.timedelta(days=days)


def next_day(env: Environment, plans: PlansFile, today: dt.date) -> dt.date | None:
    """The first day after ``today`` on which something happens to ``env`` by its dates: a
    reminder, its expiry, its release, a pack's reminder, a gateway version's reminder, end
    or automatic renewal. None: nothing ever (it is released by then)."""
    days = [env.expires - dt.timedelta(days=REMIND_DAYS), env.expires,
            env.expires + dt.timedelta(days=ISOLATION_DAYS)]
    for grant, ends in pack_ends(env, plans):
        days.append(max(grant.purchased, ends - dt.timedelta(days=REMIND_DAYS)))
    gw = env.gateway
    if gw is not None and gw.version in plans.gateway_versions:
        if gw.auto_renew:
            bought = versions.months_bought(gw, today)
            days.append(versions.expiry(gw, bought))  # its next renewal
        else:
            ends = versions.expiry(gw)
            days += [ends - dt.timedelta(days=REMIND_DAYS), ends]
    later = [d for d in days if d > today]
    return min(later) if later else None


class Scheduler:
    def __init__(self, envs: Environments, clock: Clock, upstream_for: Any = None,
                 session: aiohttp.ClientSession | None = None, forward: Any = None,
                 admit: Any = None, carry: Any = None, forward_soon: Any = None,
                 audit: Audit | None = None):
        self.envs = envs
        self.redis = envs.redis
        self.clock = clock
        #: path -> upstream base URL for replaying queued invocations (the router's).
        self.upstream_for = upstream_for
        self.session = session
        #: Moves an environment's stream to the global one (Limiter.forward_events), and the
        #: same in the background, tried again while the store fails (forward_events_soon).
        self.forward = forward
        self.forward_soon = forward_soon
        #: Counts a replayed invocation like a request (Limiter.decide); False: not now.
        self.admit = admit
        #: Carries the capacity gauge into today's bill (a size kept for days is billed for
        #: each of them, not only on the days it was reported).
        self.carry = carry
        #: Where the changes it makes to tokens are recorded (an environment released).
        self.audit = audit
        self.events = 0
        self.replayed = 0
        self.dropped = 0
        #: How soon an environment whose work failed, or whose queue waits, is tried again.
        self.every_ms = 60_000
        #: When this instance last saw that every environment was in the due index.
        self._indexed_at = 0.0
        #: Environments worked on at once within a batch of due entries.
        self._parallel = asyncio.Semaphore(PARALLEL)

    async def _claim_emit(self, env: str, what: str, kind: str, direct: bool = False,
                          **fields: Any) -> bool:
        """Claim a transition (once across instances) and write its event: through the
        environment's stream, atomically with the claim; ``direct``: to the global stream
        after the claim (the environment's keys are being deleted)."""
        if direct:
            claimed = await self.redis.set(keys.lifecycle_claim(env, what), "1", nx=True,
                                           ex=_CLAIM_TTL_S)
            if claimed:
                await events_emit(self.redis, env, kind, **fields)
            return bool(claimed)
        args: list[str | int] = [_CLAIM_TTL_S, "type", kind]
        for k, v in fields.items():
            args += [k, str(v)]
        try:
            done = await self.redis.eval(_CLAIM_EMIT, 2, keys.lifecycle_claim(env, what),
                                         keys.env_events(env), *args)
        except Exception:
            # The reply was lost, not necessarily the claim: if the store made it, its event
            # is in the environment's stream and no later round claims it again — move it.
            self._forward_later(env)
            raise
        if done:
            metrics.EVENTS_EMITTED.labels(kind).inc()
        if done and self.forward is not None:
            try:
                await self.forward(env)
            except Exception as exc:  # (a store call timed out on a busy machine, say)
                stop_if_cancelling(exc)
                log.info("event %s of %s: moved in the background (%s)", kind, env, exc)
                self._forward_later(env)
        return bool(done)

    def _forward_later(self, env: str) -> None:
        """Claimed events never wait for the next round (a minute) because one store call
        failed: they are moved in the background, tried again while the store fails."""
        if self.forward_soon is not None:
            self.forward_soon(env)

    async def run(self, every_s: float) -> None:
        self.every_ms = int(every_s * 1000)
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # one bad round must not stop the scheduler
                stop_if_cancelling(exc)
                log.warning("lifecycle round failed: %s", exc)
            await pause(every_s)

    async def run_once(self) -> int:
        """One round: every environment due by now (the due index), shard by shard, each
        shard claimed by one instance at a time; returns the events written. An idle
        deployment costs a few commands per shard and round, whatever the number of
        environments."""
        await self._index_stored()
        written = 0
        order = list(range(keys.DUE_SHARDS))
        random.shuffle(order)  # (instances starting together take different shards first)
        for shard in order:
            stop_if_cancelling()
            written += await self._shard(shard)
        self.events += written
        return written

    async def _index_stored(self) -> None:
        """Every environment is in the due index: those stored before it existed, or changed
        by an instance of an earlier version since, or in a shard the store lost, are put in
        it, due at once (those in it keep their time). Once a day per store (DUE_COMPLETE,
        kept a day, says it was done), by whichever instance comes first: the API-owned ids
        a thousand at a time (SSCAN), then the file's."""
        if self._indexed_at and time.monotonic() - self._indexed_at < INDEX_CHECK_S:
            return
        if not await self.redis.set(keys.DUE_COMPLETE, 1, nx=True, ex=INDEX_EVERY_S):
            self._indexed_at = time.monotonic()
            return
        now = self.clock.now_ms()
        async for ids in api_id_batches(self.redis):
            await due.mark(self.redis, ids, now, only_new=True)
        declared = list(self.envs.config.environments.environments)
        for start in range(0, len(declared), 1000):
            stop_if_cancelling()
            await due.mark(self.redis, declared[start:start + 1000], now, only_new=True)
        self._indexed_at = time.monotonic()

    async def _shard(self, shard: int) -> int:
        """Work through one shard's due entries, if no other instance is at it. Nothing due:
        one command."""
        if not await self.redis.zrangebyscore(keys.due(shard), "-inf", self.clock.now_ms(),
                                              start=0, num=1):
            return 0
        claim, token = keys.due_claim(shard), secrets.token_hex(8)
        if not await self.redis.set(claim, token, nx=True, px=CLAIM_MS):
            return 0
        written, now = 0, self.clock.now_ms()
        # Entries handled this round whose new time was not written (marked meanwhile): they
        # may still be due, and wait for the next round (no round goes on for ever).
        kept: set[str] = set()
        try:
            while True:
                want = DUE_BATCH + len(kept)
                got: list[Any] = await self.redis.zrangebyscore(
                    keys.due(shard), "-inf", now, start=0, num=want, withscores=True)
                todo = [(e, float(score)) for e, score in (
                    (m.decode() if isinstance(m, bytes) else str(m), score) for m, score in got)
                    if e not in kept]
                if not todo:
                    break
                done = await asyncio.gather(*(self._due(shard, e, score, now)
                                              for e, score in todo), return_exceptions=True)
                for one in done:  # (each has ended: none is left running past the claim)
                    if isinstance(one, BaseException):
                        raise one
                for (e, _), (events, settled) in zip(todo, done, strict=True):  # type: ignore
                    written += events
                    if not settled:
                        kept.add(e)
                if len(got) < want:
                    break  # (all that is due was read)
                if not await self.redis.eval(_EXTEND, 1, claim, token, CLAIM_MS):
                    break  # (it lapsed: another instance goes on from here)
        finally:
            await self.redis.eval(_RELEASE, 1, claim, token)
        return written

    async def _due(self, shard: int, env_id: str, score: float, now_ms: int
                   ) -> tuple[int, bool]:
        """One environment's work; then its next due time, unless it changed meanwhile.
        Returns the events written and whether the next due time was written."""
        async with self._parallel:
            written, next_ms = 0, None
            try:
                record = await self.envs.get(env_id)
                written, next_ms = await self._environment(record)
            except ControlError:  # gone (released, removed from the file): out of the index,
                if await self.redis.sismember(keys.FILE_OWNED_ENVS, env_id):  # unless another
                    next_ms = now_ms  # instance's file declares it (this one reloads soon)
            except Exception as exc:  # one broken environment must not stop the others
                stop_if_cancelling(exc)
                log.warning("lifecycle of %s failed this round: %s", env_id, exc)
                next_ms = now_ms  # (tried again next round)
            if next_ms is not None:  # never again this round (a queue another instance
                next_ms = max(next_ms, now_ms + self.every_ms)  # is replaying, say)
            settled = await self.redis.eval(due.SETTLE, 1, keys.due(shard), env_id,
                                            repr(score), "" if next_ms is None else int(next_ms))
            return written, bool(settled)

    async def _environment(self, record: Record) -> tuple[int, int | None]:
        """Its transitions due today; returns the events written and when it is due next
        (epoch ms; None: never, it is released)."""
        env_id, env = record.env_id, record.env
        today = self.envs.today(env)
        expires = env.expires
        release = expires + dt.timedelta(days=ISOLATION_DAYS)
        written = 0
        next_ms: list[int] = []
        # Events a script (or a claim below, in a round cut short) left in its stream: moved
        # in the background, and looked at again next round (until the stream is empty).
        if self.forward is not None and await self.redis.xlen(keys.env_events(env_id)):
            self._forward_later(env_id)
            next_ms.append(self.clock.now_ms() + self.every_ms)
        if today >= release:
            # Deleting again is harmless: delete first, then claim the event, so a failure in
            # between is retried by the next round rather than lost.
            # Its event goes straight to the global stream: the environment's own stream is
            # part of the state another scheduler's release may be deleting right now.
            if not await self._release(record):  # renewed meanwhile: look again
                return written, self.clock.now_ms()
            if await self._claim_emit(env_id, f"released:{expires}", "environment-released",
                                      direct=True, expired=expires.isoformat(),
                                      released=release.isoformat()):
                written += 1
            return written, None  # (nothing is due after the release)
        if today >= expires:
            await self._queue_work(env_id, active=False)
            if await self._claim_emit(env_id, f"isolated:{expires}", "environment-isolated",
                                      expired=expires.isoformat(), release=release.isoformat()):
                written += 1
        elif (today >= expires - dt.timedelta(days=REMIND_DAYS)
              and await self._claim_emit(env_id, f"plan-expiring:{expires}", "plan-expiring",
                                         expires=expires.isoformat(),
                                         days_left=(expires - today).days)):
            written += 1
        written += await self._packs(record, today)
        written += await self._gateway(record, today)
        if today < expires:
            await self._queue_work(env_id, active=True)
            if self.carry is not None and await self.carry(env_id):
                next_ms.append(self.envs.midnight_ms(env, today + dt.timedelta(days=1)))
        head = await self.redis.lindex(keys.queue(env_id), 0)
        if head is not None:  # replayed next round, or dropped once too old
            next_ms.append(self.clock.now_ms() + self.every_ms if today < expires else
                           json.loads(head)["at_ms"] + QUEUE_MAX_AGE_MS + 1)
        day = next_day(env, self.envs.config.plans, today)
        if day is not None:
            next_ms.append(self.envs.midnight_ms(env, day))
        return written, min(next_ms) if next_ms else None

    async def _gateway(self, record: Record, today: dt.date) -> int:
        """The gateway version: ``gateway-expiring`` 7 days before it ends and
        ``gateway-expired`` on that day (the lowest version's caps from then), unless it renews
        itself; then ``gateway-renewed`` (with its price, for billing) for each renewal of
        the last 7 days (older ones, e.g. of a file's grant first seen now, are not told)."""
        grant = record.env.gateway
        if grant is None:
            return 0
        env_id, plans = record.env_id, self.envs.config.plans
        version = plans.gateway_versions.get(grant.version)
        if version is None:
            return 0
        written = 0
        if grant.auto_renew:
            term = versions.term_of(grant)
            for renewed, new_expiry in versions.renewals(grant, today):
                if renewed < today - dt.timedelta(days=REMIND_DAYS):
                    continue
                if await self._claim_emit(
                        env_id, f"gateway-renewed:{renewed}", "gateway-renewed",
                        version=grant.version, months=term,
                        amount=f"{versions.price(version, term):.2f}",
                        expires=new_expiry.isoformat(), auto=1):
                    written += 1
            return written
        ends = versions.expiry(grant)
        if today >= ends:
            now = versions.status(grant, plans, today)
            if await self._claim_emit(env_id, f"gateway-expired:{ends}", "gateway-expired",
                                      version=grant.version, expired=ends.isoformat(),
                                      in_effect=now.in_effect):
                written += 1
        elif (today >= ends - dt.timedelta(days=REMIND_DAYS)
              and await self._claim_emit(env_id, f"gateway-expiring:{ends}",
                                         "gateway-expiring", version=grant.version,
                                         expires=ends.isoformat(),
                                         days_left=(ends - today).days)):
            written += 1
        return written

    async def _packs(self, record: Record, today: dt.date) -> int:
        """``pack-expiring`` 7 days before a pack ends, unless it is spent. ``pack-used-up``
        is written by the script whose take spends the pack; here only for a pack spent
        without a take (its size lowered below what was used), with the scripts' own mark
        (once per pack, whichever writes it)."""
        env_id, env = record.env_id, record.env
        grants = [(g, ends) for g, ends in pack_ends(env, self.envs.config.plans)
                  if g.purchased <= today < ends]
        if not grants:
            return 0
        used = await self.redis.hgetall(keys.pack_usage(env_id))
        written = 0
        for grant, ends in grants:
            amount = (self.envs.config.plans.resource_packs[grant.pack].amount if grant.pack
                      else grant.amount or 0)
            if int(used.get(grant.id.encode(), 0)) >= amount:
                if await self.redis.eval(_USED_UP, 2, keys.alerts(env_id),
                                         keys.env_events(env_id), grant.id,
                                         self.clock.now_ms()):
                    written += 1
                    metrics.EVENTS_EMITTED.labels("pack-used-up").inc()
                    self._forward_later(env_id)
            elif (today >= ends - dt.timedelta(days=REMIND_DAYS)
                  and await self._claim_emit(env_id, f"pack-expiring:{grant.id}",
                                             "pack-expiring", pack_id=grant.id,
                                             expires=ends.isoformat())):
                written += 1
        return written

    async def _release(self, record: Record) -> bool:
        """Delete the environment's state; pay-as-you-go usage stays for the bills. Checked
        again first: a renewal committed since the record was read keeps it."""
        env_id = record.env_id
        try:
            now = await self.envs.get(env_id)
        except ControlError:
            now = record
        if self.envs.today(now.env) < now.env.expires + dt.timedelta(days=ISOLATION_DAYS):
            return False
        # Its environment tokens first (an id used again later is another tenant's): should
        # the deletion below fail, the next round releases it again.
        async def audited(token: Token) -> None:
            if self.audit is not None:
                await self.audit.record({
                    "actor": "lifecycle", "actor_name": "lifecycle scheduler", "role": "",
                    "action": "revoke_token", "method": "", "path": "", "env": env_id,
                    "body": f"environment released: token {token.id} ({token.name}) revoked",
                    "status": "200", "request_id": ""})

        revoked = await Tokens(self.redis, self.clock.now_ms,
                               lambda: self.envs.config.tokens).revoke_env(env_id, audited)
        if revoked:
            log.info("environment %s is released: its environment tokens %s are revoked",
                     env_id, ", ".join(t.id for t in revoked))
        state = [k for k in (*keys.env_keys(env_id), keys.queue(env_id),
                             keys.queue(env_id) + ":bytes", keys.definition(env_id))
                 if k != keys.payg(env_id)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*state)
            pipe.srem(keys.API_OWNED_ENVS, env_id)
            pipe.zrem(API_ENV_INDEX, env_id)  # (the listing would drop it; not left to it)
            await pipe.execute()
        log.info("environment %s released: its state is deleted", env_id)
        return True

    async def replay(self, env_id: str) -> None:
        """Replay now (after a renewal) rather than at the next round."""
        try:
            await self._queue_work(env_id, active=True)
        except Exception as exc:  # the next round tries again
            stop_if_cancelling(exc)
            log.warning("replay of %s's queued invocations stopped: %s", env_id, exc)

    async def _queue_work(self, env_id: str, active: bool) -> None:
        """Drop queued invocations older than 7 x 24 h and, if the environment is active,
        replay the rest in order — one instance at a time (a lock with a token, extended per
        entry); an entry leaves the queue only if it is still the head (compare and pop)."""
        queue = keys.queue(env_id)
        if not await self.redis.llen(queue):
            return
        lock, token = keys.lifecycle_claim(env_id, "queue"), secrets.token_hex(8)
        if not await self.redis.set(lock, token, nx=True, px=60_000):
            return
        try:
            while await self.redis.eval(_EXTEND, 1, lock, token, 60_000):
                stop_if_cancelling()
                raw = await self.redis.lindex(queue, 0)
                if raw is None:
                    return
                entry = json.loads(raw)
                if self.clock.now_ms() - entry["at_ms"] > QUEUE_MAX_AGE_MS:
                    if await self.redis.eval(_POP_IF_HEAD, 2, queue, queue + ":bytes", raw):
                        self.dropped += 1
                        metrics.QUEUED_INVOCATIONS.labels("dropped").inc()
                    continue
                if not active:
                    return
                if self.admit is not None and not await self.admit(env_id, entry):
                    return  # refused now (QPS, quota): the next round tries again
                if not await self._send(env_id, entry):
                    return  # the upstream failed: try again next round
                await self.redis.eval(_POP_IF_HEAD, 2, queue, queue + ":bytes", raw)
                self.replayed += 1
                metrics.QUEUED_INVOCATIONS.labels("replayed").inc()
        finally:
            await self.redis.eval(_RELEASE, 1, lock, token)

    async def _send(self, env_id: str, entry: dict[str, Any]) -> bool:
        base = self.upstream_for(entry["path"])
        if base is None or self.session is None:
            return False
        headers = {**entry["headers"], "X-CloudBase-Env": env_id,
                   "X-Quotagate-Replayed": "1"}
        try:
            async with self.session.request(entry["method"], base + entry["path"],
                                            headers=headers,
                                            data=base64.b64decode(entry["body"])) as resp:
                await resp.read()
                return resp.status < 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("replay of a queued invocation of %s failed: %s", env_id, exc)
            return False
