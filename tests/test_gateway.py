"""The gateway over real sockets: a real upstream, a real Valkey, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest
import redis.asyncio as aredis
from aiohttp.test_utils import TestClient, TestServer

from quotagate.control.admin import init_admin_app
from quotagate.gateway.app import STATE
from quotagate.limiter.embedded import free_port
from tests.helpers import env, script_calls


async def script_calls_of(url: str) -> int:
    client = aredis.Redis.from_url(url)
    try:
        return script_calls(await client.info("commandstats"))
    finally:
        await client.aclose()


H = {"X-CloudBase-Env": "shop"}


async def test_proxies_with_ratelimit_headers(make_gateway):
    gw = await make_gateway({"shop": env()})
    resp = await gw.get("/functions/hello?x=1", headers=H)
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    assert resp.headers["RateLimit-Policy"] == '"qps";q=500;w=1, "calls";q=8000000;w=2592000'
    assert re.fullmatch(r'"qps";r=\d+;t=\d+, "calls";r=7999999;t=388800',
                        resp.headers["RateLimit"])
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])


async def test_request_headers_forwarded_hop_by_hop_removed(make_gateway):
    gw = await make_gateway({"shop": env()})
    resp = await gw.post(
        "/functions/a%2Fb/echo?a=1&b=%26c", data=b"hello",
        headers={**H, "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                 "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic x",
                 "X-App": "kept", "X-Request-Id": "req-123"},
    )
    seen = await resp.json()
    forwarded = {k.lower(): v for k, v in seen["headers"].items()}
    for hop in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in forwarded
    assert forwarded["x-app"] == "kept"
    assert forwarded["x-cloudbase-env"] == "shop"
    assert forwarded["x-request-id"] == "req-123"
    assert forwarded["x-forwarded-for"] == "127.0.0.1"
    assert forwarded["via"] == "1.1 quotagate" and resp.headers["Via"] == "1.1 quotagate"
    assert seen["path"] == "/functions/a%2Fb/echo?a=1&b=%26c"
    assert seen["body"] == "hello"
    assert resp.headers["X-Request-Id"] == "req-123"


async def test_large_bodies_stream_both_ways(make_gateway):
    gw = await make_gateway({"shop": env()})
    size = 8 * 1024 * 1024

    async def chunks():
        for _ in range(size // 65536):
            yield b"y" * 65536

    resp = await gw.post("/storage/upload", data=chunks(), headers=H)
    assert (await resp.json()) == {"received": size}
    resp = await gw.get(f"/storage/bytes?n={size}", headers=H)
    assert resp.headers["Content-Length"] == str(size)
    assert len(await resp.read()) == size


async def test_sse_streams_event_by_event(make_gateway):
    gw = await make_gateway({"shop": env()})
    started = time.monotonic()
    resp = await gw.post("/ai/chat?events=3&delay_ms=600", headers={
        **H, "Accept": "text/event-stream"})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    first = await resp.content.readline()
    first_at = time.monotonic() - started
    rest = await resp.read()
    total = time.monotonic() - started
    assert first.startswith(b"data: ")
    # The first event came through while the upstream was still producing the others.
    assert first_at < total - 0.9
    assert rest.count(b"data: ") == 3
    # The SSE route costs 50 calls, the plain AI route 1.
    plain = await gw.get("/ai/models", headers=H)
    assert '"calls";r=7999949' in plain.headers["RateLimit"]


async def test_quota_refusal_is_problem_json(make_gateway):
    gw = await make_gateway({"shop": env(limits={"calls": 1})})
    assert (await gw.get("/functions/a", headers=H)).status == 200
    resp = await gw.get("/functions/a", headers=H)
    assert resp.status == 429
    assert resp.content_type == "application/problem+json"
    body = json.loads(await resp.text())
    assert body["type"].endswith("/quota-exceeded")
    assert body["status"] == 429 and body["env"] == "shop" and body["meter"] == "calls"
    assert body["violated-policies"] == ["calls"] and body["title"] and body["detail"]
    assert resp.headers["Retry-After"] == str(388800)  # until 12-01 00:00 +08:00
    assert '"calls";r=0;t=388800' in resp.headers["RateLimit"]


async def test_qps_refusal(make_gateway):
    gw = await make_gateway({"shop": env(limits={"qps": 2})}, qps_burst_ms=0)
    statuses = [(await gw.get("/functions/a", headers=H)) for _ in range(4)]
    # 2 QPS, no burst: one request per 500 ms; the three that follow at once are refused.
    assert [r.status for r in statuses] == [200, 429, 429, 429]
    refused = statuses[1:]
    body = json.loads(await refused[0].text())
    assert body["type"].endswith("/qps-exceeded") and body["meter"] == "qps"
    assert int(refused[0].headers["Retry-After"]) >= 1


async def test_isolated_and_unknown(make_gateway):
    gw = await make_gateway({"shop": env(expires="2026-11-20")})
    resp = await gw.get("/functions/a", headers=H)
    assert resp.status == 403
    assert json.loads(await resp.text())["type"].endswith("/environment-isolated")
    resp = await gw.get("/functions/a", headers={"X-CloudBase-Env": "ghost"})
    assert resp.status == 404
    assert json.loads(await resp.text())["type"].endswith("/environment-not-found")


HOSTILE = ["", "UPPER", "-lead", "a" * 64, "a b", "a.b", "../etc", "a_b", "shop}", "{shop}",
           "shop:x", "é", "*"]


async def test_hostile_environment_ids_never_reach_the_store(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)  # scripts loaded, sync done
    before = await script_calls_of(valkey_url)
    for value in HOSTILE:
        resp = await gw.get("/functions/a", headers={"X-CloudBase-Env": value})
        assert resp.status == 400, value
        assert json.loads(await resp.text())["type"].endswith("/invalid-environment")
    resp = await gw.get("/functions/a", headers=[("X-CloudBase-Env", "shop"),
                                                ("X-CloudBase-Env", "other")])
    assert resp.status == 400
    assert (await gw.get("/functions/a")).status == 400  # no id at all
    assert await script_calls_of(valkey_url) == before


@pytest.mark.parametrize("raw", [b"shop\x00", b"sh\xffop", b"shop\x1b[31m", b"a" * 9000])
async def test_raw_hostile_header_bytes(make_gateway, valkey_url, raw):
    """Bytes a normal client would not send: refused with a 4xx, nothing reaches the store."""
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)
    before = await script_calls_of(valkey_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /functions/a HTTP/1.1\r\nHost: x\r\nX-CloudBase-Env: " + raw +
                 b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1].startswith(b"4"), status_line
    assert await script_calls_of(valkey_url) == before


async def test_environment_from_host(make_gateway):
    gw = await make_gateway({"shop": env()}, domain="app.test")
    resp = await gw.get("/functions/echo", headers={"Host": "shop.app.test"})
    assert resp.status == 200
    assert (await resp.json())["headers"]["X-CloudBase-Env"] == "shop"
    resp = await gw.get("/functions/echo", headers={"Host": "Bad_Label.app.test:8080"})
    assert resp.status == 400


async def test_route_not_found_and_method_filter(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)
    before = await script_calls_of(valkey_url)
    resp = await gw.get("/nowhere", headers=H)
    assert resp.status == 404
    assert json.loads(await resp.text())["type"].endswith("/route-not-found")
    assert (await gw.get("/admin-only/x", headers=H)).status == 404
    assert await script_calls_of(valkey_url) == before
    assert (await gw.post("/admin-only/x", headers=H)).status == 200


async def test_upstream_down_is_502_and_slow_is_504(make_gateway):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway({"shop": env()}, routes=[
        {"prefix": "/dead/", "upstream": dead, "kind": "function"}])
    resp = await gw.get("/dead/x", headers=H)
    assert resp.status == 502
    assert json.loads(await resp.text())["type"].endswith("/upstream-unavailable")


async def test_slow_upstream_is_504(make_gateway, upstream):
    gw = await make_gateway({"shop": env()}, upstream={"read_timeout_ms": 200})
    resp = await gw.get("/functions/slow?ms=2000", headers=H)
    assert resp.status == 504
    assert json.loads(await resp.text())["type"].endswith("/upstream-timeout")


async def test_exact_quota_through_several_gateways(make_gateway):
    quota, extra = 150, 90
    envs = {"shop": env(limits={"calls": quota, "qps": 1_000_000})}
    gateways = [await make_gateway(envs) for _ in range(3)]

    async def call(i: int) -> int:
        resp = await gateways[i % 3].get("/functions/a", headers=H)
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(call(i) for i in range(quota + extra)))
    assert statuses.count(200) == quota and statuses.count(429) == extra


async def test_fail_closed_and_fail_open(make_gateway):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    closed = await make_gateway({"shop": env()}, store_url=dead, on_store_failure="closed",
                                store={"timeout_ms": 100})
    started = time.monotonic()
    resp = await closed.get("/functions/a", headers=H)
    assert resp.status == 503 and time.monotonic() - started < 1.0
    assert json.loads(await resp.text())["type"].endswith("/store-unavailable")
    opened = await make_gateway({"shop": env()}, store_url=dead, on_store_failure="open",
                                store={"timeout_ms": 100})
    resp = await opened.get("/functions/a", headers=H)
    assert resp.status == 200 and resp.headers["X-Quotagate-Bypass"] == "store-unavailable"
    assert "RateLimit" not in resp.headers


async def test_enforcement_off_makes_no_store_call(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env(limits={"calls": 0})}, enforcement="off")
    before = await script_calls_of(valkey_url)
    for _ in range(5):
        assert (await gw.get("/functions/a", headers=H)).status == 200
    assert await script_calls_of(valkey_url) == before
    per_env = await make_gateway({"shop": env(limits={"calls": 0}, mode="off")})
    before = await script_calls_of(valkey_url)  # (its start wrote the changed snapshot)
    assert (await per_env.get("/functions/a", headers=H)).status == 200
    assert await script_calls_of(valkey_url) == before


async def test_shadow_mode_passes_and_marks(make_gateway):
    gw = await make_gateway({"shop": env(limits={"calls": 0})}, enforcement="shadow")
    resp = await gw.get("/functions/a", headers=H)
    assert resp.status == 200 and resp.headers["X-Quotagate-Shadow"] == "would-refuse"


async def test_admin_health_ready_metrics(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)
    admin = TestClient(TestServer(init_admin_app(gw.app[STATE].runtime)))
    await admin.start_server()
    try:
        assert (await admin.get("/healthz")).status == 200
        ready = await admin.get("/readyz")
        assert ready.status == 200, await ready.text()
        text = await (await admin.get("/metrics")).text()
        assert 'quotagate_decisions_total{reason="",result="admitted"}' in text
        # The admin app is not on the public port.
        assert (await gw.get("/metrics", headers=H)).status == 404
    finally:
        await admin.close()
    dead = await make_gateway({"shop": env()}, store_url=f"redis://127.0.0.1:{free_port()}/0",
                              store={"timeout_ms": 100})
    admin = TestClient(TestServer(init_admin_app(dead.app[STATE].runtime)))
    await admin.start_server()
    try:
        resp = await admin.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"]["store"].startswith("unreachable")
    finally:
        await admin.close()


async def test_client_disconnect_mid_stream_leaves_gateway_serving(make_gateway):
    gw = await make_gateway({"shop": env()})
    url = gw.make_url("/ai/chat?events=20&delay_ms=50")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url, headers={**H, "Accept": "text/event-stream"})
        await resp.content.readline()
        resp.close()  # the client goes away mid-stream
    await asyncio.sleep(0.1)
    assert (await gw.get("/functions/a", headers=H)).status == 200


async def raw_request(port: int, target: bytes, env_id: bytes = b"shop") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nX-CloudBase-Env: " + env_id +
                 b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("target", [b"/database/%2e%2e/ai/chat", b"/database/../ai/chat",
                                    b"/database/./x", b"/database/%2E%2E", b"/functions/.."])
async def test_dot_segments_are_refused_before_any_store_call(make_gateway, valkey_url, target):
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)
    before = await script_calls_of(valkey_url)
    status, body = await raw_request(gw.port, target)
    assert status == 400 and b"invalid-path" in body
    assert await script_calls_of(valkey_url) == before


async def test_dot_like_names_are_fine(make_gateway):
    gw = await make_gateway({"shop": env()})
    status, _ = await raw_request(gw.port, b"/storage/.well-known/x..y/echo")
    assert status == 200


async def test_absolute_form_target_forwards_its_path(make_gateway):
    gw = await make_gateway({"shop": env()})
    status, body = await raw_request(gw.port, b"http://elsewhere.example/functions/echo?q=1")
    assert status == 200
    assert json.loads(body)["path"] == "/functions/echo?q=1"


async def test_readyz_reloads_flushed_scripts(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    await gw.get("/functions/a", headers=H)
    client = aredis.Redis.from_url(valkey_url)
    await client.script_flush()
    await client.aclose()
    admin = TestClient(TestServer(init_admin_app(gw.app[STATE].runtime)))
    await admin.start_server()
    try:
        resp = await admin.get("/readyz")
        assert resp.status == 200, await resp.text()
    finally:
        await admin.close()


async def test_lost_store_data_is_resynced_from_the_file(make_gateway, valkey_url):
    gw = await make_gateway({"shop": env()})
    assert (await gw.get("/functions/a", headers=H)).status == 200
    client = aredis.Redis.from_url(valkey_url)
    await client.flushall()  # the store lost everything (restart without persistence)
    await client.aclose()
    assert (await gw.get("/functions/a", headers=H)).status == 404
    for _ in range(50):  # the gateway writes the file's environments again
        await asyncio.sleep(0.05)
        if gw.app[STATE].runtime.synced:
            break
    assert (await gw.get("/functions/a", headers=H)).status == 200


def test_serving_process_tunes_the_cyclic_collector() -> None:
    """run_gateway calls tune_gc once set up: startup objects frozen, collections rarer (in a
    fresh interpreter: this one's collector is the test runner's)."""
    import subprocess
    import sys

    code = ("import gc; from quotagate.gateway.server import GC_THRESHOLDS, tune_gc; "
            "before = gc.get_freeze_count(); tune_gc(); "
            "print(gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > before + 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "True"]
