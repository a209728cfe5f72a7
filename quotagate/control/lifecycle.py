"""Lifecycle (SPEC §11) and reminders, driven by a scheduler that any number of instances run.

Requests are refused by date in decide.lua already (isolated from the expiry day, 404 from
00:00 of the 16th day). The scheduler adds what happens once: each transition or reminder is
claimed in the store with ``SET NX`` (``qg:{env}:lc:<what>``), so exactly one instance acts
and one event is written, whichever runs first:

- ``plan-expiring`` 7 days before expiry; ``environment-isolated`` at expiry;
  ``environment-released`` at 00:00 of day 16, when the environment's state is deleted (its
  pay-as-you-go usage stays for the bills) and an API-owned record is removed;
- ``pack-expiring`` 7 days before a pack ends; ``pack-used-up`` once a pack is spent.

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
from typing import Any

import aiohttp

from quotagate.clock import Clock
from quotagate.control.envs import ControlError, Environments, Record
from quotagate.control.events import emit
from quotagate.limiter import keys
from quotagate.limiter.entitlements import ISOLATION_DAYS

log = logging.getLogger("quotagate.lifecycle")

REMIND_DAYS = 7
#: Queued asynchronous invocations older than this are dropped (SPEC §11).
QUEUE_MAX_AGE_MS = 7 * 24 * 3600 * 1000
#: At most this many invocations queued per environment (the oldest is dropped beyond).
QUEUE_MAX = 10_000
#: Largest queued request body.
QUEUE_MAX_BODY = 1024 * 1024
_CLAIM_TTL_S = 400 * 86400


async def _claim(redis: Any, env: str, what: str) -> bool:
    return bool(await redis.set(keys.lifecycle_claim(env, what), "1", nx=True,
                                ex=_CLAIM_TTL_S))


async def enqueue(redis: Any, env: str, method: str, path_qs: str, headers: dict[str, str],
                  body: bytes, now_ms: int) -> int:
    """Queue one asynchronous invocation; returns the queue's length."""
    entry = json.dumps({"at_ms": now_ms, "method": method, "path": path_qs,
                        "headers": headers, "body": base64.b64encode(body).decode()})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.queue(env), entry)
        pipe.ltrim(keys.queue(env), -QUEUE_MAX, -1)
        pipe.llen(keys.queue(env))
        _, _, length = await pipe.execute()
    return int(length)


class Scheduler:
    def __init__(self, envs: Environments, clock: Clock, upstream_for: Any = None,
                 session: aiohttp.ClientSession | None = None):
        self.envs = envs
        self.redis = envs.redis
        self.clock = clock
        #: path -> upstream base URL for replaying queued invocations (the router's).
        self.upstream_for = upstream_for
        self.session = session
        self.events = 0
        self.replayed = 0
        self.dropped = 0

    async def run(self, every_s: float) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # one bad round must not stop the scheduler
                log.warning("lifecycle round failed: %s", exc)
            await asyncio.sleep(every_s)

    async def run_once(self) -> int:
        """One pass over every environment; returns the events written."""
        written = 0
        for env_id in list(await self.envs.ids()):
            try:
                record = await self.envs.get(env_id)
            except ControlError:
                continue
            written += await self._environment(record)
        self.events += written
        return written

    async def _environment(self, record: Record) -> int:
        env_id, env = record.env_id, record.env
        today = self.envs.today(env)
        expires = env.expires
        release = expires + dt.timedelta(days=ISOLATION_DAYS)
        written = 0
        if today >= release:
            if await _claim(self.redis, env_id, f"released:{expires}"):
                await self._release(record)
                await emit(self.redis, env_id, "environment-released",
                           expired=expires.isoformat(), released=release.isoformat())
                written += 1
            return written
        if today >= expires:
            self.dropped += await drop_old(self.redis, env_id, self.clock.now_ms())
            if await _claim(self.redis, env_id, f"isolated:{expires}"):
                await emit(self.redis, env_id, "environment-isolated",
                           expired=expires.isoformat(), release=release.isoformat())
                written += 1
        elif (today >= expires - dt.timedelta(days=REMIND_DAYS)
              and await _claim(self.redis, env_id, f"plan-expiring:{expires}")):
            await emit(self.redis, env_id, "plan-expiring", expires=expires.isoformat(),
                       days_left=(expires - today).days)
            written += 1
        written += await self._packs(record, today)
        if today < expires:
            await self._replay(env_id)
        return written

    async def _packs(self, record: Record, today: dt.date) -> int:
        env_id, env = record.env_id, record.env
        plans = self.envs.config.plans
        used = await self.redis.hgetall(keys.pack_usage(env_id))
        written = 0
        for grant in env.packs:
            if grant.pack:
                spec = plans.resource_packs[grant.pack]
                amount, days = spec.amount, spec.days
            else:
                amount, days = grant.amount or 0, 30
            ends = grant.purchased + dt.timedelta(days=days)
            if not grant.purchased <= today < ends:
                continue
            if int(used.get(grant.id.encode(), 0)) >= amount:
                if await _claim(self.redis, env_id, f"pack-used-up:{grant.id}"):
                    await emit(self.redis, env_id, "pack-used-up", pack_id=grant.id)
                    written += 1
            elif (today >= ends - dt.timedelta(days=REMIND_DAYS)
                  and await _claim(self.redis, env_id, f"pack-expiring:{grant.id}")):
                await emit(self.redis, env_id, "pack-expiring", pack_id=grant.id,
                           expires=ends.isoformat())
                written += 1
        return written

    async def _release(self, record: Record) -> None:
        """Delete the environment's state; pay-as-you-go usage stays for the bills."""
        env_id = record.env_id
        state = [k for k in (*keys.env_keys(env_id), keys.queue(env_id),
                             keys.definition(env_id)) if k != keys.payg(env_id)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*state)
            pipe.srem(keys.API_OWNED_ENVS, env_id)
            await pipe.execute()
        log.info("environment %s released: its state is deleted", env_id)

    async def replay(self, env_id: str) -> None:
        """Replay now (after a renewal) rather than at the next round."""
        try:
            await self._replay(env_id)
        except Exception as exc:  # the next round tries again
            log.warning("replay of %s's queued invocations stopped: %s", env_id, exc)

    async def _replay(self, env_id: str) -> None:
        """Replay queued invocations in order (one instance at a time), dropping old ones."""
        queue = keys.queue(env_id)
        if not await self.redis.llen(queue) or self.upstream_for is None:
            return
        lock = keys.lifecycle_claim(env_id, "replaying")
        if not await self.redis.set(lock, "1", nx=True, px=60_000):
            return
        try:
            while True:
                raw = await self.redis.lindex(queue, 0)
                if raw is None:
                    return
                entry = json.loads(raw)
                if self.clock.now_ms() - entry["at_ms"] > QUEUE_MAX_AGE_MS:
                    await self.redis.lpop(queue)
                    self.dropped += 1
                    continue
                if not await self._send(env_id, entry):
                    return  # the upstream failed: try again next round
                await self.redis.lpop(queue)
                self.replayed += 1
        finally:
            await self.redis.delete(lock)

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


async def drop_old(redis: Any, env_id: str, now_ms: int) -> int:
    """Drop queued invocations older than 7 x 24 h (also while still isolated)."""
    dropped = 0
    while True:
        raw = await redis.lindex(keys.queue(env_id), 0)
        if raw is None or now_ms - json.loads(raw)["at_ms"] <= QUEUE_MAX_AGE_MS:
            return dropped
        await redis.lpop(keys.queue(env_id))
        dropped += 1
