"""Plugin mode, Envoy's rate limit service: decisions per second and quotagate's CPU per
decision on one core, over gRPC.

    .venv/bin/python loadtests/rls_bench.py [--seconds 5] [--runs 3] [--concurrency 64]

A private Valkey and the load generator share core 0; one gateway process (the bench's
enforce config, ``authz.grpc_listen`` on) is pinned to core 1. The generator is grpclib's
client with Envoy's messages (protobuf, as the server), ``--concurrency`` calls in flight on
one HTTP/2 connection, as
Envoy's rate limit filter sends them: one descriptor per request (env, path, method), on the
bench's function route without slot or metering (``/plain/``, never refused). Reports, per
run, decisions/s and the gateway's CPU µs per decision (from /proc), and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
import yaml
from grpclib.client import Channel, UnaryUnaryMethod

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import ENV_OK, PLAIN_PATH, write_configs

from quotagate.gateway.plugin.rls import METHOD, OK, RateLimitRequest, RateLimitResponse
from quotagate.limiter.embedded import EmbeddedValkey, free_port

HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, seconds: float, concurrency: int) -> tuple[int, int]:
    """(decisions answered OK, other answers) in ``seconds``."""
    request = RateLimitRequest(domain="quotagate")
    descriptor = request.descriptors.add()
    for key, value in (("env", ENV_OK), ("path", PLAIN_PATH), ("method", "GET")):
        descriptor.entries.add(key=key, value=value)
    ok = other = 0
    async with Channel("127.0.0.1", port) as channel:
        call = UnaryUnaryMethod(channel, METHOD, RateLimitRequest, RateLimitResponse)
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal ok, other
            while time.monotonic() < deadline:
                reply = await call(request)
                if reply.overall_code == OK:
                    ok += 1
                else:
                    other += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, other


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args(argv)
    two_cores = (os.cpu_count() or 1) > 1
    tmp = Path(tempfile.mkdtemp(prefix="qg-rls-bench-"))
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False).start()
    gateway: subprocess.Popen[bytes] | None = None
    try:
        assert valkey.process is not None
        if two_cores:
            os.sched_setaffinity(valkey.process.pid, {0})
            os.sched_setaffinity(0, {0})
        config = yaml.safe_load(write_configs(tmp, 1, valkey.url)["enforce"].read_text())
        port = free_port()
        config["authz"] = {"grpc_listen": f"127.0.0.1:{port}",
                           "ratelimit": {"domain": "quotagate"}}
        path = tmp / "gateway-rls.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        gateway = subprocess.Popen(
            ["taskset", "-c", "1" if two_cores else "0", sys.executable,
             str(HERE / "gateway_proc.py"), str(path), valkey.url])
        bench_wait = time.monotonic() + 30
        while True:  # until it answers
            try:
                uvloop.run(load(port, 0.2, 1))
                break
            except (OSError, ConnectionError):
                if time.monotonic() > bench_wait or gateway.poll() is not None:
                    raise RuntimeError("the gateway's rate limit service did not start"
                                       ) from None
                time.sleep(0.2)
        uvloop.run(load(port, 1.0, args.concurrency))  # warm
        rates, cpus = [], []
        for run in range(args.runs):
            before = cpu_seconds(gateway.pid)
            ok, other = uvloop.run(load(port, args.seconds, args.concurrency))
            used = cpu_seconds(gateway.pid) - before
            assert other == 0, f"{other} answers were not OK"
            rates.append(ok / args.seconds)
            cpus.append(used / ok * 1e6)
            print(f"run {run + 1}: {ok / args.seconds:8.0f} decisions/s   "
                  f"{used / ok * 1e6:6.1f} µs CPU per decision (gateway)", flush=True)
        print(f"median: {statistics.median(rates):.0f} decisions/s on one core, "
              f"{statistics.median(cpus):.1f} µs CPU per decision "
              f"({args.concurrency} in flight, one HTTP/2 connection)")
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(10)
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
