"""Saturation benchmark of quotagate against its baselines, on one machine (see
/work/shared/BENCH.md and loadtests/README.md).

    .venv/bin/python loadtests/bench.py [--runs 10] [--slice 2] [--slice-warmup 0.5]
                                        [--connections 64] [--arms A,B,C,Cfn,Creject,D,N]

Arms (same upstream, same client, same concurrency):
  A        wrk -> demo upstream directly
  B        wrk -> quotagate (enforcement: off) -> upstream
  C        wrk -> quotagate (enforcement: enforce, never refuses) -> upstream; Valkey store.
           BENCH.md's C: one script call per request (QPS and the calls quota), on a function
           route without concurrency slots or GBs metering (``concurrency: false, meter: none``)
  Cfn      as C on a function route with a concurrency slot per invocation and GBs metering
           (the defaults): the slot is given back and the GBs charged after the response, in
           a second script call coalesced per environment per loop tick. Cfn/C is their cost
  Creject  as C, every other request from an environment whose calls quota is 0 (refused)
  D        wrk -> aiohttp passthrough deciding with the `limits` library -> upstream; sub-arms
           D-fixed, D-moving, D-sliding (async Redis strategies against the same Valkey)
  N        wrk -> nginx proxy_pass (keepalive 32, 1 worker) -> upstream   (if nginx is installed)
  P        plugin mode: wrk -> nginx auth_request (deploy/nginx/quotagate.conf) -> quotagate's
           decision service (authz_listen), then nginx proxy_pass -> upstream; nginx and
           quotagate share the proxy core; CPU per request is quotagate's

Every proxy is its own process pinned to one core (``taskset -c 1``); wrk is pinned to core 0
(``taskset -c 0 wrk -t1 -c64 -d2s --latency``), the upstream and Valkey too (``--aux-cpus``).

The machine's speed drifts by tens of percent over tens of seconds (other tenants), so arms are
measured in short interleaved slices: every arm's processes run for the whole bench and are
warmed up once; then each of ``--runs`` passes measures every arm for ``--slice`` seconds, one
after another (after a ``--slice-warmup`` of load), in an order that alternates forward and
reversed. Each ratio is computed from the two arms' slices of the same pass (seconds apart), and
the report gives its median and interquartile range over passes; the table gives per-arm
medians over slices. Every child process is killed on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml

from quotagate.demo.staging import staged_nginx
from quotagate.limiter.embedded import EmbeddedValkey, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLANS_FILE = ROOT / "config" / "plans.yaml"
PY = sys.executable
PATH = "/functions/bench"
ENV_OK = "bench-ok"
ENV_EMPTY = "bench-empty"
D_STRATEGIES = ("fixed", "moving", "sliding")
ALL_ARMS = ("A", "B", "C", "Cfn", "Creject", "D", "N", "P")
PLAIN_PATH = "/plain/bench"
LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")
# Measurement order within a pass (reversed every other pass): the pairs the ratios compare sit
# next to each other (A|N, N|B, B|C, C|D-fixed), so their slices are seconds apart.
MEASURE_ORDER = ("A", "N", "B", "C", "P", "Cfn", "D-fixed", "D-moving", "D-sliding", "Creject")
DISPLAY_ORDER = ("A", "B", "C", "Cfn", "Creject", "D-fixed", "D-moving", "D-sliding", "N", "P")
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


# ------------------------------------------------------------------------------ processes


class Children:
    """Every process the benchmark starts; each in its own session so its whole group dies."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.valkey: EmbeddedValkey | None = None

    def start(self, name: str, argv: list[str], cpus: str | None) -> subprocess.Popen[bytes]:
        cmd = (["taskset", "-c", cpus] if cpus else []) + argv
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n"
                                   f"{self.log_tail(name)}")

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None


