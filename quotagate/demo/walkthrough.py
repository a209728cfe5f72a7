"""``quotagate demo``: embedded Valkey, the demo upstream and the gateway, with a walk-through
that sends real requests and prints what came back."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import tempfile
import zoneinfo
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from quotagate.demo.staging import find_config_dir, shipped_gateway, shipped_routes, wait_ready
from quotagate.demo.upstream import make_upstream_app
from quotagate.gateway.server import StartError, run_gateway
from quotagate.limiter.embedded import EmbeddedValkey
from quotagate.settings import load_config

#: The demo's access log: out of the walk-through (a newcomer reads the story), named at the
#: end, kept after the demo (its own temporary directory is not).
ACCESS_LOG = Path(tempfile.gettempdir()) / "quotagate-demo-access.log"


def write_demo_config(directory: Path, port: int, admin_port: int, upstream_port: int,
                      today: dt.date, access_log: Path = ACCESS_LOG) -> Path:
    shipped = shipped_gateway()
    gateway = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "access_log_file": str(access_log),
        "store": {"url": "", "data_dir": str(directory / "valkey")},
        "on_store_failure": "open",
        "timezone": "Asia/Shanghai",
        "plans_file": str(find_config_dir() / "plans.yaml"),
        "environments_file": "environments.yaml",
        # As shipped: the SDKs' domains and paths (the demo runs what config/ ships).
        "domains": shipped["domains"],
        "routes": shipped_routes(f"http://127.0.0.1:{upstream_port}"),
    }
    anchor = today.replace(day=1)
    environments = {"environments": {
        # A standard plan with a tiny quota override, hard stop: shows the 429 at the end.
        "demo-shop": {"plan": "standard", "anchor": anchor.isoformat(),
                      "expires": anchor.replace(year=anchor.year + 1).isoformat(),
                      "limits": {"calls": 60}},
        # A free plan at 5 QPS: shows the rate limit.
        "demo-free": {"plan": "free", "anchor": anchor.isoformat(),
                      "expires": anchor.replace(year=anchor.year + 1).isoformat(),
                      "limits": {"qps": 5}},
        # Overage on: keeps working past its quota, billed next day.
        "demo-payg": {"plan": "personal", "anchor": anchor.isoformat(),
                      "expires": anchor.replace(year=anchor.year + 1).isoformat(),
                      "overage": True, "limits": {"calls": 3}},
        # Personal plan: 10 realtime watches; 2 concurrent invocations per function.
        "demo-live": {"plan": "personal", "anchor": anchor.isoformat(),
                      "expires": anchor.replace(year=anchor.year + 1).isoformat(),
                      "limits": {"function_concurrency": 2}},
    }}
    (directory / "gateway.yaml").write_text(yaml.safe_dump(gateway, sort_keys=False))
    (directory / "environments.yaml").write_text(yaml.safe_dump(environments, sort_keys=False))
    return directory / "gateway.yaml"


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _show(session: aiohttp.ClientSession, title: str, method: str, url: str,
                env: str | None, **kw: object) -> aiohttp.ClientResponse:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
    if env is not None:
        headers["X-CloudBase-Env"] = env
    _say(f"\n── {title}")
    host = headers.get("Host")
    _say(f"   {method} {url}" + (f"   (X-CloudBase-Env: {env})" if env else "")
         + (f"   (Host: {host})" if host else ""))
    if "json" in kw:
        _say(f"   {json.dumps(kw['json'])}")
    async with session.request(method, url, headers=headers, **kw) as resp:  # type: ignore[arg-type]
        body = await resp.text()
        _say(f"   → {resp.status} {resp.reason}")
        for name in ("RateLimit-Policy", "RateLimit", "Retry-After"):
            if name in resp.headers:
                _say(f"     {name}: {resp.headers[name]}")
        if resp.content_type == "application/problem+json":
            problem = json.loads(body)
            _say(f"     {problem['type']}: {problem['detail']}")
        elif resp.content_type == "text/event-stream":
            events = [line for line in body.splitlines() if line.startswith("data:")]
            _say(f"     {len(events)} server-sent events streamed, last: {events[-1]}")
        else:
            _say(f"     {body[:120]}")
        return resp


async def walkthrough(base: str) -> dict[str, int]:
    """Send the demo's requests; returns the status of each step (the test checks them)."""
    seen: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        r = await _show(s, "1. A function call passes and costs 1 call (js-sdk callFunction: "
                        "the environment is the host's first label)", "POST",
                        f"{base}/v1/functions/hello", None,
                        headers={"Host": "demo-shop.api.tcloudbasegateway.com"},
                        json={"a": 1})
        seen["pass"] = r.status
        r = await _show(s, "1b. node-sdk's callFunction: the operation is in the body, counted "
                        "as an invocation of its function", "POST",
                        f"{base}/admin?env=demo-shop", None,
                        json={"action": "functions.invokeFunction", "function_name": "hello",
                              "request_data": "{}", "envName": "demo-shop"})
        seen["action"] = r.status
        r = await _show(s, "2. An AI chat over SSE streams through and costs 50 calls", "POST",
                        f"{base}/ai/chat", "demo-shop", headers={"Accept": "text/event-stream"})
        seen["sse"] = r.status
        _say("\n── 3. demo-shop has 60 calls this cycle (hard stop): spend the rest")
        statuses = []
        for _ in range(12):
            async with s.get(f"{base}/functions/hello",
                             headers={"X-CloudBase-Env": "demo-shop"}) as resp:
                statuses.append(resp.status)
        _say(f"   12 more calls → {statuses.count(200)} passed, {statuses.count(429)} refused")
        r = await _show(s, "4. The quota is used: refused until the cycle resets", "GET",
                        f"{base}/functions/hello", "demo-shop")
        seen["quota"] = r.status
        _say("\n── 5. demo-free allows 5 requests/s: 20 at once")
        async def one() -> int:
            async with s.get(f"{base}/functions/hello",
                             headers={"X-CloudBase-Env": "demo-free"}) as resp:
                return resp.status
        burst = await asyncio.gather(*(one() for _ in range(20)))
        _say(f"   → {burst.count(200)} passed, {burst.count(429)} refused with qps-exceeded")
        seen["qps_refused"] = burst.count(429)
        _say("\n── 6. demo-payg has overage on: past its 3 calls it keeps working")
        payg = []
        for _ in range(6):
            async with s.get(f"{base}/functions/hello",
                             headers={"X-CloudBase-Env": "demo-payg"}) as resp:
                payg.append(resp.status)
        _say(f"   6 calls → {payg.count(200)} passed (3 billed as pay-as-you-go tomorrow)")
        seen["payg_passed"] = payg.count(200)
        r = await _show(s, "7. An invalid environment id is refused before any store call",
                        "GET", f"{base}/functions/hello", "Bad_Env!")
        seen["invalid"] = r.status
        r = await _show(s, "8. An unknown environment", "GET", f"{base}/functions/hello",
                        "no-such-env")
        seen["unknown"] = r.status
        seen.update(await _realtime_steps(s, base))
    return seen


