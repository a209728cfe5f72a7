"""One hot environment through the proxy, two instances (issue 25): B2 (two gateways,
enforcement off) against C2 (two gateways, enforcing, the environment leased by both).

    .venv/bin/python loadtests/hot_proxy.py [--runs 8] [--slice 2] [--connections 32]

Processes as in bench.py: the demo upstream, Valkey and the load generators on core 0, every
gateway (``loadtests/gateway_proc.py``, one process each) pinned to core 1, so the two instances
of an arm share one core and their sum is comparable with the other arm's. Each slice runs two
``wrk`` at once, one per instance of the arm (``--connections`` each, on the plain route: no
concurrency slot, no GBs metering), for ``--slice`` seconds after a ``--slice-warmup``; passes
alternate the arms' order. Per pass: both arms' summed requests/s, the two gateways' CPU per
request (schedstat), and the store's script calls per admitted request (``INFO commandstats``,
leases and per-request decisions alike). Reported: medians and interquartile ranges over passes
of C2/B2 and of the store calls per admitted request. ``--hot-rate`` (default 1,000) is both
instances' ``gateway.hot_rate``: each sees half of what one core can proxy, about 2,000/s here,
the default threshold.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import ENV_OK, LOADTESTS, PLAIN_PATH, PY, write_configs
from benchkit.procs import Children, cpu_ns, wait_http
from benchkit.store_stats import StoreStats, script_calls
from benchkit.wrk import parse_wrk

from quotagate.limiter.embedded import EmbeddedValkey, free_port


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def instances(tmp: Path, config: Path, mode: str, store_url: str, children: Children,
              proxy_cpu: str, hot_rate: int) -> list[tuple[int, int]]:
    """Two gateways running ``config`` (each its own ports and journal, ``hot_rate``):
    [(port, pid)]."""
    base = dict(yaml.safe_load(config.read_text()), hot_rate=hot_rate)
    out = []
    for i in range(2):
        cfg = dict(base, listen=f"127.0.0.1:{free_port()}",
                   admin_listen=f"127.0.0.1:{free_port()}",
                   store=dict(base["store"], journal_dir=str(tmp / f"journal-{mode}-{i}")))
        path = tmp / f"gateway-{mode}-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        proc = children.start(f"gateway-{mode}-{i}",
                              [PY, str(LOADTESTS / "gateway_proc.py"), str(path), store_url],
                              proxy_cpu)
        port = int(cfg["listen"].rsplit(":", 1)[1])
        wait_http(port, ENV_OK, 30, f"gateway {mode} {i}", children, path=PLAIN_PATH)
        out.append((port, proc.pid))
    return out


def wrk_pair(ports: list[int], args: argparse.Namespace, seconds: float,
             measured: bool) -> list[str]:
    """Two wrk at once, one per instance; their outputs (warm-ups: stopped by SIGINT)."""
    whole = max(1, int(-(-seconds // 1)))
    procs = [subprocess.Popen(
        ["taskset", "-c", args.client_cpu, "wrk", "-t1", f"-c{args.connections}",
         f"-d{whole}s", "--latency", "-H", f"X-CloudBase-Env: {ENV_OK}",
         f"http://127.0.0.1:{port}{PLAIN_PATH}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for port in ports]
    try:
        if not measured:
            time.sleep(seconds)
            for p in procs:
                p.send_signal(signal.SIGINT)
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=whole + 60)
            if measured and p.returncode != 0:
                raise RuntimeError(f"wrk failed ({p.returncode}): {err or out}")
            outs.append(out)
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--slice", type=int, default=2)
    ap.add_argument("--slice-warmup", type=float, default=0.5)
    ap.add_argument("--connections", type=int, default=32, help="per instance")
    ap.add_argument("--hot-rate", type=int, default=1000,
                    help="gateway.hot_rate of both instances (each sees half the load: about "
                         "2,000/s on this 2-core machine, the default's threshold)")
    ap.add_argument("--client-cpu", default="0")
    ap.add_argument("--proxy-cpu", default="1")
    ap.add_argument("--aux-cpus", default="0")
    args = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        args.proxy_cpu = args.client_cpu = args.aux_cpus = "0"
    os.sched_setaffinity(0, {int(args.client_cpu)})
    tmp = Path(tempfile.mkdtemp(prefix="qg-hot-proxy-"))
    children = Children(tmp)
    try:
        up_port = free_port()
        children.start("upstream", [PY, str(LOADTESTS / "upstream_proc.py"), str(up_port)],
                       args.aux_cpus)
        wait_http(up_port, None, 20, "upstream", children)
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
        children.valkey = valkey.start()
        assert valkey.process is not None
        os.sched_setaffinity(valkey.process.pid, {int(args.aux_cpus)})
        stats = StoreStats(valkey.url, valkey.process.pid)
        configs = write_configs(tmp, up_port, valkey.url)
        arms = {"B2": instances(tmp, configs["off"], "off", valkey.url, children,
                                args.proxy_cpu, args.hot_rate),
                "C2": instances(tmp, configs["enforce"], "enforce", valkey.url, children,
                                args.proxy_cpu, args.hot_rate)}
        for pair in arms.values():
            wrk_pair([p for p, _ in pair], args, 2, measured=False)
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for run in range(args.runs):
            for name in (list(arms) if run % 2 == 0 else list(arms)[::-1]):
                pair = arms[name]
                wrk_pair([p for p, _ in pair], args, args.slice_warmup, measured=False)
                pids = [pid for _, pid in pair]
                s0, n0 = stats.snapshot(), cpu_ns(pids)
                outs = wrk_pair([p for p, _ in pair], args, args.slice, measured=True)
                n1, s1 = cpu_ns(pids), stats.snapshot()
                children.check_alive()
                res = [parse_wrk(o) for o in outs]
                requests = sum(r.requests for r in res)
                ok = requests - sum(r.non2xx for r in res)
                calls = script_calls({f"cmdstat_{k}": {"calls": v}
                                      for k, v in StoreStats.delta(s0, s1).items()})
                row: dict[str, Any] = {"rps": sum(r.rps for r in res), "per": [r.rps for r in res],
                       "p99": max(r.p99_ms for r in res),
                       "cpu": (n1 - n0) / 1e3 / max(requests, 1),
                       "scripts": calls / max(ok, 1), "non2xx": requests - ok}
                rows[name].append(row)
                print(f"  pass {run + 1:>2} {name}  {row['rps']:8.0f} req/s "
                      f"({row['per'][0]:.0f} + {row['per'][1]:.0f})  p99 {row['p99']:6.2f} ms  "
                      f"CPU {row['cpu']:6.1f} µs/req  script calls/admitted "
                      f"{row['scripts']:.4f}  non-2xx {row['non2xx']}", flush=True)
        ratio = [c["rps"] / b["rps"] for b, c in zip(rows["B2"], rows["C2"], strict=True)]
        cpu = [c["cpu"] / b["cpu"] for b, c in zip(rows["B2"], rows["C2"], strict=True)]
        print(f"\none hot environment, two instances on core {args.proxy_cpu}, "
              f"{args.runs} passes x {args.slice} s, {args.connections} connections each")
        for name, label in (("B2", "enforcement off"), ("C2", "enforcing, leased")):
            q = quartiles([r["rps"] for r in rows[name]])
            print(f"  {name} ({label}): {q[1]:.0f} req/s (IQR {q[0]:.0f}..{q[2]:.0f}), "
                  f"CPU {statistics.median(r['cpu'] for r in rows[name]):.1f} µs/req, "
                  f"p99 {statistics.median(r['p99'] for r in rows[name]):.2f} ms, "
                  f"script calls per admitted request "
                  f"{statistics.median(r['scripts'] for r in rows[name]):.4f}, "
                  f"non-2xx {sum(r['non2xx'] for r in rows[name])}")
        for label, values in (("C2/B2 req/s", ratio), ("C2/B2 CPU per request", cpu)):
            q = quartiles(values)
            print(f"  {label:<24} {q[1]:.3f}  IQR {q[0]:.3f}..{q[2]:.3f}")
        q = quartiles([r["scripts"] for r in rows["C2"]])
        print(f"  {'C2 script calls/admitted':<24} {q[1]:.4f}  IQR {q[0]:.4f}..{q[2]:.4f}")
        stats.close()
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
