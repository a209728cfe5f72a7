"""Realtime watches through real gateways: real WebSocket clients, the protocol stub upstream,
a real Valkey; slots read back from the store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from quotagate.common.clock import StoreClock
from quotagate.gateway.app import STATE
from quotagate.limiter.embedded import free_port, free_ports
from tests.helpers import (
    PLANS,
    QUOTAGATE,
    at,
    env,
    live_slots,
    local,
    realtime_routes,
    wait_ready,
)


class Watcher:
    """One client WebSocket speaking the watch protocol; frames are collected as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.raw: list[str | bytes] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.raw.append(msg.data)
                try:
                    frame = json.loads(msg.data)
                except ValueError:
                    frame = None
                if isinstance(frame, dict):
                    self.frames.append(frame)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self.raw.append(msg.data)
            self._arrived.set()
        self._arrived.set()

    async def send(self, msg_type: str, watch_id: Any = None, request_id: Any = None,
                   **data: Any) -> None:
        await self.ws.send_str(json.dumps({"watchId": watch_id, "requestId": request_id,
                                           "msgType": msg_type, "msgData": data}))

    async def wait_for(self, pred, timeout: float = 3.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if pred(frame):
                    return frame
            seen = len(self.frames)
            left = deadline - time.monotonic()
            if left <= 0 or (self.ws.closed and self._reader.done()):
                raise AssertionError(f"no such frame; got {self.frames[-5:]}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def of(self, watch_id: str, msg_type: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("watchId") == watch_id
                and (msg_type is None or f.get("msgType") == msg_type)]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


def answered(watch_id: str):
    return lambda f: f.get("watchId") == watch_id and f.get("msgType") in ("INIT_EVENT", "ERROR")


@pytest.fixture
async def ws_session():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def connect(ws_session: aiohttp.ClientSession):
    opened: list[Watcher] = []

    async def open_(gw: TestClient, headers: dict[str, str] | None = None,
                    query: str = "event_ms=50", **kw: Any) -> Watcher:
        ws = await ws_session.ws_connect(gw.make_url(f"/realtime?{query}"),
                                         headers=headers or {}, **kw)
        watcher = Watcher(ws)
        opened.append(watcher)
        return watcher

    yield open_
    for w in opened:
        if not w.ws.closed:
            await w.close()


async def login(w: Watcher, env_id: str = "shop") -> dict[str, Any]:
    await w.send("LOGIN", request_id="login", envId=env_id, accessToken="t")
    return await w.wait_for(lambda f: f.get("requestId") == "login")


async def stub_stats(upstream: TestServer) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{upstream.port}/_realtime") as r:
        return await r.json()


async def settle() -> None:
    """Slots go back on the gateway's next loop tick; the store then has them."""
    await asyncio.sleep(0.1)


async def test_cap_exact_over_sockets_and_instances(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    envs = {"shop": env(plan="personal")}  # 10 realtime connections
    gws = [await make_gateway(envs, routes=routes) for _ in range(2)]
    sockets = [await connect(gws[i % 2]) for i in range(4)]
    for w in sockets:
        assert (await login(w))["msgType"] == "LOGIN_RES"
    # 4 sockets x 4 watches at once over 2 gateways: cap 10 -> 10 open, 6 refused here.
    await asyncio.gather(*(w.send("INIT_WATCH", f"s{i}w{j}", f"r{i}{j}", envId="shop",
                                  collName="todos", query="{}")
                           for i, w in enumerate(sockets) for j in range(4)))
    replies = await asyncio.gather(*(w.wait_for(answered(f"s{i}w{j}"))
                                     for i, w in enumerate(sockets) for j in range(4)))
    kinds = Counter(f["msgType"] for f in replies)
    assert kinds == {"INIT_EVENT": 10, "ERROR": 6}
    for f in replies:
        if f["msgType"] == "ERROR":
            assert f["msgData"]["code"] == "REALTIME_CONNECTION_LIMIT_EXCEEDED"
            assert f["requestId"] == "r" + f["watchId"][1] + f["watchId"][3]
            assert "10" in f["msgData"]["message"]
    stats = await stub_stats(upstream)
    assert stats["inits"] == 10 and stats["open_watches"] == 10  # refused ones not forwarded
    assert await live_slots(store, "shop") == {"rt:": 10}
    # The open watches keep receiving events after the refusals, sockets and all.
    open_ids = [f["watchId"] for f in replies if f["msgType"] == "INIT_EVENT"]
    owner = {f"s{i}w{j}": w for i, w in enumerate(sockets) for j in range(4)}
    for wid in open_ids:
        count = len(owner[wid].of(wid, "NEXT_EVENT"))
        await owner[wid].wait_for(
            lambda f, wid=wid, count=count: f.get("watchId") == wid
            and f.get("msgType") == "NEXT_EVENT" and f["msgData"]["seq"] > count)

    # CLOSE_WATCH frees one: exactly one new watch fits, on the other instance.
    closing = open_ids[0]
    await owner[closing].send("CLOSE_WATCH", closing, "c1")
    await settle()
    taker = next(w for w in sockets if w is not owner[closing])
    await taker.send("INIT_WATCH", "late1", "x1", collName="todos")
    await taker.send("INIT_WATCH", "late2", "x2", collName="todos")
    assert (await taker.wait_for(answered("late1")))["msgType"] == "INIT_EVENT"
    assert (await taker.wait_for(answered("late2")))["msgData"]["code"] == \
        "REALTIME_CONNECTION_LIMIT_EXCEEDED"
    # A socket's close frees all its watches.
    gone = sockets[0]
    held = len({f["watchId"] for f in gone.frames if f["msgType"] == "INIT_EVENT"}) - (
        1 if owner[closing] is gone else 0)
    await gone.close()
    await settle()
    assert await live_slots(store, "shop") == {"rt:": 10 - held}
    # What the instances hold is what the store counts.
    assert sum(g.app[STATE].limiter.slots_held("shop", "rt:") for g in gws) == 10 - held


async def test_rebuild_of_a_held_watch_takes_nothing(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env(limits={"realtime": 2})}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})  # env from the header
    for wid in ("a", "b"):
        await w.send("INIT_WATCH", wid, wid, collName="c")
        assert (await w.wait_for(answered(wid)))["msgType"] == "INIT_EVENT"
    await w.send("REBUILD_WATCH", "a", "ra", collName="c")
    await w.wait_for(lambda f: f.get("requestId") == "ra")
    assert (await w.wait_for(lambda f: f.get("requestId") == "ra"))["msgType"] == "INIT_EVENT"
    await w.send("REBUILD_WATCH", "zz", "rz", collName="c")  # not held here: a new watch
    assert (await w.wait_for(lambda f: f.get("requestId") == "rz"))["msgData"]["code"] == \
        "REALTIME_CONNECTION_LIMIT_EXCEEDED"
    await w.send("PING", request_id="p")
    assert (await w.wait_for(lambda f: f.get("requestId") == "p"))["msgType"] == "PONG"
    assert await live_slots(store, "shop") == {"rt:": 2}
    # The upstream refusing a held watch gives its slot back.
    await w.send("CLOSE_WATCH", "b", "cb")
    await settle()
    await w.send("INIT_WATCH", "f", "rf", collName="fail")
    assert (await w.wait_for(lambda f: f.get("requestId") == "rf"))["msgData"]["code"] == \
        "WATCH_FAILED"
    await settle()
    assert await live_slots(store, "shop") == {"rt:": 1}


