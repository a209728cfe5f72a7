"""``quotagate serve --workers N``: do the workers share the public port, and what does N buy?

    .venv/bin/python loadtests/workers_bench.py [--runs 3] [--seconds 8] [--workers 1 2]

For each N (alternating, ``--runs`` times): an embedded Valkey, two demo upstream processes
sharing one port, and ``quotagate serve --workers N`` as shipped (config/gateway.yaml with free
ports, this store, one environment that never reaches its limits), loaded by
``wrk -t1 -c64``. Reports requests/s and how the workers' CPU time split (each worker's share
of the group's): with SO_REUSEPORT the kernel spreads connections, so every worker should
carry a share. Prints the median of the runs and the ratio to the first N.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path

from quotagate.demo.staging import stage_shipped, wait_ready_blocking
from quotagate.limiter.embedded import EmbeddedValkey, free_port

HERE = Path(__file__).resolve().parent
TOKEN = "bench"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", "quotagate worker"],
                         capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def run_once(workers: int, seconds: int, store_url: str, upstream: str, tmp: Path
             ) -> tuple[float, list[float]]:
    directory = tmp / f"w{workers}-{time.monotonic_ns()}"
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    gateway = stage_shipped(directory, upstream, {
        "bench": {"plan": "enterprise", "anchor": today.replace(day=1).isoformat(),
                  "expires": today.replace(day=1, year=today.year + 1).isoformat(),
                  "overage": True, "limits": {"qps": 10_000_000}}}, store={"url": store_url})
    port, admin = (int(gateway[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen"))
    serve = subprocess.Popen(
        [sys.executable, "-m", "quotagate", "serve", "--config",
         str(directory / "gateway.yaml"), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        wait_ready_blocking(admin, timeout=60)
        time.sleep(0.5)
        pids = _workers(serve.pid) or [serve.pid]  # --workers 1 serves in the process itself
        assert len(pids) == workers, f"expected {workers} workers, found {pids}"
        url = f"http://127.0.0.1:{port}/functions/hello"
        subprocess.run(["wrk", "-t1", "-c64", "-d2s", "-H", "X-CloudBase-Env: bench", url],
                       capture_output=True, check=True)  # warm-up
        before = [_cpu_seconds(p) for p in pids]
        out = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds}s", "-H",
                              "X-CloudBase-Env: bench", url],
                             capture_output=True, text=True, check=True).stdout
        used = [_cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert match, out
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        assert non2xx is None, out  # never refused: the rate is the gateway's
        total = sum(used) or 1.0
        return float(match.group(1)), [u / total for u in used]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="qg-workers-"))
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
    valkey.start()
    up_port = free_port()
    ups = [subprocess.Popen([sys.executable, str(HERE / "upstream_proc.py"), str(up_port),
                             "--reuse-port"]) for _ in range(2)]
    try:
        time.sleep(1.0)
        rates: dict[int, list[float]] = {n: [] for n in args.workers}
        shares: dict[int, list[list[float]]] = {n: [] for n in args.workers}
        for run in range(args.runs):
            for n in args.workers:  # alternating, so drift hits every N alike
                rate, share = run_once(n, args.seconds, valkey.url,
                                       f"http://127.0.0.1:{up_port}", tmp)
                rates[n].append(rate)
                shares[n].append(share)
                print(f"run {run + 1} workers {n}: {rate:,.0f} req/s, CPU split "
                      f"{' / '.join(f'{s:.0%}' for s in share)}", flush=True)
        base = statistics.median(rates[args.workers[0]])
        for n in args.workers:
            med = statistics.median(rates[n])
            least = min(min(s) for s in shares[n])
            print(f"workers {n}: median {med:,.0f} req/s ({med / base:.2f}x workers "
                  f"{args.workers[0]}); the least-loaded worker's CPU share, worst run: "
                  f"{least:.0%}")
        return 0
    finally:
        for up in ups:
            up.terminate()
        for up in ups:
            up.wait(10)
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
