"""Events out of the gateway: the durable stream ``qg:events`` (alerts, lifecycle, purchases)
and its webhook delivery.

Consumers read the stream with a consumer group (``XREADGROUP``); the gateway's own webhook
delivery is one: group ``webhook``, one consumer per instance, so each event is POSTed by one
instance. A POST that fails is retried with exponential backoff; an event still undelivered
after ``webhook_max_attempts`` stays pending and is claimed again (by any instance) ten
minutes later, so a receiver that is down for hours gets everything when it is back. Delivery
runs beside the request path and never blocks a request.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from typing import Any

import aiohttp
import redis.asyncio as aredis
from standardwebhooks.webhooks import Webhook

from quotagate.common import metrics
from quotagate.common.aio import pause, stop_if_cancelling
from quotagate.limiter import keys
from quotagate.settings.schema import EventSettings

log = logging.getLogger("quotagate.events")

GROUP = "webhook"
#: Pending events idle this long are claimed again (their consumer died or gave up): longer
#: than one event's whole retry schedule, so an event being retried is not taken over.
RECLAIM_MS = 10 * 60_000


async def emit(redis: aredis.Redis, env: str, kind: str, **fields: Any) -> None:
    """Write one event of a change already made (purchases, plan changes) to the global
    stream; a failure is logged, never turned into a failed change (which a client would
    retry, buying twice)."""
    try:
        await redis.xadd(keys.EVENTS, {"type": kind, "env": env,
                                       **{k: str(v) for k, v in fields.items()}},
                         maxlen=1_000_000, approximate=True)
        metrics.EVENTS_EMITTED.labels(kind).inc()
    except (aredis.RedisError, OSError) as exc:
        log.error("event %s of %s not written (the change was made): %s", kind, env, exc)


def _decode(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


class WebhookDelivery:
    def __init__(self, redis: aredis.Redis, settings: EventSettings, consumer: str):
        self.redis = redis
        self.settings = settings
        self.consumer = consumer
        self.delivered = 0
        self.failures = 0
        #: Signs each delivery (Standard Webhooks) when the secret's variable is set.
        secret = os.environ.get(settings.webhook_secret_env, "") \
            if settings.webhook_secret_env else ""
        self.signer = Webhook(secret) if secret else None
        #: Where to go on reading this consumer's own pending entries, or None when there is
        #: nothing to look for. A read whose reply was lost (a socket timeout on a busy
        #: machine, a reconnect) has still made its entries pending for this consumer: they
        #: are read again from "0" at start and after every store error, not left for the
        #: ten-minute reclaim.
        self._own_pending: str | None = "0"
        #: Entries POSTed whose acknowledgement failed: acknowledged when seen again, not
        #: POSTed twice.
        self._posted: set[bytes] = set()

    async def ensure_group(self) -> None:
        with contextlib.suppress(aredis.ResponseError):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(keys.EVENTS, GROUP, id="0", mkstream=True)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_ms / 1000)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                stop_if_cancelling()  # a round of store calls may have swallowed the stop
                try:
                    await self.ensure_group()
                    await self.deliver_batch(session)
                except (aredis.RedisError, OSError) as exc:
                    stop_if_cancelling(exc)
                    self._own_pending = "0"  # a read's reply may have been lost
                    log.warning("event delivery paused: the store is unreachable (%s)", exc)
                    await pause(1.0)

    async def deliver_batch(self, session: aiohttp.ClientSession) -> int:
        claimed: Any = await self.redis.xautoclaim(keys.EVENTS, GROUP, self.consumer,
                                                   RECLAIM_MS, "0-0", count=20)
        entries: list[Any] = list(claimed[1]) if claimed else []
        if not entries and self._own_pending is not None:
            read: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, {keys.EVENTS: self._own_pending}, count=20)
            entries = [e for _, batch in read for e in batch] if read else []
            # Each entry once per look (one that fails all its attempts waits for the reclaim).
            self._own_pending = entries[-1][0] if entries else None
        if not entries:
            read = await self.redis.xreadgroup(GROUP, self.consumer, {keys.EVENTS: ">"},
                                               count=20, block=1000)
            entries = [e for _, batch in read for e in batch] if read else []
        done = 0
        for entry_id, fields in entries:
            stop_if_cancelling()  # (each post may wait up to the webhook's timeout)
            if fields is None:  # trimmed away while pending
                await self.redis.xack(keys.EVENTS, GROUP, entry_id)
                continue
            if entry_id in self._posted:  # POSTed; its acknowledgement had failed
                await self.redis.xack(keys.EVENTS, GROUP, entry_id)
                self._posted.discard(entry_id)
                continue
            event = _decode(fields)
            event.setdefault("event_id", entry_id.decode())
            if await self.post(session, event):
                if len(self._posted) >= 10_000:  # bounded (each is normally seen at once)
                    self._posted.clear()
                self._posted.add(entry_id)
                await self.redis.xack(keys.EVENTS, GROUP, entry_id)
                self._posted.discard(entry_id)
                done += 1
        return done

    async def post(self, session: aiohttp.ClientSession, event: dict[str, str]) -> bool:
        delay = self.settings.webhook_retry_ms / 1000
        body = json.dumps(event)
        for attempt in range(1, self.settings.webhook_max_attempts + 1):
            headers = {"Content-Type": "application/json",
                       "X-Quotagate-Event-Id": event["event_id"], "webhook-id": event["event_id"]}
            if self.signer is not None:  # signed at each attempt: its own timestamp
                now = dt.datetime.now(dt.UTC)
                headers["webhook-timestamp"] = str(int(now.timestamp()))
                headers["webhook-signature"] = self.signer.sign(event["event_id"], now, body)
            try:
                async with session.post(self.settings.webhook_url, data=body.encode(),
                                        headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        self.delivered += 1
                        metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                        return True
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            self.failures += 1
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            log.warning("webhook delivery of %s failed (%s), attempt %d of %d",
                        event["event_id"], reason, attempt, self.settings.webhook_max_attempts)
            if attempt < self.settings.webhook_max_attempts:
                await pause(delay)
                delay = min(delay * 2, 30.0)
        return False  # stays pending: claimed again after RECLAIM_MS