async def test_environment_from_login_and_refusals(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    envs = {"shop": env(), "old": env(anchor="2025-01-01", expires="2026-11-20")}
    gw = await make_gateway(envs, routes=routes)
    # No environment yet: a watch is refused (it could not be counted), the socket stays.
    w = await connect(gw)
    await w.send("INIT_WATCH", "a", "ra", collName="c")
    assert (await w.wait_for(answered("a")))["msgData"]["code"] == "ENVIRONMENT_REQUIRED"
    await w.send("LOGIN", request_id="bad", envId="Bad_Id!")
    assert (await w.wait_for(lambda f: f.get("requestId") == "bad"))["msgData"]["code"] == \
        "INVALID_ENV_ID"
    assert (await login(w))["msgType"] == "LOGIN_RES"
    await w.send("LOGIN", request_id="other", envId="old")
    assert (await w.wait_for(lambda f: f.get("requestId") == "other"))["msgData"]["code"] == \
        "ENVIRONMENT_MISMATCH"
    await w.send("INIT_WATCH", "b", "rb", envId="old", collName="c")
    assert (await w.wait_for(answered("b")))["msgData"]["code"] == "ENVIRONMENT_MISMATCH"
    await w.send("INIT_WATCH", "c", "rc", collName="c")
    assert (await w.wait_for(answered("c")))["msgType"] == "INIT_EVENT"
    assert await live_slots(store, "shop") == {"rt:": 1}

    # An isolated environment in LOGIN: ERROR, then the socket is closed by policy.
    iso = await connect(gw)
    await iso.send("LOGIN", request_id="l", envId="old")
    assert (await iso.wait_for(lambda f: f.get("requestId") == "l"))["msgData"]["code"] == \
        "ENVIRONMENT_ISOLATED"
    await iso._reader
    assert iso.ws.close_code == 3050
    unknown = await connect(gw)
    await unknown.send("INIT_WATCH", "u", "ru", envId="nobody", collName="c")  # before LOGIN
    assert (await unknown.wait_for(answered("u")))["msgData"]["code"] == "ENVIRONMENT_REQUIRED"
    await unknown.send("LOGIN", request_id="n", envId="nobody")
    assert (await unknown.wait_for(lambda f: f.get("requestId") == "n"))["msgData"]["code"] == \
        "ENVIRONMENT_NOT_FOUND"
    await unknown._reader
    assert unknown.ws.close_code == 3050

    # Named at the upgrade: the socket is accepted, told why and closed with 3050 (the SDK
    # stops on it; it retries an HTTP refusal of the upgrade), never reaching the upstream.
    inits = (await stub_stats(upstream))["sockets"]
    async with aiohttp.ClientSession() as s:
        for env_id, code in (("old", "ENVIRONMENT_ISOLATED"), ("nobody", "ENVIRONMENT_NOT_FOUND")):
            ws = await s.ws_connect(gw.make_url("/realtime"), headers={"X-CloudBase-Env": env_id})
            frame = await ws.receive_json(timeout=3)
            assert frame["msgType"] == "ERROR" and frame["msgData"]["code"] == code, frame
            closing = await ws.receive(timeout=3)
            assert closing.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 3050
            await ws.close()
    assert (await stub_stats(upstream))["sockets"] == inits

HOSTILE = [
    "not json at all",
    "[1, 2, 3]",
    '"a string"',
    '{"msgType": 7}',
    '{"msgType": "NOT_A_TYPE", "watchId": "w"}',
    '{"watchId": {"$ne": 1}}',
    "{" * 10_000,
    '{"msgType": null, "watchId": null}',
]


@pytest.mark.parametrize("strict", [False, True])
async def test_malformed_and_hostile_frames(make_gateway, connect, upstream, store, strict):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}", strict=strict,
                             max_frame_bytes=65536)
    gw = await make_gateway({"shop": env(limits={"realtime": 3})}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await w.send("INIT_WATCH", "keep", "k", collName="c")
    assert (await w.wait_for(answered("keep")))["msgType"] == "INIT_EVENT"
    for text in HOSTILE:
        await w.ws.send_str(text)
    await w.ws.send_bytes(b"\x00\xffbinary")
    # Watch frames that cannot be counted are never forwarded, strict or not.
    for bad in ({"msgType": "INIT_WATCH"}, {"msgType": "INIT_WATCH", "watchId": 12},
                {"msgType": "INIT_WATCH", "watchId": "x" * 300},
                {"msgType": "REBUILD_WATCH", "watchId": ["a"]},
                {"msgType": "INIT_WATCH", "watchId": "e", "msgData": {"envId": 5}}):
        await w.ws.send_str(json.dumps({**bad, "requestId": "bad"}))
    await w.send("PING", request_id="after")
    await w.wait_for(lambda f: f.get("requestId") == "after")
    # The socket and its watch are still up.
    seen = len(w.of("keep", "NEXT_EVENT"))
    await w.wait_for(lambda f: f.get("watchId") == "keep" and f.get("msgType") == "NEXT_EVENT"
                     and f["msgData"]["seq"] > seen)
    bad_replies = [f for f in w.frames if f.get("requestId") == "bad"]
    assert len(bad_replies) == 5
    assert {f["msgData"]["code"] for f in bad_replies} <= {"INVALID_FRAME", "ENVIRONMENT_MISMATCH"}
    stats = await stub_stats(upstream)
    assert stats["inits"] == 1
    echoed = [r for r in w.raw if r in HOSTILE or r == b"\x00\xffbinary"]
    invalid = [f for f in w.frames if f.get("msgType") == "ERROR"
               and f["msgData"]["code"] == "INVALID_FRAME" and f.get("requestId") != "bad"]
    unreadable = ["not json at all", "{" * 10_000, b"\x00\xffbinary"]
    if strict:  # refused here with an ERROR each, none reached the upstream
        assert echoed == [] and len(invalid) == len(HOSTILE) + 1
    else:  # what reads as JSON but not the protocol passes untouched (the stub echoes it);
        # what cannot be read (it could be a watch to the upstream's parser) never does
        assert sorted(map(str, echoed)) == sorted(t for t in HOSTILE if t not in unreadable)
        assert len(invalid) == len(unreadable)
    assert await live_slots(store, "shop") == {"rt:": 1}
    # An oversized frame closes the socket (1009) and its slots come back.
    await w.ws.send_str("x" * 70_000)
    await w._reader
    assert w.ws.close_code == 1009
    await settle()
    assert await live_slots(store, "shop") == {}


async def test_isolation_closes_held_watches(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    clock_env = {"shop": env(expires="2026-12-01")}


    clock = at("2026-11-30T23:59:00")
    gw = await make_gateway(clock_env, routes=routes, clock=clock)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    for wid in ("a", "b"):
        await w.send("INIT_WATCH", wid, wid, collName="c")
        assert (await w.wait_for(answered(wid)))["msgType"] == "INIT_EVENT"
    limiter = gw.app[STATE].limiter
    assert await limiter.renew() == {"shop": 0}
    clock.set(local("2026-12-01T00:00:00"))  # plan expiry: isolated
    assert await limiter.renew() == {"shop": 3}
    await w._reader
    ended = [f for f in w.frames if f.get("msgType") == "ERROR"]
    assert {f["watchId"] for f in ended} == {"a", "b"}
    assert {f["msgData"]["code"] for f in ended} == {"ENVIRONMENT_ISOLATED"}
    assert w.ws.close_code == 3050
    await settle()
    assert await live_slots(store, "shop") == {}
    assert (await stub_stats(upstream))["open_watches"] == 0


async def test_socket_unit_caps_upgrades(make_gateway, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}", realtime_unit="socket")
    gw = await make_gateway({"shop": env(limits={"realtime": 2})}, routes=routes)
    h = {"X-CloudBase-Env": "shop"}
    async with aiohttp.ClientSession() as s:
        a = await s.ws_connect(gw.make_url("/realtime"), headers=h)
        b = await s.ws_connect(gw.make_url("/realtime"), headers=h)
        assert await live_slots(store, "shop") == {"rt:": 2}
        async with s.get(gw.make_url("/realtime"),
                         headers={**h, "Upgrade": "websocket", "Connection": "Upgrade",
                                  "Sec-WebSocket-Version": "13",
                                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
            assert r.status == 429
            body = await r.json(content_type=None)
            assert body["type"].endswith("connections-exceeded") and body["meter"] == "realtime"
        # Frames pass untouched both ways (not read in socket mode).
        await a.send_str("hello")
        assert (await a.receive_str(timeout=2)) == "hello"
        await a.close()
        await settle()
        c = await s.ws_connect(gw.make_url("/realtime"), headers=h)
        assert await live_slots(store, "shop") == {"rt:": 2}
        for ws in (b, c):
            await ws.close()
    await settle()
    assert await live_slots(store, "shop") == {}


async def test_killed_instance_slots_return_within_the_lease(tmp_path, make_gateway, connect,
                                                             upstream, store, valkey_url):
    """A real `quotagate serve` holding watches is killed with SIGKILL: its slots come back
    within one lease; while it lived, its renewals kept them past the lease."""
    today = dt.date.today()
    envs = {"shop": {"plan": "standard", "anchor": (today - dt.timedelta(days=40)).isoformat(),
                     "expires": (today + dt.timedelta(days=400)).isoformat(),
                     "limits": {"realtime": 3}}}
    leases = {"ttl_ms": 1000, "renew_interval_ms": 250}
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    port, admin = free_ports(2)
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "store": {"url": valkey_url}, "plans_file": str(PLANS), "leases": leases,
        "routes": routes}))
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as s:
            doomed = Watcher(await s.ws_connect(f"http://127.0.0.1:{port}/realtime?event_ms=50",
                                                headers={"X-CloudBase-Env": "shop"}))
            for wid in ("a", "b", "c"):
                await doomed.send("INIT_WATCH", wid, wid, collName="c")
                assert (await doomed.wait_for(answered(wid)))["msgType"] == "INIT_EVENT"
            await asyncio.sleep(1.5)  # past the lease: renewals hold them
            gw = await make_gateway(envs, routes=routes, clock=StoreClock(), leases=leases)
            w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
            await w.send("INIT_WATCH", "x0", "x0", collName="c")
            assert (await w.wait_for(answered("x0")))["msgData"]["code"] == \
                "REALTIME_CONNECTION_LIMIT_EXCEEDED"
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            for i in range(1, 100):
                await w.send("INIT_WATCH", f"x{i}", f"x{i}", collName="c")
                if (await w.wait_for(answered(f"x{i}")))["msgType"] == "INIT_EVENT":
                    break
                await asyncio.sleep(0.05)
            back_after = time.monotonic() - killed
            assert back_after <= 1.0 + 0.3, back_after  # one lease (+ polling)
            assert await live_slots(store, "shop") == {"rt:": 1}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_sockets_are_not_limited_by_the_keepalive_pool(make_gateway, connect, upstream):
    """Each WebSocket holds its upstream connection for life: more sockets than the HTTP pool
    size must all work (they have their own unpooled connector)."""
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env()}, routes=routes, upstream={"pool_size": 2})
    sockets = [await connect(gw, headers={"X-CloudBase-Env": "shop"}) for _ in range(5)]
    for i, w in enumerate(sockets):
        await w.send("PING", request_id=f"p{i}")
    for i, w in enumerate(sockets):
        assert (await w.wait_for(lambda f, i=i: f.get("requestId") == f"p{i}"))["msgType"] \
            == "PONG"
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 200


