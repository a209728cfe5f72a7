"""Quota alerts decided inside the store: once per environment, meter, level and cycle across
instances; moved to the durable global stream; delivered to a webhook with retries."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from quotagate.control.events import GROUP, WebhookDelivery
from quotagate.limiter import keys
from quotagate.limiter.entitlements import MBMS_PER_GBS
from quotagate.settings.schema import EventSettings
from tests.helpers import at, env, local, write_config

NOON = "2026-11-26T12:00:00"


async def events(client: aredis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await client.xrange(keys.EVENTS)]


async def test_alerts_once_per_level_across_instances(tmp_path: Path, noon_limiter,
                                                      redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10})})
    clock = at(NOON)
    lims = [await noon_limiter(config, clock) for _ in range(3)]
    await asyncio.gather(*(lims[i % 3].decide("shop", "function", 1) for i in range(25)))
    await asyncio.sleep(0.2)  # moved to the global stream
    got = await events(redis_client)
    assert sorted((e["meter"], e["level"]) for e in got) == [
        ("calls", "100"), ("calls", "80"), ("calls", "90")]
    assert {e["env"] for e in got} == {"shop"} and {e["type"] for e in got} == {"quota-alert"}
    assert len({e["event_id"] for e in got}) == 3
    assert await redis_client.xlen(keys.env_events("shop")) == 0  # all moved
    # Nothing more this cycle, however many more requests; the next cycle alerts again.
    await asyncio.gather(*(lims[0].decide("shop", "function", 1) for _ in range(5)))
    clock.set(local("2026-12-01T00:00:00"))
    await asyncio.gather(*(lims[1].decide("shop", "function", 1) for _ in range(8)))
    await asyncio.sleep(0.2)
    levels = Counter((e["cycle_day"], e["level"]) for e in await events(redis_client))
    assert len(levels) == 4 and all(n == 1 for n in levels.values())  # + 80 % of December


async def test_metered_and_big_steps_alert_every_level_crossed(tmp_path: Path, noon_limiter,
                                                               redis_client):
    config = write_config(tmp_path, {"shop": env(overage=True, limits={"gbs": 10})})
    lim = await noon_limiter(config)
    lim.meter("shop", "gbs", 7 * MBMS_PER_GBS)
    await asyncio.sleep(0.1)
    assert await events(redis_client) == []
    lim.meter("shop", "gbs", 50 * MBMS_PER_GBS)  # 70 % -> 570 %: 80, 90 and 100 at once
    await asyncio.sleep(0.2)
    got = await events(redis_client)
    assert sorted(int(e["level"]) for e in got) == [80, 90, 100]
    assert {e["meter"] for e in got} == {"gbs"}
    assert got[0]["quota"] == str(10 * MBMS_PER_GBS)


async def test_no_alerts_for_meters_without_alerts_or_zero_quota(tmp_path: Path, noon_limiter,
                                                                 redis_client):
    config = write_config(tmp_path, {"shop": env(overage=True, limits={"calls": 0,
                                                                       "ai_tokens": 10})})
    lim = await noon_limiter(config)
    await asyncio.gather(*(lim.decide("shop", "function", 1) for _ in range(5)))
    await lim.ingest("shop", "r1", "ai_tokens", 50, lim.clock.now_ms())
    await asyncio.sleep(0.1)
    assert await events(redis_client) == []


async def test_webhook_receiver_down_and_back(make_gateway, valkey_url):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from quotagate.limiter.embedded import free_port

    port = free_port()
    gw = await make_gateway(
        {"shop": env(limits={"calls": 10})},
        events={"webhook_url": f"http://127.0.0.1:{port}/hook", "webhook_retry_ms": 20,
                "webhook_max_attempts": 30})
    h = {"X-CloudBase-Env": "shop"}
    for _ in range(10):
        assert (await gw.get("/functions/f", headers=h)).status == 200
    await asyncio.sleep(0.5)  # the receiver is down: attempts fail meanwhile
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        assert request.headers["X-Quotagate-Event-Id"] == received[-1]["event_id"]
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = TestServer(app, port=port)
    await receiver.start_server()
    try:
        for _ in range(100):
            if len(received) >= 3:
                break
            await asyncio.sleep(0.1)
        assert sorted(int(e["level"]) for e in received) == [80, 90, 100]
        assert {e["env"] for e in received} == {"shop"}
        client = aredis.Redis.from_url(valkey_url)
        pending = await client.xpending(keys.EVENTS, "webhook")
        assert pending["pending"] == 0  # every one acknowledged
        await client.aclose()
    finally:
        await receiver.close()


async def test_webhooks_are_signed_and_a_tampered_body_fails(make_gateway, monkeypatch):
    """Standard Webhooks: a receiver verifies with its own library (the reference one here);
    the same delivery with a changed body, or signed with another secret, is refused."""
    import base64
    import secrets

    from aiohttp import web
    from aiohttp.test_utils import TestServer
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from quotagate.limiter.embedded import free_port

    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("QUOTAGATE_WEBHOOK_SECRET", secret)
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    port = free_port()
    receiver = TestServer(app, port=port)
    await receiver.start_server()
    try:
        gw = await make_gateway(
            {"shop": env(limits={"calls": 5})},
            events={"webhook_url": f"http://127.0.0.1:{port}/hook", "webhook_retry_ms": 20})
        for _ in range(5):
            assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status \
                == 200
        for _ in range(100):
            if len(received) >= 3:
                break
            await asyncio.sleep(0.1)
        assert len(received) >= 3
        body, headers = received[0]
        event = Webhook(secret).verify(body, headers)
        assert event["event_id"] == headers["webhook-id"] == headers["X-Quotagate-Event-Id"]
        tampered = body.replace(b'"shop"', b'"shap"')
        assert tampered != body
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(tampered, headers)
        other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(body, headers)
    finally:
        await receiver.close()


async def _receiver(received: list[dict]) -> Any:
    """A webhook receiver on a real socket, appending each event it is POSTed."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = TestServer(app)
    await receiver.start_server()
    return receiver


