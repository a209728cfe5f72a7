"""Open-loop latency at a fixed rate: what quotagate adds to p50 / p99 at half of B's
saturation rate (BENCH.md: no coordinated omission — latency counts from the scheduled send).

    .venv/bin/python loadtests/latency.py [--runs 5] [--seconds 5] [--rate R]

Processes as in bench.py: the demo upstream and Valkey on core 0 with this client, each gateway
(B: enforcement off, C: enforced function route) pinned to core 1. B's saturation rate is
measured first with wrk (unless --rate is given); then each run sends R/2 requests per second
for --seconds to A (upstream direct), B and C in turn (order rotating), every request at its
scheduled instant whatever the previous ones do, on a pool of keep-alive connections.
Reported: medians over runs of each arm's p50, p99 and p99.9, and the latency C and B add to A.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

from quotagate.limiter.embedded import EmbeddedValkey, free_port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_loop(url: str, rate: float, seconds: float, conns: int) -> tuple[list[float], int]:
    """Latencies (ms, from each request's scheduled instant) and the count of failures."""
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=conns)
    headers = {"X-CloudBase-Env": bench.ENV_OK}
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(due: float) -> None:
            nonlocal failures
            try:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures += 1
            except aiohttp.ClientError:
                failures += 1
            latencies.append((time.perf_counter() - due) * 1000)

        total = int(rate * seconds)
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
    return latencies, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=0.0, help="requests/s (default: B's / 2)")
    p.add_argument("--connections", type=int, default=256)
    args = p.parse_args(argv)
    import os

    os.sched_setaffinity(0, {0})
    tmp = Path(tempfile.mkdtemp(prefix="qg-latency-"))
    children = bench.Children(tmp)
    try:
        up_port = free_port()
        children.start("upstream", [bench.PY, str(bench.HERE / "upstream_proc.py"),
                                    str(up_port)], "0")
        bench.wait_http(up_port, None, 20, "upstream", children)
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
        children.valkey = valkey.start()
        assert valkey.process is not None
        os.sched_setaffinity(valkey.process.pid, {0})
        configs = bench.write_configs(tmp, up_port, valkey.url)
        ports = {"A": up_port}
        for arm, mode in (("B", "off"), ("C", "enforce")):
            ports[arm] = int(yaml.safe_load(configs[mode].read_text())["listen"].rsplit(":")[1])
            children.start(f"gateway-{mode}", [bench.PY, str(bench.HERE / "gateway_proc.py"),
                                               str(configs[mode]), valkey.url], "1")
            bench.wait_http(ports[arm], bench.ENV_OK, 30, f"gateway {mode}", children)
        rate = args.rate
        if not rate:
            out = bench.run_wrk(["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d3s", "--latency",
                                 "-H", f"X-CloudBase-Env: {bench.ENV_OK}",
                                 f"http://127.0.0.1:{ports['B']}{bench.PATH}"], 3)
            saturation = bench.parse_wrk(out).rps
            rate = saturation / 2
            print(f"B saturates at {saturation:.0f} req/s (wrk -c64, 3 s): open loop at "
                  f"{rate:.0f} req/s")
        results: dict[str, list[dict[str, float]]] = {"A": [], "B": [], "C": []}
        order = ["A", "B", "C"]
        for run in range(args.runs):
            for arm in order[run % 3:] + order[:run % 3]:
                url = f"http://127.0.0.1:{ports[arm]}{bench.PATH}"
                lat, failed = uvloop.run(open_loop(url, rate, args.seconds, args.connections))
                results[arm].append({"p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                                     "p999": pct(lat, 0.999), "failed": failed})
                print(f"run {run + 1} {arm}: p50 {pct(lat, 0.5):.3f} ms, p99 "
                      f"{pct(lat, 0.99):.3f} ms, p99.9 {pct(lat, 0.999):.3f} ms, "
                      f"{failed} failed", flush=True)

        def m(arm: str, key: str) -> float:
            return statistics.median(r[key] for r in results[arm])

        print(f"\nopen loop at {rate:.0f} req/s, {args.seconds:g} s per arm per run, "
              f"{args.runs} runs, medians:")
        for arm in ("A", "B", "C"):
            print(f"  {arm}: p50 {m(arm, 'p50'):.3f} ms  p99 {m(arm, 'p99'):.3f} ms  "
                  f"p99.9 {m(arm, 'p999'):.3f} ms  failed {m(arm, 'failed'):.0f}")
        for arm in ("B", "C"):
            added = [c["p99"] - a["p99"] for c, a in zip(results[arm], results["A"],
                                                          strict=True)]
            added50 = [c["p50"] - a["p50"] for c, a in zip(results[arm], results["A"],
                                                            strict=True)]
            print(f"  added by {arm} (vs A, same run): p50 {statistics.median(added50):.3f} ms, "
                  f"p99 {statistics.median(added):.3f} ms")
        return 0
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