async def test_isolation_closes_socket_unit_sockets_too(make_gateway, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}", realtime_unit="socket")
    clock = at("2026-11-30T23:59:00")
    gw = await make_gateway({"shop": env(expires="2026-12-01")}, routes=routes, clock=clock)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(gw.make_url("/realtime"), headers={"X-CloudBase-Env": "shop"})
        assert await live_slots(store, "shop") == {"rt:": 1}
        clock.set(local("2026-12-01T00:00:00"))
        assert await gw.app[STATE].limiter.renew() == {"shop": 3}
        msg = await ws.receive(timeout=3)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 3050
    await settle()
    assert await live_slots(store, "shop") == {}


async def test_store_losing_its_data_does_not_close_sockets(make_gateway, connect, upstream,
                                                             store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env()}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await w.send("INIT_WATCH", "a", "a", collName="c")
    assert (await w.wait_for(answered("a")))["msgType"] == "INIT_EVENT"
    await store.flushall()  # a restart without persistence
    limiter = gw.app[STATE].limiter
    assert await limiter.renew() == {"shop": 7}  # no snapshot: the file is written again
    for _ in range(50):
        if await store.exists("qg:{shop}:ent"):
            break
        await asyncio.sleep(0.1)
    assert await limiter.renew() == {"shop": 0}
    assert await live_slots(store, "shop") == {"rt:": 1}  # restored by the renewal
    await w.send("PING", request_id="still")
    assert (await w.wait_for(lambda f: f.get("requestId") == "still"))["msgType"] == "PONG"
    assert not w.ws.closed