async def _realtime_steps(s: aiohttp.ClientSession, base: str) -> dict[str, int]:
    seen: dict[str, int] = {}
    _say("\n── 9. demo-live (personal: 10 realtime watches) opens 12 watches on one WebSocket")
    ws = await s.ws_connect(f"{base}/?event_ms=200")  # realtime at /, as the SDKs
    await ws.send_json({"requestId": "l", "msgType": "LOGIN",
                        "msgData": {"envId": "demo-live", "accessToken": "demo"}})
    for i in range(12):
        await ws.send_json({"watchId": f"w{i}", "requestId": f"r{i}", "msgType": "INIT_WATCH",
                            "msgData": {"collName": "todos", "query": "{}"}})
    answers: dict[str, dict] = {}
    while len(answers) < 12:
        frame = await ws.receive_json(timeout=5)
        if frame.get("msgType") in ("INIT_EVENT", "ERROR") and frame.get("watchId"):
            answers.setdefault(frame["watchId"], frame)
    opened = sum(f["msgType"] == "INIT_EVENT" for f in answers.values())
    refused = [f for f in answers.values() if f["msgType"] == "ERROR"]
    _say(f"   → {opened} INIT_EVENT, {len(refused)} ERROR "
         f"{refused[0]['msgData']['code'] if refused else ''} (answered by the gateway, not "
         "forwarded; the socket and its other watches stay up)")
    seen["watches_open"], seen["watches_refused"] = opened, len(refused)
    await ws.send_json({"watchId": "w0", "requestId": "c0", "msgType": "CLOSE_WATCH"})
    await asyncio.sleep(0.1)
    await ws.send_json({"watchId": "w12", "requestId": "r12", "msgType": "INIT_WATCH",
                        "msgData": {"collName": "todos"}})
    while True:
        frame = await ws.receive_json(timeout=5)
        if frame.get("watchId") == "w12" and frame.get("msgType") in ("INIT_EVENT", "ERROR"):
            break
    _say(f"   CLOSE_WATCH w0, then INIT_WATCH w12 → {frame['msgType']}")
    seen["after_close"] = 1 if frame["msgType"] == "INIT_EVENT" else 0
    await ws.close()

    _say("\n── 10. demo-live runs at most 2 invocations of a function at once: 4 slow calls")
    async def slow() -> int:
        async with s.get(f"{base}/functions/report/slow?ms=300",
                         headers={"X-CloudBase-Env": "demo-live"}) as resp:
            return resp.status
    calls = await asyncio.gather(*(slow() for _ in range(4)))
    _say(f"   → {calls.count(200)} passed, {calls.count(429)} refused with "
         "concurrency-exceeded (slots are leased: a crashed gateway's come back by themselves)")
    seen["fn_refused"] = calls.count(429)
    return seen