def wait_http(port: int, env: str | None, timeout: float, what: str, children: Children) -> None:
    """Until GET PATH on the port answers 200 (the gateway has synced its environments)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", PATH, headers={"X-CloudBase-Env": env} if env else {})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{what} on port {port} not ready after {timeout:.0f} s: {last}")


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (nginx: master + worker)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime (clock ticks) of these processes, all threads, living and exited."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total


HAVE_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def cpu_ns(pids: list[int]) -> int:
    """On-CPU nanoseconds of these processes' living threads (/proc/<pid>/task/*/schedstat).

    Ticks (10 ms) are too coarse for 2 s slices (a 0.5 % step per slice); schedstat is exact,
    but forgets threads that exit, so the report cross-checks its totals against the ticks."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                nums = [int(v) for v in vals[:8]]
                idle = nums[3] + nums[4]
                out[name] = (sum(nums) - idle, sum(nums))
    return out


# ------------------------------------------------------------------------------ store stats


class StoreStats:
    def __init__(self, url: str, pid: int | None = None):
        self.client = redis.Redis.from_url(url)
        self.client.ping()
        #: The store's process, whose CPU per request the report gives.
        self.pid = pid

    def snapshot(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        # INFO itself is the only command the benchmark sends during a run.
        return {k: after[k] - before.get(k, 0) for k in after
                if k != "info" and after[k] - before.get(k, 0) > 0}

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------ wrk


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int


def parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=rps,
        requests=requests,
        p50_ms=_to_ms(lat["50"]),
        p99_ms=_to_ms(lat["99"]),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


ALTERNATE_LUA = f"""\
-- Alternate X-CloudBase-Env between an admitted and a refused environment (arm C-reject).
local reqs = {{}}
local n = 0
function init(args)
  reqs[1] = wrk.format(nil, nil, {{["X-CloudBase-Env"] = "{ENV_OK}"}})
  reqs[2] = wrk.format(nil, nil, {{["X-CloudBase-Env"] = "{ENV_EMPTY}"}})
end
function request()
  n = n + 1
  return reqs[n % 2 + 1]
end
"""


# ------------------------------------------------------------------------------ arms


@dataclass
class Arm:
    name: str
    port: int
    pid: int | None  # the proxy process whose CPU is measured (None for A)
    wrk_args: list[str]
    description: str
    path: str = PATH


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


def write_configs(tmp: Path, upstream_port: int, store_url: str) -> dict[str, Path]:
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    expires = anchor.replace(year=anchor.year + 1)
    env_common = {"plan": "enterprise", "anchor": anchor, "expires": expires, "overage": False}
    environments = {"environments": {
        ENV_OK: {**env_common, "limits": {"qps": 10_000_000, "calls": 10**12}},
        ENV_EMPTY: {**env_common, "limits": {"qps": 10_000_000, "calls": 0}},
    }}
    (tmp / "environments.yaml").write_text(yaml.safe_dump(environments, sort_keys=False))
    paths = {}
    for mode in ("off", "enforce"):
        gateway = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "store": {"url": store_url, "timeout_ms": 200},
            "enforcement": mode,
            "timezone": "Asia/Shanghai",
            "plans_file": str(PLANS_FILE),
            "environments_file": str(tmp / "environments.yaml"),
            "routes": [{"prefix": "/functions/", "upstream": f"http://127.0.0.1:{upstream_port}",
                        "kind": "function"},
                       {"prefix": "/plain/", "upstream": f"http://127.0.0.1:{upstream_port}",
                        "kind": "function", "concurrency": False, "meter": "none"}],
        }
        paths[mode] = tmp / f"gateway-{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump(gateway, sort_keys=False))
    return paths


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    ndir = tmp / "nginx"
    ndir.mkdir()
    conf = ndir / "nginx.conf"
    conf.write_text(f"""\
user root;
worker_processes 1;
daemon off;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    proxy_temp_path {ndir}/proxy;
    fastcgi_temp_path {ndir}/fastcgi;
    uwsgi_temp_path {ndir}/uwsgi;
    scgi_temp_path {ndir}/scgi;
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    return conf


def wrk_command(args: argparse.Namespace, port: int, seconds: int, extra: list[str],
                path: str = PATH) -> list[str]:
    return ["taskset", "-c", args.client_cpu, "wrk", "-t1", f"-c{args.connections}",
            f"-d{seconds}s", "--latency", *extra, f"http://127.0.0.1:{port}{path}"]


def run_wrk(cmd: list[str], seconds: int) -> str:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:  # timeout, Ctrl-C, SIGTERM: never leave wrk behind
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    return out


def warm_up(args: argparse.Namespace, arm: Arm, seconds: float) -> None:
    """Load the arm for `seconds`, unmeasured. wrk takes whole seconds only, so it runs with
    -d<ceil>s and is stopped with SIGINT (it then exits cleanly within 0.1 s)."""
    if seconds <= 0:
        return
    cmd = wrk_command(args, arm.port, math.ceil(seconds), arm.wrk_args, arm.path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


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


# ------------------------------------------------------------------------------ report


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


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
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
                   help="comma-separated subset of A,B,C,Creject,D,N,P, or D-fixed/D-moving/"
                        "D-sliding (default: all; N and P are skipped without nginx)")
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
        if name == "D":
            out.extend(f"D-{s}" for s in D_STRATEGIES)
        elif name in ALL_ARMS or name in {f"D-{s}" for s in D_STRATEGIES}:
            out.append(name)
        else:
            raise SystemExit(f"unknown arm {name!r} (A, B, C, Creject, D, D-fixed, D-moving, "
                             "D-sliding, N, P)")
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("error: wrk is not installed (it is the load generator of this benchmark).\n"
              "       install it with: apt-get update && apt-get install -y wrk",
              file=sys.stderr)
        return 2
    if not shutil.which("taskset"):
        print("error: taskset (util-linux) is not installed", file=sys.stderr)
        return 2
    wanted = select_arms(args.arms)
    if "N" in wanted and not shutil.which("nginx"):
        print("note: nginx not found, skipping arm N (apt-get install -y nginx)", file=sys.stderr)
        wanted.remove("N")
    if "P" in wanted and not (shutil.which("nginx") and LUA_MODULE.exists()):
        print("note: nginx or its lua module not found, skipping arm P (scripts/nginx "
              "installs them)", file=sys.stderr)
        wanted.remove("P")
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
            argv_up = [PY, str(HERE / "upstream_proc.py"), str(up_port)]
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
        lua = tmp / "alternate.lua"
        lua.write_text(ALTERNATE_LUA)
        header = ["-H", f"X-CloudBase-Env: {ENV_OK}"]

        arms: list[Arm] = []
        up_desc = f"demo upstream, {args.upstream_procs} uvloop process(es) on cpu {args.aux_cpus}"
        if "A" in wanted:
            arms.append(Arm("A", up_port, None, header, f"wrk -> {up_desc}"))
        if "B" in wanted:
            cfg = yaml.safe_load(configs["off"].read_text())
            port = int(cfg["listen"].rsplit(":", 1)[1])
            proc = children.start("gateway-off", [PY, str(HERE / "gateway_proc.py"),
                                                  str(configs["off"]), valkey.url], args.proxy_cpu)
            wait_http(port, ENV_OK, 30, "gateway (off)", children)
            arms.append(Arm("B", port, proc.pid, header,
                            "quotagate, enforcement: off (no store calls) -> upstream"))
        if "C" in wanted or "Creject" in wanted or "Cfn" in wanted:
            cfg = yaml.safe_load(configs["enforce"].read_text())
            port = int(cfg["listen"].rsplit(":", 1)[1])
            proc = children.start("gateway-enforce", [PY, str(HERE / "gateway_proc.py"),
                                                      str(configs["enforce"]), valkey.url],
                                  args.proxy_cpu)
            wait_http(port, ENV_OK, 30, "gateway (enforce)", children)
            if "C" in wanted:
                arms.append(Arm("C", port, proc.pid, header,
                                f"quotagate, enforcement: enforce, env {ENV_OK} (enterprise, "
                                "qps 1e7, calls 1e12: never refused), Valkey on TCP, on "
                                f"{PLAIN_PATH}: no concurrency slot, no GBs metering",
                                PLAIN_PATH))
            if "Cfn" in wanted:
                arms.append(Arm("Cfn", port, proc.pid, header,
                                f"as C on {PATH}: a function route with a concurrency slot "
                                "and GBs metering"))
            if "Creject" in wanted:
                arms.append(Arm("Creject", port, proc.pid, ["-s", str(lua)],
                                f"as C, alternating {ENV_OK} / {ENV_EMPTY} (calls 0, no overage:"
                                " refused) via a wrk Lua script", PLAIN_PATH))
        for strategy in D_STRATEGIES:
            name = f"D-{strategy}"
            if name not in wanted:
                continue
            port = free_port()
            host_port = valkey.url.removeprefix("redis://").split("/")[0]
            proc = children.start(name, [
                PY, str(HERE / "limits_proxy.py"), "--port", str(port),
                "--upstream", f"http://127.0.0.1:{up_port}",
                "--storage", f"async+redis://{host_port}", "--strategy", strategy,
                "--limit", args.d_limit], args.proxy_cpu)
            wait_http(port, ENV_OK, 30, name, children)
            arms.append(Arm(name, port, proc.pid, header,
                            f"aiohttp passthrough (quotagate's UpstreamPool) + limits "
                            f"{strategy} window ({args.d_limit}, redis-py) -> upstream"))
        if "N" in wanted:
            port = free_port()
            conf = nginx_conf(tmp, port, up_port)
            proc = children.start("nginx", ["nginx", "-p", str(conf.parent), "-c", str(conf),
                                            "-e", str(conf.parent / "error.log")],
                                  args.proxy_cpu)
            wait_http(port, ENV_OK, 20, "nginx", children)
            arms.append(Arm("N", port, proc.pid, header,
                            "nginx proxy_pass, 1 worker, upstream keepalive 32, HTTP/1.1, "
                            "access_log off"))
        if "P" in wanted:
            # Plugin mode: the shipped deploy/nginx/quotagate.conf, its auth_request asking a
            # quotagate decision service (no proxy of its own in the path), on the proxy's core.
            cfg = yaml.safe_load(configs["enforce"].read_text())
            authz = free_port()
            cfg["authz_listen"] = f"127.0.0.1:{authz}"
            cfg["listen"] = f"127.0.0.1:{free_port()}"  # (C's gateway has the other one)
            authz_config = tmp / "gateway-authz.yaml"
            authz_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
            proc = children.start("gateway-authz", [PY, str(HERE / "gateway_proc.py"),
                                                    str(authz_config), valkey.url],
                                  args.proxy_cpu)
            wait_http(int(cfg["listen"].rsplit(":", 1)[1]), ENV_OK, 30, "gateway (authz)",
                      children)
            port = free_port()
            conf = staged_nginx(tmp / "nginx-p", listen=port, authz=authz,
                                proxy=int(cfg["listen"].rsplit(":", 1)[1]), upstream=up_port)
            children.start("nginx-p", ["nginx", "-p", str(conf.parent), "-c", str(conf),
                                       "-g", "daemon off;"], args.proxy_cpu)
            wait_http(port, ENV_OK, 20, "nginx (auth_request)", children)
            arms.append(Arm("P", port, proc.pid, header,
                            "deploy/nginx/quotagate.conf: nginx (1 worker) auth_request -> "
                            "quotagate decision service (authz_listen) -> proxy_pass upstream, "
                            f"both on cpu {args.proxy_cpu}, on {PLAIN_PATH}; CPU per request is "
                            "quotagate's (nginx's not counted)", PLAIN_PATH))
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


if __name__ == "__main__":
    sys.exit(main())