async def test_shadow_mode_never_closes_sockets(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    clock = at("2026-11-30T23:59:00")
    gw = await make_gateway({"shop": env(expires="2026-12-01")}, routes=routes, clock=clock,
                            enforcement="shadow")
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await w.send("INIT_WATCH", "a", "a", collName="c")
    assert (await w.wait_for(answered("a")))["msgType"] == "INIT_EVENT"
    clock.set(local("2026-12-01T00:00:00"))
    assert await gw.app[STATE].limiter.renew() == {"shop": 3}
    await w.send("INIT_WATCH", "b", "b", collName="c")  # isolated, but shadow: passes
    assert (await w.wait_for(answered("b")))["msgType"] == "INIT_EVENT"
    assert not w.ws.closed


async def test_frames_only_lenient_parsers_read_are_still_counted(make_gateway, connect,
                                                                  upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env(limits={"realtime": 1})}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    # A lone surrogate and 1e400: msgspec refuses them, the upstream's parser does not.
    for wid in ("s1", "s2"):
        head = f'{{"watchId": "{wid}", "requestId": "{wid}", "msgType": "INIT_WATCH", '
        await w.ws.send_str(head + '"msgData": {"collName": "c\\ud800", "n": 1e400}}')
    assert (await w.wait_for(answered("s1")))["msgType"] == "INIT_EVENT"
    assert (await w.wait_for(answered("s2")))["msgData"]["code"] == \
        "REALTIME_CONNECTION_LIMIT_EXCEEDED"
    # Nested too deep to inspect: a watch frame like that is refused, not forwarded.
    deep = '{"watchId": "d", "msgType": "INIT_WATCH", "msgData": ' + "[" * 5000 + "]" * 5000 + "}"
    await w.ws.send_str(deep)
    await w.send("PING", request_id="p")
    await w.wait_for(lambda f: f.get("requestId") == "p")
    assert any(f.get("msgType") == "ERROR" and f["msgData"]["code"] == "INVALID_FRAME"
               for f in w.frames)
    assert (await stub_stats(upstream))["inits"] == 1
    assert await live_slots(store, "shop") == {"rt:": 1}


async def test_any_upstream_error_for_a_watch_frees_it(make_gateway, connect, upstream, store):
    """The SDK drops a watch on a server ERROR for its watchId without sending CLOSE_WATCH:
    the gateway frees its slot then, or the app is refused under its cap."""
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env(limits={"realtime": 2})}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await w.send("INIT_WATCH", "a", "a", collName="c")
    assert (await w.wait_for(answered("a")))["msgType"] == "INIT_EVENT"
    await settle()
    assert await live_slots(store, "shop") == {"rt:": 1}
    # A later ERROR naming the open watch (the stub refuses a rebuild into "fail").
    await w.send("REBUILD_WATCH", "a", "ra", collName="fail")
    assert (await w.wait_for(lambda f: f.get("requestId") == "ra"))["msgType"] == "ERROR"
    await settle()
    assert await live_slots(store, "shop") == {}
    # ...and ended upstream too: no watch goes on there uncounted (a client could otherwise
    # free its slots with failing rebuilds and keep every watch open).
    assert (await stub_stats(upstream))["open_watches"] == 0
    await w.send("CLOSE_WATCH", "a", "ca")  # a client that closes it anyway: not twice
    await w.send("INIT_WATCH", "f", "rf", collName="fail")  # refused by the upstream at once
    assert (await w.wait_for(lambda f: f.get("requestId") == "rf"))["msgType"] == "ERROR"
    await settle()
    assert await live_slots(store, "shop") == {}
    for wid in ("b", "c"):  # the whole cap is there again
        await w.send("INIT_WATCH", wid, wid, collName="c")
        assert (await w.wait_for(answered(wid)))["msgType"] == "INIT_EVENT"
    await settle()
    assert await live_slots(store, "shop") == {"rt:": 2}
    for i in range(5):  # the trick, repeated: never more open upstream than counted
        await w.send("REBUILD_WATCH", "b", f"rb{i}", collName="fail")
        await w.wait_for(lambda f, i=i: f.get("requestId") == f"rb{i}")
        await w.send("INIT_WATCH", "b", f"ib{i}", collName="c")
        await w.wait_for(lambda f, i=i: f.get("requestId") == f"ib{i}")
    await settle()
    assert (await stub_stats(upstream))["open_watches"] <= 2
    assert await live_slots(store, "shop") == {"rt:": 2}