async def test_an_event_whose_read_reply_was_lost_is_delivered(redis_client):
    """A read (XREADGROUP) whose reply never reached the instance — its socket timed out on a
    busy machine, a reconnect — has still made the event pending for that consumer. The
    delivery reads its own pending events again at start and after each store error: the
    event is POSTed now, not after the ten-minute reclaim."""
    received: list[dict] = []
    receiver = await _receiver(received)
    delivery = WebhookDelivery(redis_client, EventSettings(
        webhook_url=str(receiver.make_url("/hook"))), "instance-a")
    await delivery.ensure_group()
    await redis_client.xadd(keys.EVENTS, {"type": "quota-alert", "env": "shop", "level": "80"})
    # The read whose reply was lost: the event is now pending for instance-a.
    await redis_client.xreadgroup(GROUP, "instance-a", {keys.EVENTS: ">"}, count=20)
    task = asyncio.get_running_loop().create_task(delivery.run())
    try:
        for _ in range(150):
            if received:
                break
            await asyncio.sleep(0.1)
        assert [(e["env"], e["level"]) for e in received] == [("shop", "80")]
        for _ in range(50):  # acknowledged once the POST succeeded
            if (await redis_client.xpending(keys.EVENTS, GROUP))["pending"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await redis_client.xpending(keys.EVENTS, GROUP))["pending"] == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await receiver.close()


