"""Function concurrency, SSE weights and metered traffic / GBs through the real gateway; what
the store holds is read back afterwards (no leaked slot, exact bytes)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.entitlements import GIB
from tests.helpers import env, live_slots, local

H = {"X-CloudBase-Env": "shop"}
CYCLE = day_number(local("2026-11-01T00:00:00").date())
TODAY = day_number(local("2026-11-26T12:00:00").date())


async def usage(store: aredis.Redis, meter: str) -> int:
    return int(await store.hget(keys.usage("shop"), f"{CYCLE}:{meter}") or 0)


async def settled() -> None:
    await asyncio.sleep(0.1)


async def test_concurrency_cap_with_slow_upstreams(make_gateway, store):
    gws = [await make_gateway({"shop": env(limits={"function_concurrency": 3})})
           for _ in range(2)]
    responses = await asyncio.gather(*(
        gws[i % 2].get("/functions/f/slow?ms=400", headers=H) for i in range(8)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 3 + [429] * 5
    refused = next(r for r in responses if r.status == 429)
    body = await refused.json(content_type=None)
    assert body["type"].endswith("concurrency-exceeded")
    assert body["meter"] == "function_concurrency" and "3" in body["detail"]
    # Another function is not limited by this one's cap.
    assert (await gws[0].get("/functions/g/slow?ms=10", headers=H)).status == 200
    await settled()
    assert await live_slots(store, "shop") == {}
    assert (await gws[1].get("/functions/f/slow?ms=10", headers=H)).status == 200


async def test_no_leak_on_client_disconnect_or_upstream_failure(make_gateway, store):
    gw = await make_gateway({"shop": env(limits={"function_concurrency": 2})})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # clients giving up while the function runs
            with pytest.raises(asyncio.TimeoutError):
                await s.get(gw.make_url("/functions/f/slow?ms=300"), headers=H,
                            timeout=aiohttp.ClientTimeout(total=0.05))
    await asyncio.sleep(0.5)  # the invocations end upstream; their slots come back
    await settled()
    assert await live_slots(store, "shop") == {}
    ran = await usage(store, "gbs")  # the three runs, metered until they ended

    dead = await make_gateway({"shop": env(limits={"function_concurrency": 2})},
                              routes=[{"prefix": "/functions/", "kind": "function",
                                       "upstream": "http://127.0.0.1:1"}])
    for _ in range(4):
        assert (await dead.get("/functions/f", headers=H)).status == 502
    await settled()
    assert await live_slots(store, "shop") == {}
    assert await usage(store, "gbs") == ran  # never reached a function: no GBs


async def test_gbs_metered_from_memory_and_run_time(make_gateway, store):
    functions = {"big": {"memory_mb": 1024}}
    gw = await make_gateway({"shop": env(functions=functions)})
    assert (await gw.get("/functions/big/slow?ms=200", headers=H)).status == 200
    await settled()
    big = await usage(store, "gbs")
    assert 1024 * 200 <= big < 1024 * 400  # MB·ms: 1 GB for 0.2 s (+ proxy time)
    assert (await gw.get("/functions/small/slow?ms=200", headers=H)).status == 200
    await settled()
    small = await usage(store, "gbs") - big
    assert 256 * 200 <= small < 256 * 400  # the route's default 256 MB


async def test_gbs_hard_stop_refuses_the_next_invocation(make_gateway, store):
    gw = await make_gateway({"shop": env(limits={"gbs": 1})})  # 1 GBs = 1,024,000 MB·ms
    await store.hset(keys.usage("shop"), f"{CYCLE}:gbs", 1_024_000 - 1000)
    assert (await gw.get("/functions/f/slow?ms=50", headers=H)).status == 200
    await settled()
    resp = await gw.get("/functions/f", headers=H)
    assert resp.status == 429
    body = await resp.json(content_type=None)
    assert body["type"].endswith("quota-exceeded") and body["meter"] == "gbs"
    assert int(resp.headers["Retry-After"]) > 0
    assert (await gw.get("/database/q", headers=H)).status == 200  # other routes still pass
    overshoot = int(await store.hget(keys.payg("shop"), f"{TODAY}:gbs:unbilled"))
    assert overshoot >= 256 * 50 - 1000


async def test_storage_bytes_metered_exactly(make_gateway, store):
    gw = await make_gateway({"shop": env()})
    for n in (100_000, 1, 3 * 65536 + 7):
        resp = await gw.get(f"/storage/x/bytes?n={n}", headers=H)
        assert len(await resp.read()) == n
    await settled()
    assert await usage(store, "storage_traffic_bytes") == 100_000 + 1 + 3 * 65536 + 7
    assert await usage(store, "gbs") == 0


async def test_storage_traffic_hard_stop_and_overage(make_gateway, store):
    gw = await make_gateway({"shop": env(limits={"storage_traffic_gb": 1})})
    await store.hset(keys.usage("shop"), f"{CYCLE}:storage_traffic_bytes", GIB - 1000)
    assert (await gw.get("/storage/x/bytes?n=5000", headers=H)).status == 200
    await settled()
    resp = await gw.get("/storage/x/bytes?n=10", headers=H)
    assert resp.status == 429
    assert (await resp.json(content_type=None))["meter"] == "storage_traffic_bytes"
    assert int(await store.hget(keys.payg("shop"), f"{TODAY}:storage_traffic_bytes:unbilled")) \
        == 4000

    over = await make_gateway({"shop": env(overage=True, limits={"storage_traffic_gb": 1})})
    assert (await over.get("/storage/x/bytes?n=300", headers=H)).status == 200
    await settled()
    assert int(await store.hget(keys.payg("shop"), f"{TODAY}:storage_traffic_bytes")) == 300


async def test_sse_costs_its_weight_once_and_streams(make_gateway, store):
    gw = await make_gateway({"shop": env()})
    async with aiohttp.ClientSession() as s, s.post(
            gw.make_url("/ai/chat?events=5&delay_ms=100"),
            headers={**H, "Accept": "text/event-stream"}) as resp:
        first = await asyncio.wait_for(resp.content.readline(), 0.5)  # before the 0.5 s stream
        assert first.startswith(b"data: ")
        rest = await resp.read()
    assert rest.count(b"data: ") == 5
    assert await usage(store, "calls") == 50


async def test_invalid_function_name(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    for path in ("/functions/", "/functions/-x", "/functions/%00a"):
        resp = await gw.get(path, headers=H)
        assert resp.status == 400, path
        assert (await resp.json(content_type=None))["type"].endswith("invalid-function")


async def test_gbs_without_concurrency_slots_uses_the_function_memory(make_gateway, store,
                                                                     upstream):
    routes = [{"prefix": "/functions/", "upstream": f"http://127.0.0.1:{upstream.port}",
               "kind": "function", "concurrency": False}]
    gw = await make_gateway({"shop": env(functions={"big": {"memory_mb": 2048}})},
                            routes=routes)
    assert (await gw.get("/functions/big/slow?ms=100", headers=H)).status == 200
    await settled()
    assert 2048 * 100 <= await usage(store, "gbs") < 2048 * 300
    assert await live_slots(store, "shop") == {}  # no slot taken
