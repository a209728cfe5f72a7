"""What a request costs is what it is (issue 12): an AI stream costs 50 calls whatever the
client's headers say, a call the upstream never answered costs nothing, a CORS preflight is
free unless its route charges it, and a body the gateway must read comes in time."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import aiohttp

from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.embedded import free_port
from tests.helpers import ADMIN_TOKEN, assert_problem, env

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
H = {"X-CloudBase-Env": "shop"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def usage(admin, env_id: str = "shop") -> dict[str, Any]:
    resp = await admin.get(f"/admin/v1/envs/{env_id}/usage", headers=AUTH)
    assert resp.status == 200
    return (await resp.json())["meters"]["calls"]


async def calls_become(admin, expected: int, env_id: str = "shop") -> int:
    """Charges after a response are settled just after it: wait (bounded) for the count."""
    used = -1
    for _ in range(100):
        used = (await usage(admin, env_id))["used"]
        if used == expected:
            break
        await asyncio.sleep(0.02)
    return used


async def test_a_chat_that_asks_for_a_stream_costs_50_whatever_its_accept(make_gateway,
                                                                         admin_for):
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    for body in (json.dumps({**CHAT, "stream": True}).encode(),
                 b'{"model": "m", "str\\u0065am": true}',     # an escape spells the key
                 b'{"stream": false, "STREAM": true}'):       # any case, any occurrence
        before = (await usage(admin))["used"]
        resp = await gw.post("/ai/chat?events=2&delay_ms=1", data=body,
                             headers={**H, "Accept": "*/*", "Content-Type": "application/json"})
        assert resp.status == 200
        await resp.read()
        assert await calls_become(admin, before + 50) == before + 50, body
    # A plain call costs 1, and ?stream=true asks as well as the body.
    before = (await usage(admin))["used"]
    plain = await gw.post("/ai/echo", json={**CHAT, "stream": False}, headers=H)
    assert plain.status == 200 and (await plain.json())["body_bytes"] > 0
    assert await calls_become(admin, before + 1) == before + 1
    asked = await gw.get("/ai/chat/sse?stream=true&events=1&delay_ms=1", headers=H)
    await asked.read()
    assert await calls_become(admin, before + 51) == before + 51


async def test_a_stream_nobody_asked_for_costs_the_difference_after_it(make_gateway,
                                                                       admin_for):
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    resp = await gw.post("/ai/chat/sse?events=3&delay_ms=1", headers=H)  # no body, no Accept
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    # Decided at 1 (the RateLimit headers say so), charged 49 more once it streamed.
    assert '"calls";r=7999999' in resp.headers["RateLimit"]
    await resp.read()
    assert await calls_become(admin, 50) == 50


async def test_a_body_longer_than_the_probe_is_forwarded_whole_and_its_stream_charged(
        make_gateway, admin_for, upstream):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, routes=[
        {"prefix": "/ai/", "upstream": origin, "kind": "ai", "stream_probe_bytes": 1024}])
    admin = await admin_for(gw)
    padding = "x" * 5000
    echo = await gw.post("/ai/echo", data=json.dumps({"pad": padding}).encode(), headers=H)
    got = await echo.json()
    assert got["body_bytes"] == len(json.dumps({"pad": padding}))  # prefix + rest, in order
    assert got["body"].startswith('{"pad": "xxx')
    assert await calls_become(admin, 1) == 1
    # "stream": true after the probe's end: decided at 1, the stream costs 49 after it.
    chat = await gw.post("/ai/chat?events=2&delay_ms=1",
                         data=json.dumps({"pad": padding, "stream": True}).encode(), headers=H)
    assert chat.content_type == "text/event-stream"
    await chat.read()
    assert await calls_become(admin, 51) == 51


async def test_a_quota_that_cannot_cover_a_stream_refuses_it_before_the_upstream(
        make_gateway, admin_for):
    gw = await make_gateway({"shop": env(limits={"calls": 30})})
    admin = await admin_for(gw)
    refused = await gw.post("/ai/chat", json={**CHAT, "stream": True}, headers=H)
    body = await assert_problem(refused, 429)
    assert body["type"].endswith("/quota-exceeded")
    assert (await usage(admin))["used"] == 0  # refused: never charged
    assert (await gw.post("/ai/echo", json=CHAT, headers=H)).status == 200
    assert await calls_become(admin, 1) == 1


async def test_calls_the_upstream_never_answered_are_given_back(make_gateway, admin_for,
                                                                 upstream):
    origin = f"http://127.0.0.1:{upstream.port}"
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(
        {"shop": env(limits={"calls": 2}, overage=True,
                     packs=[{"id": "p1", "meter": "calls", "amount": 3,
                             "purchased": "2026-11-20"}]),
         "slow": env()},
        upstream={"read_timeout_ms": 300},
        routes=[{"prefix": "/dead/", "upstream": dead, "kind": "function"},
                {"prefix": "/functions/", "upstream": origin, "kind": "function"}])
    admin = await admin_for(gw)
    for _ in range(3):  # the plan's 2, then the pack's first
        assert (await gw.get("/functions/f", headers=H)).status == 200
    assert (await gw.get("/dead/f", headers=H)).status == 502  # charged to the pack: back
    for _ in range(4):  # the pack's other 2, then 2 pay-as-you-go
        assert (await gw.get("/functions/f", headers=H)).status == 200
    assert (await gw.get("/dead/f", headers=H)).status == 502       # charged as payg: back
    calls = await usage(admin)
    for _ in range(50):
        if calls["payg"] == 2:
            break
        await asyncio.sleep(0.02)
        calls = await usage(admin)
    assert (calls["used"], calls["payg"]) == (2, 2)
    assert [(p["id"], p["used"]) for p in calls["packs"]] == [("p1", 3)]
    # A function that did not answer within read_timeout_ms: the call is given back, the
    # 300 ms it had the request are GBs (it may have run); one never reached costs none.
    slow = {"X-CloudBase-Env": "slow"}
    assert (await gw.get("/functions/f/slow?ms=2000", headers=slow)).status == 504
    assert (await gw.get("/dead/f", headers=slow)).status == 502
    assert await calls_become(admin, 0, "slow") == 0
    for _ in range(50):
        meters = (await (await admin.get("/admin/v1/envs/slow/usage", headers=AUTH)).json())[
            "meters"]
        if meters["gbs"]["used"]:
            break
        await asyncio.sleep(0.02)
    assert 256 * 300 <= meters["gbs"]["used"] < 256 * 2000
    assert meters["calls"]["used"] == 0


async def test_only_what_was_charged_is_given_back(make_gateway, admin_for, upstream,
                                                     store):
    """Shadow mode admits an isolated environment without charging it: its unanswered call
    gives nothing back. A database promo's free call neither (and the route's meter still
    runs)."""
    origin = f"http://127.0.0.1:{upstream.port}"
    dead = f"http://127.0.0.1:{free_port()}"
    routes = [{"prefix": "/dead/", "upstream": dead, "kind": "database"},
              {"prefix": "/database/", "upstream": origin, "kind": "database",
               "meter": "outbound_bytes"},
              {"prefix": "/functions/", "upstream": origin, "kind": "function"}]
    gw = await make_gateway({"asleep": env(anchor="2025-01-01", expires="2026-11-20",
                                           mode="shadow"),
                             "sale": env(promos=[{"id": "d1", "pack": "db-3k",
                                                  "start": "2026-11-26", "days": 2}])},
                            routes=routes)
    admin = await admin_for(gw)
    asleep, sale = {"X-CloudBase-Env": "asleep"}, {"X-CloudBase-Env": "sale"}
    # What it used while it was active, in its (last) cycle.
    await store.hset(keys.usage("asleep"), f"{day_number(dt.date(2026, 11, 1))}:calls", 5)
    assert (await usage(admin, "asleep"))["used"] == 5
    for _ in range(3):
        assert (await gw.get("/dead/x", headers=asleep)).status == 502
    assert (await gw.get("/functions/f", headers=asleep)).status == 200  # settles after
    assert (await usage(admin, "asleep"))["used"] == 5
    for _ in range(2):
        assert (await gw.get("/functions/f", headers=sale)).status == 200
    assert (await gw.get("/dead/x", headers=sale)).status == 502  # free: nothing back
    assert (await gw.get("/database/x/bytes?n=1000", headers=sale)).status == 200
    assert await calls_become(admin, 2, "sale") == 2
    meters = (await (await admin.get("/admin/v1/envs/sale/usage", headers=AUTH)).json())[
        "meters"]
    assert meters["outbound_bytes"]["used"] >= 1000  # metered under the promo


async def test_a_refund_after_midnight_stays_with_its_day(make_gateway, admin_for, upstream):
    """A call charged at 23:59:59 of the cycle's last day whose 504 comes after midnight is
    not given back from the new cycle (nor from the new day's pay-as-you-go)."""
    from tests.helpers import at

    origin = f"http://127.0.0.1:{upstream.port}"
    clock = at("2026-11-30T23:59:59")
    gw = await make_gateway({"shop": env()}, clock=clock, upstream={"read_timeout_ms": 600},
                            routes=[{"prefix": "/functions/", "upstream": origin,
                                     "kind": "function", "concurrency": False,
                                     "meter": "none"}])
    admin = await admin_for(gw)
    slow = asyncio.ensure_future(gw.get("/functions/f/slow?ms=2000", headers=H))
    await asyncio.sleep(0.2)  # decided on Nov 30
    clock.advance(seconds=2)  # Dec 1: a new cycle (anchor Nov 1)
    assert (await gw.get("/functions/f", headers=H)).status == 200  # the new cycle's first
    assert (await slow).status == 504
    await asyncio.sleep(0.3)
    assert (await usage(admin))["used"] == 1  # not given back out of the new cycle


async def test_cors_preflights_are_free_unless_the_route_charges_them(make_gateway,
                                                                       admin_for, upstream):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, routes=[
        {"prefix": "/functions/", "upstream": origin, "kind": "function"},
        {"prefix": "/paid/", "upstream": origin, "kind": "database", "preflight": "charged"},
        {"prefix": "/web", "exact": True, "upstream": origin, "kind": "action"}])
    admin = await admin_for(gw)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    resp = await gw.options("/functions/f/echo", headers={**H, **preflight})
    assert resp.status == 200 and (await resp.json())["method"] == "OPTIONS"
    # An action endpoint's preflight has no body to name its action: counted as nothing.
    assert (await gw.options("/web", headers={**H, **preflight})).status == 200
    assert (await usage(admin))["used"] == 0
    assert (await gw.options("/paid/x", headers={**H, **preflight})).status == 200
    assert (await gw.options("/functions/f", headers=H)).status == 200  # not a preflight
    assert await calls_become(admin, 2) == 2
    # Free of calls, not of the rest: an unknown environment is refused, and so is a
    # preflight over the QPS limit.
    await assert_problem(await gw.options("/functions/f", headers={
        "X-CloudBase-Env": "nobody", **preflight}), 404)


