"""The command line and the run: set up the upstream and the store, start every selected
arm (``arms/``), warm each up once, then the interleaved passes; print the report."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from quotagate.limiter.embedded import EmbeddedValkey, free_port

from .arm import Arm, Context
from .arms import ALL_ARMS, ARMS, MEASURE_ORDER
from .common import ENV_OK, LOADTESTS, PY, write_configs
from .measure import Results, measure
from .procs import Children, wait_http
from .report import fmt, report
from .store_stats import StoreStats
from .wrk import warm_up, wrk_command


def parse_args(argv: list[str] | None, description: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None,
                   help="interleaved passes; each measures every arm once for --slice seconds "
                        "(default 10)")
    p.add_argument("--slice", type=int, default=2,
                   help="measured seconds per arm per pass, wrk -d (%(default)s)")
    p.add_argument("--duration", type=int, default=None,
                   help="alternative to --runs: total measured seconds per arm; passes = "
                        "ceil(duration / slice)")
    p.add_argument("--slice-warmup", type=float, default=0.5,
                   help="unmeasured load before each slice, seconds, 0 for none (%(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up seconds per arm, once, before the first pass (%(default)s)")
    p.add_argument("--connections", type=int, default=64, help="wrk -c (%(default)s)")
    p.add_argument("--arms", default=",".join(ALL_ARMS),
                   help=f"comma-separated subset of {','.join(ALL_ARMS)}, or "
                        f"{'/'.join(a.name for a in ARMS.values() if a.group)} "
                        "(default: all; N and P are skipped without nginx)")
    p.add_argument("--client-cpu", default="0", help="core(s) for wrk (%(default)s)")
    p.add_argument("--proxy-cpu", default="1", help="core(s) for each proxy (%(default)s)")
    p.add_argument("--aux-cpus", default="0",
                   help="core(s) for the upstream and Valkey (%(default)s)")
    p.add_argument("--upstream-procs", type=int, default=1,
                   help="upstream processes sharing the port with SO_REUSEPORT (%(default)s)")
    p.add_argument("--store-aof", action="store_true",
                   help="run Valkey with appendonly everysec (default: no persistence)")
    p.add_argument("--d-limit", default="10000000/second",
                   help="limit given to the `limits` strategies (%(default)s)")
    p.add_argument("--json", help="also write every sample to this JSON file")
    p.add_argument("--verbose", action="store_true", help="print every wrk output")
    args = p.parse_args(argv)
    if args.runs is not None and args.duration is not None:
        p.error("give --runs (passes) or --duration (total seconds per arm), not both")
    if not 1 <= args.slice <= 60:
        p.error("--slice 1..60")
    if args.duration is not None:
        if not 1 <= args.duration <= 3600:
            p.error("--duration 1..3600")
        args.runs = math.ceil(args.duration / args.slice)
    elif args.runs is None:
        args.runs = 10
    if not 1 <= args.runs <= 500 or not 0 <= args.warmup <= 60 or not 0 <= args.slice_warmup <= 10:
        p.error("--runs 1..500, --warmup 0..60, --slice-warmup 0..10")
    return args


def select_arms(spec: str) -> list[str]:
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip().replace("C-reject", "Creject")
        if not name:
            continue
        members = [a.name for a in ARMS.values() if a.group == name]
        if members:
            out.extend(members)
        elif name in ARMS:
            out.append(name)
        else:
            known = dict.fromkeys(n for a in ARMS.values() for n in (a.group, a.name) if n)
            raise SystemExit(f"unknown arm {name!r} ({', '.join(known)})")
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    args = parse_args(argv, description)
    if not shutil.which("wrk"):
        print("error: wrk is not installed (it is the load generator of this benchmark).\n"
              "       install it with: apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 2
    if not shutil.which("taskset"):
        print("error: taskset (util-linux) is not installed", file=sys.stderr)
        return 2
    wanted = select_arms(args.arms)
    for arm_def in ARMS.values():
        note = arm_def.unavailable() if arm_def.name in wanted else None
        if note:
            print(note, file=sys.stderr)
            wanted.remove(arm_def.name)
    ncpu = os.cpu_count() or 1
    used = {int(c) for spec in (args.client_cpu, args.proxy_cpu, args.aux_cpus)
            for c in re.split(r"[,-]", spec) if c}
    if max(used) >= ncpu:
        print(f"error: only {ncpu} core(s) here; adjust --client-cpu/--proxy-cpu/--aux-cpus",
              file=sys.stderr)
        return 2
    # The driver mostly sleeps; keep it off the proxy's core anyway.
    os.sched_setaffinity(0, {int(c) for c in args.client_cpu.split(",")})

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    tmp = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    children = Children(tmp)
    stats: StoreStats | None = None
    keep_logs = False
    verbose = print if args.verbose else (lambda _s: None)
    try:
        # Upstream
        up_port = free_port()
        for i in range(args.upstream_procs):
            argv_up = [PY, str(LOADTESTS / "upstream_proc.py"), str(up_port)]
            if args.upstream_procs > 1:
                argv_up.append("--reuse-port")
            children.start(f"upstream{i}", argv_up, args.aux_cpus)
        wait_http(up_port, None, 20, "upstream", children)

        # Store (also for B: the gateway writes its environments there at start)
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=args.store_aof)
        children.valkey = valkey.start()
        assert valkey.process is not None
        os.sched_setaffinity(valkey.process.pid, {int(c) for c in args.aux_cpus.split(",")})
        stats = StoreStats(valkey.url, valkey.process.pid)
        configs = write_configs(tmp, up_port, valkey.url)
        header = ["-H", f"X-CloudBase-Env: {ENV_OK}"]
        ctx = Context(args, children, tmp, up_port, valkey.url, configs, header)
        # In ARMS's order; the arms sharing a process (C, Cfn, Creject) start it once.
        arms: list[Arm] = [arm_def.start(ctx) for arm_def in ARMS.values()
                           if arm_def.name in wanted]
        if not arms:
            print("no arms to run", file=sys.stderr)
            return 2

        arms.sort(key=lambda a: MEASURE_ORDER.index(a.name))
        commands = {a.name: shlex.join(
            wrk_command(args, a.port, args.slice, a.wrk_args, a.path))
                    for a in arms}
        results = Results({a.name: [] for a in arms})
        total = (len(arms) * args.warmup
                 + len(arms) * args.runs * (args.slice + args.slice_warmup + 0.15))
        print(f"running {len(arms)} arm(s) x {args.runs} pass(es) of {args.slice} s slices: "
              f"about {total:.0f} s (logs in {tmp})", flush=True)
        # Every arm's processes run for the whole bench; warm each up once, then interleave.
        for arm in arms:
            children.check_alive()
            warm_up(args, arm, args.warmup)
        t_first = time.monotonic()
        for run in range(args.runs):
            order = arms if run % 2 == 0 else arms[::-1]
            for position, arm in enumerate(order):
                warm_up(args, arm, args.slice_warmup)
                started = time.monotonic() - t_first
                sample = measure(args, arm, stats, children, verbose)
                sample.run, sample.position, sample.started_s = run, position, started
                results.samples[arm.name].append(sample)
                print(f"  pass {run + 1:>2} {arm.name:<9} {sample.wrk.rps:9.0f} req/s  "
                      f"p99 {sample.wrk.p99_ms:6.2f} ms  non-2xx {sample.wrk.non2xx}  "
                      f"CPU {fmt(sample.cpu_us_per_req, '.1f')} µs/req  "
                      f"cmds {sample.cmds_per_req:.2f}/req", flush=True)
        lines = report(args, arms, results, commands)
        print("\n".join(lines))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": vars(args),
                "commands": commands,
                "samples": {name: [{"run": s.run, "position": s.position,
                                    "started_s": s.started_s, "wrk": s.wrk.__dict__,
                                    "cpu_us_per_req": s.cpu_us_per_req,
                                    "cpu_ticks_s": s.cpu_ticks_s, "cpu_sched_s": s.cpu_sched_s,
                                    "cmds_per_req": s.cmds_per_req,
                                    "scripts_per_req": s.scripts_per_req,
                                    "store_us_per_req": s.store_us_per_req,
                                    "commands": s.commands, "core_util": s.core_util}
                                   for s in samples]
                            for name, samples in results.samples.items()},
            }, indent=2))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every child process", file=sys.stderr)
        return 130
    except Exception:
        keep_logs = True
        print(f"benchmark failed; child logs kept in {tmp}", file=sys.stderr)
        raise
    finally:
        if stats is not None:
            stats.close()
        children.stop_all()
        if not keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
