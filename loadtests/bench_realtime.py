"""Realtime watches benchmark: memory per watch, lease-renewal cost, open/close rate and the
latency INIT_WATCH gains through the gateway (issue 3; see loadtests/README.md).

    .venv/bin/python loadtests/bench_realtime.py [--watches 10000] [--per-socket 100]
        [--renew-ms 1000] [--latency-samples 2000] [--runs 3]

Processes: embedded Valkey and the demo upstream (its realtime stub) on core 0, one gateway
(``loadtests/gateway_proc.py``) pinned to core 1, this client on core 0. For each run:

1. open N watches (``--per-socket`` per WebSocket) through the gateway: INIT_WATCH -> INIT_EVENT,
   all sockets at once -> watches opened per second; the gateway's RSS before and after -> bytes
   per watch (and the held slots read back from the store);
   (a fresh gateway process per run, so every run measures memory from the same start);
2. hold them for ``--hold`` renewal intervals with no other traffic: EVALSHA calls the store
   counted in that window (INFO commandstats) = lease renewals, per second and per interval —
   measured at N and at N/10 to show it is flat in N;
3. CLOSE_WATCH every watch -> closes per second until the store counts none;
4. INIT_WATCH round trips (INIT_WATCH, INIT_EVENT, CLOSE_WATCH) through the gateway and directly
   to the stub, same client, interleaved -> p50/p99 of each and the added latency.

Medians over ``--runs`` runs are reported with every run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path

import aiohttp
import redis
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.store_stats import script_calls

from quotagate.limiter import keys
from quotagate.limiter.embedded import EmbeddedValkey, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
ENV = "rt-bench"
QUIET = "event_ms=3600000"  # the stub sends no events during the measurement


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            time.sleep(1.0)  # and the environments written
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gateway on port {port} did not start")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def write_config(tmp: Path, upstream_port: int, store_url: str, renew_ms: int) -> tuple[Path, int]:
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    envs = {"environments": {ENV: {
        "plan": "enterprise", "anchor": anchor, "expires": anchor.replace(year=anchor.year + 1),
        "limits": {"qps": 10_000_000, "calls": 10**12, "realtime": 10_000_000}}}}
    (tmp / "environments.yaml").write_text(yaml.safe_dump(envs))
    port = free_port()
    gateway = {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{free_port()}",
        "store": {"url": store_url}, "plans_file": str(ROOT / "config" / "plans.yaml"),
        "environments_file": str(tmp / "environments.yaml"),
        "leases": {"ttl_ms": max(3 * renew_ms, 1000), "renew_interval_ms": renew_ms},
        "routes": [{"prefix": "/realtime", "upstream": f"http://127.0.0.1:{upstream_port}",
                    "kind": "realtime"}],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway))
    return path, port


class Client:
    """Sockets of the watch protocol; each socket's frames are matched by requestId."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url
        self.readers: set[asyncio.Task[None]] = set()

    async def socket(self) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, asyncio.Future]]:
        ws = await self.session.ws_connect(self.url, headers={"X-CloudBase-Env": ENV},
                                           max_msg_size=0)
        waiting: dict[str, asyncio.Future] = {}

        async def read() -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                    fut = waiting.pop(frame.get("requestId") or "", None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)

        task = asyncio.ensure_future(read())
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)
        return ws, waiting

    @staticmethod
    async def init(ws: aiohttp.ClientWebSocketResponse, waiting: dict[str, asyncio.Future],
                   wid: str) -> dict:
        fut = asyncio.get_running_loop().create_future()
        waiting[wid] = fut
        await ws.send_str(json.dumps({"watchId": wid, "requestId": wid, "msgType": "INIT_WATCH",
                                      "msgData": {"envId": ENV, "collName": "c", "query": "{}"}}))
        frame = await fut
        if frame["msgType"] != "INIT_EVENT":
            raise RuntimeError(f"watch {wid} refused: {frame}")
        return frame


def live_slots(r: redis.Redis) -> int:
    return int(r.hget(keys.slots(ENV), "=rt:") or 0)