def check_ports_free(ports: dict[str, int]) -> None:
    """Each port can be listened on (as aiohttp will: SO_REUSEADDR), else one StartError
    naming the option, before anything is started."""
    for option, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                raise StartError(f"port {port} ({option}) cannot be used: "
                                 f"{exc.strerror or exc}; choose another with {option}"
                                 ) from None


async def run_demo(port: int, admin_port: int, upstream_port: int, once: bool) -> dict[str, int]:
    check_ports_free({"--port": port, "--admin-port": admin_port,
                      "--upstream-port": upstream_port})
    tz = zoneinfo.ZoneInfo("Asia/Shanghai")
    with tempfile.TemporaryDirectory(prefix="quotagate-demo-") as tmp:
        directory = Path(tmp)
        ACCESS_LOG.unlink(missing_ok=True)  # this run's requests only
        config_path = write_demo_config(directory, port, admin_port, upstream_port,
                                        dt.datetime.now(tz).date())
        config = load_config(config_path)
        valkey = EmbeddedValkey(directory / "valkey").start()
        upstream = web.AppRunner(make_upstream_app(), access_log=None)
        stop = asyncio.Event()
        gateway: asyncio.Task[None] | None = None
        base = f"http://127.0.0.1:{port}"
        try:
            await upstream.setup()
            try:
                await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
            except OSError as exc:  # taken since the check
                raise StartError(f"port {upstream_port} (--upstream-port) cannot be used: "
                                 f"{exc.strerror or exc}") from None
            gateway = asyncio.create_task(run_gateway(config, valkey.url, stop=stop))

            def alive() -> None:
                if gateway is not None and gateway.done():  # it could not start: its
                    gateway.result()                      # StartError, raised here
                    raise StartError("the gateway stopped before it was ready")

            await wait_ready(admin_port, alive=alive, timeout=30)
            _say(f"quotagate demo: embedded Valkey {valkey.url}, upstream :{upstream_port}, "
                 f"gateway {base}, admin http://127.0.0.1:{admin_port}")
            seen = await walkthrough(base)
            _say(f"\nMetrics: curl -s http://127.0.0.1:{admin_port}/metrics | grep quotagate_")
            _say(f"Access log (one JSON line per request above): {ACCESS_LOG}")
            if not once:
                _say(f"\nThe gateway keeps running. Try:\n"
                     f"  curl -i -H 'X-CloudBase-Env: demo-free' {base}/functions/hello\n"
                     "Ctrl-C stops it.")
                await gateway  # until Ctrl-C (the gateway's signal handler sets stop)
            return seen
        finally:
            stop.set()
            if gateway is not None and not gateway.done():
                await gateway
            await upstream.cleanup()
            valkey.stop()