def test_close_codes_never_put_on_the_wire():
    from quotagate.gateway.realtime.frames import wire_close_code

    assert wire_close_code(3001, lost=1011) == 3001
    assert wire_close_code(0, lost=1011) == 1000  # a close frame without a code (aiohttp: 0)
    assert wire_close_code(1005, lost=1011) == 1000
    for gone in (None, 1006, 1015):
        assert wire_close_code(gone, lost=1011) == 1011
        assert wire_close_code(gone, lost=1001) == 1001

async def test_close_codes_as_the_sdk_reads_them(make_gateway, connect, upstream, store):
    """The client's code is echoed to it and sent on (the SDK closes with 3001 and reconnects
    on 1000); an upstream lost without a close frame is 1011, never 1006 on the wire."""
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env()}, routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await w.send("INIT_WATCH", "a", "a", collName="c")
    assert (await w.wait_for(answered("a")))["msgType"] == "INIT_EVENT"
    await w.ws.close(code=3001, message=b"no more watches")
    assert w.ws.close_code == 3001
    await settle()
    assert (await stub_stats(upstream))["close_codes"][-1] == 3001
    assert await live_slots(store, "shop") == {}

    cut = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    await cut.send("INIT_WATCH", "b", "b", collName="c")
    assert (await cut.wait_for(answered("b")))["msgType"] == "INIT_EVENT"
    await cut.ws.send_json({"msgType": "PING", "requestId": "x", "msgData": {"cut": True}})
    await cut._reader
    assert cut.ws.close_code == 1011
    await settle()
    assert await live_slots(store, "shop") == {}


