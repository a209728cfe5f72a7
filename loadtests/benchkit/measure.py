"""One measured slice of an arm: wrk's figures, the proxy's and the store's CPU, the store's
commands and the cores' utilisation over the same interval."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .arm import Arm
from .procs import HAVE_SCHEDSTAT, Children, core_times, cpu_ns, cpu_ticks, tree_pids
from .store_stats import SCRIPT_COMMANDS, StoreStats
from .wrk import WrkResult, parse_wrk, run_wrk, wrk_command


@dataclass
class Sample:
    wrk: WrkResult
    cpu_us_per_req: float | None  # from schedstat (exact) when available, else from ticks
    cpu_ticks_s: float | None  # proxy CPU seconds from /proc/<pid>/stat ticks (cross-check)
    cpu_sched_s: float | None  # proxy CPU seconds from schedstat
    cmds_per_req: float
    scripts_per_req: float
    store_us_per_req: float | None  # the store process's CPU (schedstat or ticks) per request
    commands: dict[str, int]
    core_util: dict[str, float]
    run: int = 0  # pass index
    position: int = 0  # place in that pass's order
    started_s: float = 0.0  # seconds since the first measured slice


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)


def measure(args: argparse.Namespace, arm: Arm, stats: StoreStats, children: Children,
            verbose: Callable[[str], None]) -> Sample:
    """One measured slice of `args.slice` seconds (the arm is already warm)."""
    children.check_alive()
    pids = tree_pids(arm.pid) if arm.pid else []
    clk = os.sysconf("SC_CLK_TCK")
    cmd = wrk_command(args, arm.port, args.slice, arm.wrk_args, arm.path)
    store = [stats.pid] if stats.pid else []
    s0, c0 = stats.snapshot(), core_times()
    t0, n0 = cpu_ticks(pids), cpu_ns(pids)
    st0 = cpu_ns(store) if HAVE_SCHEDSTAT else cpu_ticks(store)
    out = run_wrk(cmd, args.slice)
    st1 = cpu_ns(store) if HAVE_SCHEDSTAT else cpu_ticks(store)
    t1, n1 = cpu_ticks(pids), cpu_ns(pids)
    c1, s1 = core_times(), stats.snapshot()
    children.check_alive()
    verbose(out)
    res = parse_wrk(out)
    n = max(res.requests, 1)
    commands = StoreStats.delta(s0, s1)
    util = {}
    for core, (busy1, total1) in c1.items():
        busy0, total0 = c0.get(core, (0, 0))
        util[core] = 100.0 * (busy1 - busy0) / max(total1 - total0, 1)
    ticks_s = (t1 - t0) / clk if arm.pid else None
    sched_s = (n1 - n0) / 1e9 if arm.pid and HAVE_SCHEDSTAT else None
    cpu_s = sched_s if sched_s is not None else ticks_s
    return Sample(
        wrk=res,
        cpu_us_per_req=cpu_s * 1e6 / n if cpu_s is not None else None,
        cpu_ticks_s=ticks_s,
        cpu_sched_s=sched_s,
        cmds_per_req=sum(commands.values()) / n,
        scripts_per_req=sum(v for k, v in commands.items() if k in SCRIPT_COMMANDS) / n,
        store_us_per_req=((st1 - st0) / 1e3 if HAVE_SCHEDSTAT else (st1 - st0) / clk * 1e6) / n
        if store else None,
        commands=commands,
        core_util=util,
    )