async def test_a_move_made_again_adds_no_copy(tmp_path: Path, noon_limiter, redis_client,
                                              store_url):
    """A move that appended its events but did not delete them from the environment's stream
    (its reply lost to a timeout, or the instance died in between) is made again — by a retry
    or the sweep — without a second copy on the global stream. Here the first mover's user
    may not XDEL (an ACL), so its move stops exactly there."""
    from urllib.parse import urlsplit

    from quotagate.common.addresses import StoreAddress
    from quotagate.limiter.limiter import Limiter
    from quotagate.limiter.store import PipelinedStore

    config = write_config(tmp_path, {"shop": env()})
    await redis_client.xadd(keys.env_events("shop"), {"type": "quota-alert", "level": "80"})
    await redis_client.xadd(keys.env_events("shop"), {"type": "quota-alert", "level": "90"})
    await redis_client.execute_command("ACL", "SETUSER", "no-xdel", "on", ">pw", "~*", "&*",
                                       "+@all", "-xdel")
    try:
        url = urlsplit(store_url)
        store = PipelinedStore(StoreAddress.from_url(
            f"redis://no-xdel:pw@{url.hostname}:{url.port}"), timeout_ms=2000,
            connect_timeout_ms=2000, retry_interval_ms=100)
        mover = Limiter(store, clock=at(NOON))
        try:
            with pytest.raises(Exception, match=r"NOPERM|no permissions"):
                await mover.forward_events("shop")
        finally:
            await mover.close(give_back=False)
        assert len(await events(redis_client)) == 2  # appended...
        assert await redis_client.xlen(keys.env_events("shop")) == 2  # ...not deleted
        lim = await noon_limiter(config)
        assert await lim.forward_events("shop") == 2  # made again
        got = await events(redis_client)
        assert sorted(e["level"] for e in got) == ["80", "90"], got  # no copies
        assert await redis_client.xlen(keys.env_events("shop")) == 0
    finally:
        await redis_client.execute_command("ACL", "DELUSER", "no-xdel")


async def test_a_post_whose_acknowledgement_failed_is_not_posted_again(redis_client,
                                                                        store_url):
    """The POST went through, the XACK did not (here the delivery's user may not XACK until
    the test allows it): the event is read again as this consumer's own pending entry and
    acknowledged when the store lets it — the receiver gets it once."""
    received: list[dict] = []
    receiver = await _receiver(received)
    await redis_client.execute_command("ACL", "SETUSER", "no-xack", "on", ">pw", "~*", "&*",
                                       "+@all", "-xack")
    delivery_client = aredis.Redis.from_url(store_url, username="no-xack", password="pw")
    delivery = WebhookDelivery(delivery_client, EventSettings(
        webhook_url=str(receiver.make_url("/hook"))), "instance-b")
    await delivery.ensure_group()
    await redis_client.xadd(keys.EVENTS, {"type": "quota-alert", "env": "shop", "level": "90"})
    task = asyncio.get_running_loop().create_task(delivery.run())
    try:
        for _ in range(150):
            if received:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # rounds that find it pending again, unacknowledged
        assert (await redis_client.xpending(keys.EVENTS, GROUP))["pending"] == 1
        await redis_client.execute_command("ACL", "SETUSER", "no-xack", "+xack")
        for _ in range(100):
            if (await redis_client.xpending(keys.EVENTS, GROUP))["pending"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await redis_client.xpending(keys.EVENTS, GROUP))["pending"] == 0
        assert [(e["env"], e["level"]) for e in received] == [("shop", "90")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await delivery_client.aclose()
        await redis_client.execute_command("ACL", "DELUSER", "no-xack")
        await receiver.close()


async def test_a_retry_holds_the_lock_its_failed_move_left(tmp_path: Path, noon_limiter,
                                                          redis_client):
    """A move whose reply was lost (a store timeout) cannot release its lock; its retry, on
    the same instance, takes the events on under that lock at once instead of waiting out
    the lock's 30 s (and the sweep after). Another instance's lock is waited for, then the
    move is tried again later (an error, not "nothing to move")."""
    from quotagate.limiter.errors import StoreError

    config = write_config(tmp_path, {"shop": env()})
    lim = await noon_limiter(config)
    forwarder = lim._events  # (the lock a failed move of this instance left behind)
    forwarder._tokens["shop"] = "this-instance:left"
    await redis_client.set(keys.forward_lock("shop"), "this-instance:left", px=30_000)
    await redis_client.xadd(keys.env_events("shop"), {"type": "quota-alert", "level": "80"})
    assert await lim.forward_events("shop") == 1
    assert [e["level"] for e in await events(redis_client)] == ["80"]
    assert not await redis_client.exists(keys.forward_lock("shop"))  # released now

    await redis_client.set(keys.forward_lock("shop"), "another-instance", px=30_000)
    await redis_client.xadd(keys.env_events("shop"), {"type": "quota-alert", "level": "90"})
    with pytest.raises(StoreError, match="being moved by another instance"):
        await lim.forward_events("shop")
    assert await redis_client.xlen(keys.env_events("shop")) == 1  # left for the retry