async def open_watches(client: Client, n: int, per_socket: int, tag: str) -> tuple[list, float]:
    sockets = [await client.socket() for _ in range((n + per_socket - 1) // per_socket)]
    started = time.perf_counter()

    async def fill(i: int, ws, waiting) -> None:
        for j in range(min(per_socket, n - i * per_socket)):
            await Client.init(ws, waiting, f"{tag}-{i}-{j}")

    await asyncio.gather(*(fill(i, ws, w) for i, (ws, w) in enumerate(sockets)))
    return sockets, time.perf_counter() - started


async def close_watches(sockets: list, per_socket: int, n: int, tag: str) -> None:
    for i, (ws, _) in enumerate(sockets):
        for j in range(min(per_socket, n - i * per_socket)):
            wid = f"{tag}-{i}-{j}"
            await ws.send_str(json.dumps({"watchId": wid, "requestId": wid,
                                          "msgType": "CLOSE_WATCH", "msgData": {}}))


async def renewal_window(r: redis.Redis, seconds: float) -> int:
    before = script_calls(r.info("commandstats"))
    await asyncio.sleep(seconds)
    return script_calls(r.info("commandstats")) - before


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(gw_url: str, direct_url: str, samples: int, session) -> dict[str, float]:
    """Sequential INIT_WATCH round trips, alternating gateway and direct, on one socket each."""
    out: dict[str, list[float]] = {"gateway": [], "direct": []}
    socks = {}
    for name, url in (("gateway", gw_url), ("direct", direct_url)):
        socks[name] = await Client(session, url).socket()
    for i in range(samples):
        for name in ("gateway", "direct") if i % 2 else ("direct", "gateway"):
            ws, waiting = socks[name]
            wid = f"lat-{name}-{i}"
            t0 = time.perf_counter()
            await Client.init(ws, waiting, wid)
            out[name].append((time.perf_counter() - t0) * 1000)
            await ws.send_str(json.dumps({"watchId": wid, "requestId": "c" + wid,
                                          "msgType": "CLOSE_WATCH", "msgData": {}}))
    for ws, _ in socks.values():
        await ws.close()
    g, d = out["gateway"], out["direct"]
    return {"gw_p50": pct(g, 0.5), "gw_p99": pct(g, 0.99), "direct_p50": pct(d, 0.5),
            "direct_p99": pct(d, 0.99), "added_p50": pct(g, 0.5) - pct(d, 0.5),
            "added_p99": pct(g, 0.99) - pct(d, 0.99)}


async def one_run(args: argparse.Namespace, gw_pid: int, gw_url: str, direct_url: str,
                  r: redis.Redis, run: int) -> dict[str, float]:
    res: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        client = Client(session, gw_url)
        # Renewal cost at N/10, then N (flat in N is the point).
        small = max(1, args.watches // 10)
        socks, _ = await open_watches(client, small, args.per_socket, f"s{run}")
        await asyncio.sleep(args.renew_ms / 1000)
        res["renew_calls_small"] = await renewal_window(r, args.hold * args.renew_ms / 1000)
        await close_watches(socks, args.per_socket, small, f"s{run}")
        for ws, _ in socks:
            await ws.close()
        while live_slots(r):
            await asyncio.sleep(0.05)

        await asyncio.sleep(0.5)
        rss0 = rss_bytes(gw_pid)
        socks, took = await open_watches(client, args.watches, args.per_socket, f"n{run}")
        res["open_per_s"] = args.watches / took
        await asyncio.sleep(0.5)
        res["rss_per_watch"] = (rss_bytes(gw_pid) - rss0) / args.watches
        res["store_slots"] = live_slots(r)
        await asyncio.sleep(args.renew_ms / 1000)
        res["renew_calls"] = await renewal_window(r, args.hold * args.renew_ms / 1000)
        t0 = time.perf_counter()
        await close_watches(socks, args.per_socket, args.watches, f"n{run}")
        while live_slots(r):
            await asyncio.sleep(0.005)
        res["close_per_s"] = args.watches / (time.perf_counter() - t0)
        for ws, _ in socks:
            await ws.close()
        res.update(await latency(gw_url, direct_url, args.latency_samples, session))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watches", type=int, default=10_000)
    p.add_argument("--per-socket", type=int, default=100)
    p.add_argument("--renew-ms", type=int, default=1000)
    p.add_argument("--hold", type=int, default=5, help="renewal intervals measured (5)")
    p.add_argument("--latency-samples", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--proxy-cpu", default="1")
    p.add_argument("--aux-cpus", default="0")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {int(c) for c in args.aux_cpus.split(",")})

    tmp = Path(tempfile.mkdtemp(prefix="qg-rtbench-"))
    procs: list[subprocess.Popen] = []
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
    try:
        valkey.start()
        up_port = free_port()
        procs.append(subprocess.Popen(["taskset", "-c", args.aux_cpus, PY,
                                       str(HERE / "upstream_proc.py"), str(up_port)]))
        config, port = write_config(tmp, up_port, valkey.url, args.renew_ms)
        r = redis.Redis.from_url(valkey.url)
        gw_url = f"http://127.0.0.1:{port}/realtime?{QUIET}"
        direct_url = f"http://127.0.0.1:{up_port}/realtime?{QUIET}"
        runs = []
        for i in range(args.runs):
            # A fresh gateway per run: its memory is measured from the same starting point.
            gw = subprocess.Popen(["taskset", "-c", args.proxy_cpu, PY,
                                   str(HERE / "gateway_proc.py"), str(config), valkey.url])
            try:
                wait_port(port)
                res = uvloop.run(one_run(args, gw.pid, gw_url, direct_url, r, i))
            finally:
                gw.terminate()
                gw.wait(20)
            runs.append(res)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()),
                  flush=True)
        interval_s = args.renew_ms / 1000
        window = args.hold * interval_s

        def m(key: str) -> float:
            return statistics.median(x[key] for x in runs)

        print()
        print(f"realtime benchmark: {args.runs} runs, {args.watches} watches "
              f"({args.per_socket} per WebSocket), renewal every {args.renew_ms} ms; "
              f"gateway pinned to cpu {args.proxy_cpu}; medians over runs")
        print(f"  watches held in the store after opening   {m('store_slots'):.0f}")
        print(f"  gateway memory per watch (RSS delta / N)   {m('rss_per_watch'):.0f} bytes")
        print(f"  INIT_WATCH opened per second              {m('open_per_s'):.0f}")
        print(f"  CLOSE_WATCH closed per second (to store 0) {m('close_per_s'):.0f}")
        print(f"  lease renewal store calls, N={args.watches}: {m('renew_calls') / window:.2f}/s "
              f"({m('renew_calls') / args.hold:.2f} per interval)")
        small = max(1, args.watches // 10)
        print(f"  lease renewal store calls, N={small}: {m('renew_calls_small') / window:.2f}/s "
              f"({m('renew_calls_small') / args.hold:.2f} per interval)")
        print(f"  INIT_WATCH round trip p50 / p99: gateway {m('gw_p50'):.3f} / {m('gw_p99'):.3f} "
              f"ms, direct {m('direct_p50'):.3f} / {m('direct_p99'):.3f} ms")
        print(f"  added by the gateway p50 / p99: {m('added_p50'):.3f} / {m('added_p99'):.3f} ms")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