async def test_a_stream_intent_that_cannot_be_read_costs_a_streams_price_first(
        make_gateway, admin_for, upstream):
    """A body longer than the probe, compressed, or not JSON to the gateway: decided at 50
    (a quota under 50 refuses it before the upstream), 49 back after an answer that is no
    stream."""
    origin = f"http://127.0.0.1:{upstream.port}"
    routes = [{"prefix": "/ai/", "upstream": origin, "kind": "ai", "stream_probe_bytes": 1024}]
    gw = await make_gateway({"shop": env(), "poor": env(limits={"calls": 30})}, routes=routes)
    admin = await admin_for(gw)
    hidden = [json.dumps({"pad": "x" * 5000, "stream": True}).encode(),   # past the probe
              b'{"stream": true} trailing',                                # not JSON here
              b'{"stream": true, "s": "\xff"}']                           # nor this
    poor = {"X-CloudBase-Env": "poor"}
    for body in hidden:
        await assert_problem(await gw.post("/ai/chat", data=body, headers=poor), 429)
    gz = await gw.post("/ai/chat", data=b"\x1f\x8b...", headers={
        **poor, "Content-Encoding": "gzip"})
    await assert_problem(gz, 429)
    assert (await usage(admin, "poor"))["used"] == 0  # refused: nothing charged
    # With quota left, each costs 50, and 49 come back when the answer is no stream.
    for n, body in enumerate([b"not json at all", json.dumps({"pad": "y" * 5000}).encode()]):
        resp = await gw.post("/ai/echo", data=body, headers=H)
        assert resp.status == 200 and (await resp.json())["body_bytes"] == len(body)
        assert await calls_become(admin, n + 1) == n + 1


async def test_a_body_the_gateway_reads_must_come_in_time(make_gateway, admin_for, upstream):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, clients={"body_timeout_ms": 300}, routes=[
        {"prefix": "/web", "exact": True, "upstream": origin, "kind": "action"},
        {"prefix": "/ai/", "upstream": origin, "kind": "ai"}])
    admin = await admin_for(gw)

    async def trickle():
        yield b'{"action": "functions.invokeFunction", '
        await asyncio.sleep(2)
        yield b'"function_name": "f"}'

    for path in ("/web", "/ai/chat"):
        async with aiohttp.ClientSession() as s:
            resp = await s.post(gw.make_url(path), data=trickle(), headers=H)
            body = await assert_problem(resp, 408)
        assert body["code"] == "REQUEST_TIMEOUT"
    assert (await usage(admin))["used"] == 0
