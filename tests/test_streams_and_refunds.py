"""What a request costs is what it is (issue 12): an AI stream costs 50 calls whatever the
client's headers say, a call the upstream never answered costs nothing, a CORS preflight is
free unless its route charges it, and a body the gateway must read comes in time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

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
    # A function that did not answer within read_timeout_ms: neither the call nor its GBs.
    slow = {"X-CloudBase-Env": "slow"}
    assert (await gw.get("/functions/f/slow?ms=2000", headers=slow)).status == 504
    assert (await gw.get("/functions/f", headers=slow)).status == 200  # settles after it
    assert await calls_become(admin, 1, "slow") == 1
    meters = (await (await admin.get("/admin/v1/envs/slow/usage", headers=AUTH)).json())[
        "meters"]
    assert meters["gbs"]["used"] < 256 * 300  # the fast call's few ms, not the 300 ms


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
    # An action endpoint's preflight has no body to name its action or environment.
    assert (await gw.options("/web", headers=preflight)).status == 200
    assert (await usage(admin))["used"] == 0
    assert (await gw.options("/paid/x", headers={**H, **preflight})).status == 200
    assert (await gw.options("/functions/f", headers=H)).status == 200  # not a preflight
    assert await calls_become(admin, 2) == 2


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
