"""The report: per-arm medians over slices, the store's commands per request, the ratios
(each from two arms' slices of the same pass, then median and IQR over passes), the CPU
cross-check, the wrk commands and the arms' descriptions."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

from .arm import Arm
from .arms import DISPLAY_ORDER
from .measure import Results, Sample


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); the interquartile range q1..q3 holds the middle half of the values."""
    if not values:
        return (float("nan"),) * 3
    if len(values) == 1:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt(value: float | None, spec: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


def report(args: argparse.Namespace, arms: list[Arm], results: Results,
           commands: dict[str, str]) -> list[str]:
    lines: list[str] = []
    say = lines.append
    say("")
    say(f"quotagate benchmark: {args.runs} interleaved pass(es) x one {args.slice} s slice per "
        f"arm (+{args.slice_warmup:g} s warm-up per slice, {args.warmup} s once per arm), "
        f"{args.connections} connections")
    say(f"measurement order: {' '.join(a.name for a in arms)}, reversed every other pass; "
        "table: medians over slices")
    say(f"cores: wrk on {args.client_cpu}, each proxy on {args.proxy_cpu}, upstream "
        f"({args.upstream_procs} process(es)) and Valkey on {args.aux_cpus}; "
        f"cpuN% = busy share of that core during the measured slice")
    say("")
    shown = sorted(arms, key=lambda a: DISPLAY_ORDER.index(a.name))
    cores = sorted({c for arm in arms for s in results.samples.get(arm.name, [])
                    for c in s.core_util})
    head = (f"{'arm':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>9} "
            f"{'sockerr':>7} {'CPU µs/req':>10} {'cmds/req':>8} {'scripts/req':>11} "
            f"{'store µs/req':>12} "
            + " ".join(f"{c + '%':>6}" for c in cores) + "   req/s IQR over slices")
    say(head)
    say("-" * len(head))
    for arm in shown:
        samples = results.samples.get(arm.name, [])
        if not samples:
            say(f"{arm.name:<10} (no successful slice)")
            continue
        q1, _, q3 = quartiles([s.wrk.rps for s in samples])
        cpu_values = [s.cpu_us_per_req for s in samples if s.cpu_us_per_req is not None]
        store_values = [s.store_us_per_req for s in samples
                        if s.store_us_per_req is not None and s.scripts_per_req > 0]
        say(f"{arm.name:<10} {med([s.wrk.rps for s in samples]):>9.0f} "
            f"{med([s.wrk.p50_ms for s in samples]):>8.2f} "
            f"{med([s.wrk.p99_ms for s in samples]):>8.2f} "
            f"{med([s.wrk.non2xx for s in samples]):>9.0f} "
            f"{med([s.wrk.socket_errors for s in samples]):>7.0f} "
            f"{fmt(med(cpu_values) if cpu_values else None, '.1f'):>10} "
            f"{med([s.cmds_per_req for s in samples]):>8.2f} "
            f"{med([s.scripts_per_req for s in samples]):>11.2f} "
            f"{fmt(med(store_values) if store_values else None, '.1f'):>12} "
            + " ".join(f"{med([s.core_util.get(c, 0) for s in samples]):>6.0f}" for c in cores)
            + f"   {q1:.0f}..{q3:.0f}")
    say("")
    say("store commands per request (median over slices; includes the commands run inside "
        "scripts, which INFO commandstats also counts):")
    for arm in shown:
        samples = results.samples.get(arm.name, [])
        if not samples or not any(s.commands for s in samples):
            continue
        command_names = sorted({k for s in samples for k in s.commands})
        parts = [f"{k} {med([s.commands.get(k, 0) / max(s.wrk.requests, 1) for s in samples]):.2f}"
                 for k in command_names]
        say(f"  {arm.name:<9} " + ", ".join(parts))

    # Ratios: from the two arms' slices of the same pass, then median and IQR over passes.
    def per_pass(num: str, den: str, key: Callable[[Sample], float | None]) -> list[float]:
        out = []
        for a, b in zip(results.samples.get(num, []), results.samples.get(den, []), strict=False):
            ka, kb = key(a), key(b)
            if ka and kb:
                out.append(ka / kb)
        return out

    def rps(s: Sample) -> float:
        return s.wrk.rps

    def cpu(s: Sample) -> float | None:
        return s.cpu_us_per_req

    def spread_line(label: str, vals: list[float], spec: str, note: str = "") -> None:
        if not vals:
            return
        q1, q2, q3 = quartiles(vals)
        rel = f"  ±{50 * (q3 - q1) / abs(q2):4.1f} %" if q2 else ""
        say(f"  {label:<34} {q2:7{spec}}   IQR {q1:{spec}}..{q3:{spec}}{rel}{note}")
        if args.verbose:
            say(f"  {'':<34} passes: {', '.join(format(v, spec) for v in vals)}")

    def ratio_line(label: str, num: str, den: str, key: Callable[[Sample], float | None],
                   note: str = "") -> None:
        spread_line(label, per_pass(num, den, key), ".3f", note)

    names = {a.name for a in arms}
    d_arms = [a.name for a in arms if a.name.startswith("D-")]

    def median_rps(name: str) -> float:
        samples = results.samples.get(name, [])
        return med([s.wrk.rps for s in samples]) if samples else 0.0

    best_d = max(d_arms, key=median_rps) if d_arms else None
    python_proxies = [n for n in ("B", "C", *d_arms) if n in names]
    best_py = max(python_proxies, key=median_rps) if python_proxies else None
    say("")
    say(f"ratios (each from the two arms' slices of the same pass; median, interquartile range "
        f"over {args.runs} passes, ± = half the IQR relative to the median):")
    if {"B", "C"} <= names:
        ratio_line("C/B req/s", "C", "B", rps)
        ratio_line("C/B CPU µs per request", "C", "B", cpu)
        diffs = [a.cpu_us_per_req - b.cpu_us_per_req
                 for a, b in zip(results.samples["C"], results.samples["B"], strict=False)
                 if a.cpu_us_per_req and b.cpu_us_per_req]
        spread_line("limiter cost C-B, CPU µs/request", diffs, ".1f")
    if {"B", "Ccold"} <= names:
        ratio_line("Ccold/B req/s (every request to the store)", "Ccold", "B", rps)
    if {"C", "Ccold"} <= names:
        ratio_line("C/Ccold req/s (leases against a store call each)", "C", "Ccold", rps)
        ratio_line("C/Ccold CPU µs per request", "C", "Ccold", cpu)
    if {"B", "Cfn"} <= names:
        ratio_line("Cfn/B req/s", "Cfn", "B", rps)
    if "Cfn" in names and "C" in names:
        ratio_line("Cfn/C req/s (slots + GBs)", "Cfn", "C", rps)
        ratio_line("Cfn/C CPU µs per request", "Cfn", "C", cpu)
    if "Creject" in names and "C" in names:
        ratio_line("C-reject/C req/s", "Creject", "C", rps)
        ratio_line("C-reject/C CPU µs per request", "Creject", "C", cpu)
    if "C" in names and best_d:
        ratio_line(f"C/{best_d} req/s (best D)", "C", best_d, rps)
        ratio_line(f"C/{best_d} CPU µs per request", "C", best_d, cpu)
    if "A" in names and best_py:
        vals = per_pass("A", best_py, rps)
        ok = vals and med(vals) >= 3.0
        ratio_line(f"A/{best_py} req/s (best Python proxy)", "A", best_py, rps,
                   "   OK (>= 3x)" if ok else
                   "   WARNING: < 3x, the upstream/harness may cap the proxy arms")
    if "A" in names and "N" in names:
        ratio_line("A/N req/s", "A", "N", rps,
                   "   (N near A: nginx is upstream-bound, its req/s is a floor)"
                   if med(per_pass("A", "N", rps) or [9]) < 1.5 else "")
    if {"B", "N"} <= names:
        ratio_line("B/N req/s", "B", "N", rps)
        ratio_line("B/N CPU µs per request", "B", "N", cpu)
    if {"P", "C"} <= names:
        ratio_line("P/C req/s (target >= 1.5)", "P", "C", rps)
        ratio_line("P/C quotagate CPU µs per request", "P", "C", cpu)
    if {"P", "N"} <= names:
        ratio_line("P/N req/s", "P", "N", rps)
    checks = []
    for arm in shown:
        samples = results.samples.get(arm.name, [])
        ticks = sum(s.cpu_ticks_s or 0 for s in samples)
        sched = sum(s.cpu_sched_s or 0 for s in samples)
        if ticks and sched:
            checks.append(f"{arm.name} {100 * (sched / ticks - 1):+.1f} %")
    if checks:
        say("")
        say("CPU source: schedstat (ns) per slice; its totals vs /proc stat ticks (should be "
            "within ~1 %): " + ", ".join(checks))
    say("")
    say(f"wrk commands (measured slice; the warm-ups are the same with -d"
        f"{math.ceil(args.slice_warmup or 1)}s stopped by SIGINT after {args.slice_warmup:g} s):")
    for arm in shown:
        say(f"  {arm.name:<9} {commands[arm.name]}")
    say("")
    for arm in shown:
        say(f"  {arm.name:<9} {arm.description}")
    return lines