async def test_every_frame_that_could_open_a_watch_is_counted_or_refused(
        make_gateway, connect, upstream, store):
    """Binary frames are read like text (a Node upstream JSON.parses both), msgType is compared
    after JSON decoding (escapes), and a frame that cannot be fully read never goes on."""
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}")
    gw = await make_gateway({"shop": env(limits={"realtime": 2}), "other": env()},
                            routes=routes)
    w = await connect(gw, headers={"X-CloudBase-Env": "shop"})
    # Escaped msgType: counted like any INIT_WATCH.
    await w.ws.send_str('{"watchId": "e", "requestId": "re", "msgType": "INIT_\\u0057ATCH", '
                        '"msgData": {"collName": "c"}}')
    assert (await w.wait_for(answered("e")))["msgType"] == "INIT_EVENT"
    # Binary INIT_WATCH frames: counted, and refused at the cap like text ones.
    for wid in ("b1", "b2"):
        await w.ws.send_bytes(json.dumps({"watchId": wid, "requestId": wid,
                                          "msgType": "INIT_WATCH",
                                          "msgData": {"collName": "c"}}).encode())
    refused = await w.wait_for(lambda f: f.get("watchId") in ("b1", "b2")
                               and f.get("msgType") == "ERROR")
    assert refused["msgData"]["code"] == "REALTIME_CONNECTION_LIMIT_EXCEEDED"
    await settle()
    assert await live_slots(store, "shop") == {"rt:": 2}
    # Too deep to read: never forwarded, whatever it says.
    inits = (await stub_stats(upstream))["inits"]
    deep = ('{"watchId": "d", "msgType": "INIT_\\u0057ATCH", "msgData": ' + "[" * 3000
            + "]" * 3000 + "}")
    for send in (w.ws.send_str, lambda t: w.ws.send_bytes(t.encode())):
        await send(deep)
    await w.send("PING", request_id="p")
    await w.wait_for(lambda f: f.get("requestId") == "p")
    assert sum(f["msgData"]["code"] == "INVALID_FRAME" for f in w.frames
               if f.get("msgType") == "ERROR") == 2
    assert (await stub_stats(upstream))["inits"] == inits
    # A held watch re-sent as another environment's: refused, not waved through as a rebuild.
    await w.send("REBUILD_WATCH", "e", "x", envId="other", collName="c")
    assert (await w.wait_for(lambda f: f.get("requestId") == "x"))["msgData"]["code"] == \
        "ENVIRONMENT_MISMATCH"


async def test_nothing_goes_upstream_before_login(make_gateway, connect, upstream, store):
    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}", login_timeout_ms=500)
    gw = await make_gateway({"shop": env()}, routes=routes)
    sockets = (await stub_stats(upstream))["sockets"]
    idle = [await connect(gw) for _ in range(20)]  # never name an environment
    quiet = await connect(gw)
    await quiet.send("PING", request_id="p")  # answered by the gateway
    assert (await quiet.wait_for(lambda f: f.get("requestId") == "p"))["msgType"] == "PONG"
    await quiet.send("CHECK_LAST", "w", "c")
    assert (await quiet.wait_for(lambda f: f.get("requestId") == "c"))["msgData"]["code"] == \
        "ENVIRONMENT_REQUIRED"
    await quiet.ws.send_str('{"something": "else"}')
    assert (await stub_stats(upstream))["sockets"] == sockets  # no upstream socket at all
    for w in [*idle, quiet]:  # closed at the deadline
        await asyncio.wait_for(w._reader, 5)
        assert w.ws.close_code == 1008
    assert (await stub_stats(upstream))["sockets"] == sockets
    # A LOGIN in time opens the upstream socket, then the watch protocol as usual.
    w = await connect(gw)
    assert (await login(w))["msgType"] == "LOGIN_RES"
    await w.send("INIT_WATCH", "a", "ra", collName="c")
    assert (await w.wait_for(answered("a")))["msgType"] == "INIT_EVENT"
    await asyncio.sleep(0.7)  # past the deadline: a socket that logged in stays
    assert not w.ws.closed


async def test_unnamed_sockets_on_shutdown_and_a_login_whose_upstream_fails(
        make_gateway, connect, upstream):

    routes = realtime_routes(f"http://127.0.0.1:{upstream.port}", login_timeout_ms=20_000)
    gw = await make_gateway({"shop": env()}, routes=routes)
    idle = await connect(gw)  # never logs in
    started = time.monotonic()
    await gw.close()  # a stopping gateway tells it to go away, without waiting the deadline
    await asyncio.wait_for(idle._reader, 5)
    assert idle.ws.close_code == 1001 and time.monotonic() - started < 5

    dead = realtime_routes(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    gw = await make_gateway({"shop": env()}, routes=dead)
    w = await connect(gw)
    await w.send("LOGIN", request_id="l", envId="shop")
    assert (await w.wait_for(lambda f: f.get("requestId") == "l"))["msgData"]["code"] == \
        "UPSTREAM_UNAVAILABLE"
    await asyncio.wait_for(w._reader, 5)
    assert w.ws.close_code == 1011
