"""Open-loop latency at a fixed rate: what quotagate adds to p50 / p99 at half of B's
saturation rate (BENCH.md: no coordinated omission — latency counts from the scheduled send).

    .venv/bin/python loadtests/latency.py [--runs 5] [--seconds 5] [--rate R] [--hot-rate N]

Processes as in bench.py: the demo upstream and Valkey on core 0 with this client, each gateway
(B: enforcement off; C: enforced, on the plain route, and Cfn: on the function route with a
concurrency slot and GBs metering) pinned to core 1. Each run first measures B's saturation
rate with wrk (2 s; unless --rate is given: the machine drifts by tens of percent within a
minute, so it is measured again every run), then sends half of it, requests per second, for
--seconds to A (upstream direct), B, C and Cfn in turn (order rotating), every request at its
scheduled instant whatever the previous ones do, on a pool of keep-alive connections. The client
speaks HTTP/1.1 on raw asyncio protocols: an HTTP library would cost the shared core several times
as much per request and its queueing would show up as latency.
Reported: medians over runs of each arm's p50, p99 and p99.9 (from the actual send, and from the
scheduled instant), and the latency each arm adds to the one below it, from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import ENV_OK, LOADTESTS, PATH, PLAIN_PATH, PY, write_configs
from benchkit.procs import Children, wait_http
from benchkit.store_stats import StoreStats, script_calls
from benchkit.wrk import parse_wrk, run_wrk

from quotagate.limiter.embedded import EmbeddedValkey, free_port


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight. Responses are
    read with the least parsing that is still exact (status line, Content-Length or chunked),
    so the client costs the shared core far less than an HTTP library would."""

    def __init__(self, pool: _Pool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = self.sent = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, due: float) -> None:
        self.busy, self.due = True, due
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.busy:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buf[:head_end]).lower()
            status = int(head[9:12])
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                length = int(head[at + 17:head.find(b"\r\n", at + 2) if
                                  head.find(b"\r\n", at + 2) > 0 else None])
                total = head_end + 4 + length
                if len(self.buf) < total:
                    return
            else:  # chunked: the body ends with the last chunk
                tail = self.buf.find(b"\r\n0\r\n\r\n", head_end)
                if tail < 0:
                    return
                total = tail + 7
            del self.buf[:total]
            self.busy = False
            self.pool.done(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self)


class _Pool:
    def __init__(self, host: str, port: int, request: bytes):
        self.host, self.port, self.request = host, port, request
        self.idle: list[_Conn] = []
        self.latencies: list[float] = []  # from the scheduled instant
        self.service: list[float] = []  # from the actual send
        self.failures = 0
        self.pending = 0
        self.finished: asyncio.Future[None] | None = None
        #: Requests due before this instant are sent but not recorded (the warm-up).
        self.record_from = 0.0

    async def open(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            self.idle.append(conn)

    async def send(self, due: float) -> None:
        self.pending += 1
        if self.idle:
            conn = self.idle.pop()
        else:  # all busy: one more connection (its set-up counts in the latency)
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        conn.send(self.request, due)

    def _record(self, conn: _Conn, ok: bool) -> None:
        if conn.due >= self.record_from:
            now = time.perf_counter()
            self.latencies.append((now - conn.due) * 1000)
            self.service.append((now - conn.sent) * 1000)
            if not ok:
                self.failures += 1
        self._finish_one()

    def done(self, conn: _Conn, status: int) -> None:
        self.idle.append(conn)
        self._record(conn, status == 200)

    def lost(self, conn: _Conn) -> None:
        if conn.busy:
            self._record(conn, False)
        if conn in self.idle:
            self.idle.remove(conn)

    def _finish_one(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


async def open_loop(url: str, rate: float, seconds: float, conns: int, warmup: float = 0.0
                    ) -> tuple[list[float], list[float], int]:
    """Latencies (ms) from each request's scheduled instant and from its actual send, and
    the count of failures.

    Requests leave at their scheduled instants whatever the earlier ones do. Timers fire with
    about 1 ms resolution, so every request due by then leaves together: counted from the
    schedule, each latency carries up to 1 ms of that wait, the same in every arm; counted
    from the send, it does not (and no response is waited for before a send either way).
    The first ``warmup`` seconds are sent at the same rate and not recorded (the gateway has
    just accepted the connections)."""
    parts = urlsplit(url)
    request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"X-CloudBase-Env: {ENV_OK}\r\n\r\n").encode()
    pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80, request)
    await pool.open(conns)
    total = int(rate * (seconds + warmup))
    start = time.perf_counter() + 0.05
    pool.record_from = start + warmup
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total and start + i / rate <= now:
            await pool.send(start + i / rate)
            i += 1
        if i < total:
            # Never less than a timer tick: a shorter sleep returns at once, and the client
            # would spin on the core it shares with the upstream and the store.
            await asyncio.sleep(max(0.001, start + i / rate - time.perf_counter()))
    if pool.pending:
        pool.finished = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(pool.finished, 30)
    for conn in pool.idle:
        if conn.transport is not None:
            conn.transport.close()
    return pool.latencies, pool.service, pool.failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=0.0, help="requests/s (default: B's / 2)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--hot-rate", type=int, default=None,
                   help="C's gateway.hot_rate (default: the configs' 2,000): below the open "
                        "loop's rate, C's environment is decided from leases")
    p.add_argument("--warmup", type=float, default=0.25,
                   help="seconds sent at the rate before each arm's measured seconds")
    args = p.parse_args(argv)
    import os

    os.sched_setaffinity(0, {0})
    tmp = Path(tempfile.mkdtemp(prefix="qg-latency-"))
    children = Children(tmp)
    try:
        up_port = free_port()
        children.start("upstream", [PY, str(LOADTESTS / "upstream_proc.py"),
                                    str(up_port)], "0")
        wait_http(up_port, None, 20, "upstream", children)
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
        children.valkey = valkey.start()
        assert valkey.process is not None
        os.sched_setaffinity(valkey.process.pid, {0})
        configs = write_configs(tmp, up_port, valkey.url)
        if args.hot_rate is not None:
            enforce = yaml.safe_load(configs["enforce"].read_text())
            configs["enforce"].write_text(yaml.safe_dump(dict(enforce, hot_rate=args.hot_rate),
                                                         sort_keys=False))
        stats = StoreStats(valkey.url)
        #: C's requests and the store's script calls while C ran (leased: far below 1)
        c_requests = c_scripts = 0
        ports = {"A": up_port}
        for arm, mode in (("B", "off"), ("C", "enforce")):
            ports[arm] = int(yaml.safe_load(configs[mode].read_text())["listen"].rsplit(":")[1])
            children.start(f"gateway-{mode}", [PY, str(LOADTESTS / "gateway_proc.py"),
                                               str(configs[mode]), valkey.url], "1")
            wait_http(ports[arm], ENV_OK, 30, f"gateway {mode}", children)

        def saturation(samples: int) -> float:
            """B's saturation rate: the median of ``samples`` 2 s wrk runs."""
            rates = []
            for _ in range(samples):
                out = run_wrk(["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d2s",
                               "--latency", "-H", f"X-CloudBase-Env: {ENV_OK}",
                               f"http://127.0.0.1:{ports['B']}{PATH}"], 2)
                rates.append(parse_wrk(out).rps)
            return statistics.median(rates)

        # The machine's speed drifts by tens of percent within a minute: without --rate, B's
        # saturation is measured again before every run, and that run's rate is half of it.
        rate = args.rate
        # arm -> (port, path): C is BENCH.md's C (enforced, one script call per request);
        # Cfn adds a function concurrency slot and GBs metering.
        targets = {"A": (ports["A"], PATH), "B": (ports["B"], PATH),
                   "C": (ports["C"], PLAIN_PATH), "Cfn": (ports["C"], PATH)}
        arms = list(targets)
        results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
        #: every latency of every run, per arm: (from schedule, from send)
        pooled: dict[str, tuple[list[float], list[float]]] = {arm: ([], []) for arm in arms}
        rates: list[float] = []
        for run in range(args.runs):
            if not args.rate:
                sat = saturation(1)
                rate = sat / 2
                print(f"run {run + 1}: B saturates at {sat:.0f} req/s (wrk -c64 -d2s): open "
                      f"loop at {rate:.0f} req/s", flush=True)
            rates.append(rate)
            k = run % len(arms)
            for arm in arms[k:] + arms[:k]:
                port, path = targets[arm]
                url = f"http://127.0.0.1:{port}{path}"
                before = stats.snapshot()
                lat, service, failed = uvloop.run(
                    open_loop(url, rate, args.seconds, args.connections, args.warmup))
                if arm == "C":
                    c_requests += len(service)
                    c_scripts += script_calls({f"cmdstat_{k}": {"calls": v} for k, v in
                                               StoreStats.delta(before, stats.snapshot()).items()})
                pooled[arm][0].extend(lat)
                pooled[arm][1].extend(service)
                row = {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "p999": pct(lat, 0.999),
                       "s50": pct(service, 0.5), "s99": pct(service, 0.99),
                       "s999": pct(service, 0.999), "failed": failed}
                results[arm].append(row)
                print(f"run {run + 1} {arm:<3}: from send p50 {row['s50']:.3f} p99 "
                      f"{row['s99']:.3f} p99.9 {row['s999']:.3f} ms | from schedule p50 "
                      f"{row['p50']:.3f} p99 {row['p99']:.3f} ms | {failed} failed", flush=True)

        def m(arm: str, key: str) -> float:
            return statistics.median(r[key] for r in results[arm])

        print(f"\nopen loop at {min(rates):.0f}..{max(rates):.0f} req/s (median "
              f"{statistics.median(rates):.0f}), {args.seconds:g} s per arm per run, "
              f"{args.runs} runs, medians (ms):")
        print(f"  {'arm':<4} {'p50':>7} {'p99':>7} {'p99.9':>7}   from schedule: "
              f"{'p50':>7} {'p99':>7} {'p99.9':>7}  failed")
        for arm in arms:
            print(f"  {arm:<4} {m(arm, 's50'):7.3f} {m(arm, 's99'):7.3f} {m(arm, 's999'):7.3f}"
                  f"                  {m(arm, 'p50'):7.3f} {m(arm, 'p99'):7.3f} "
                  f"{m(arm, 'p999'):7.3f}  {m(arm, 'failed'):.0f}")
        print(f"  C: {c_scripts / max(c_requests, 1):.4f} store script calls per request "
              "(1.0: decided by the store each; far below: from leases)")
        print("added latency (each from the two arms of the same run; median over runs, ms):")
        def added(arm: str, base: str, key: str) -> float:
            return statistics.median(
                c[key] - b[key] for c, b in zip(results[arm], results[base], strict=True))

        for arm, base in (("B", "A"), ("C", "B"), ("Cfn", "B"), ("C", "A")):
            print(f"  {arm:>3} - {base}: from send p50 {added(arm, base, 's50'):+.3f} p99 "
                  f"{added(arm, base, 's99'):+.3f} | from schedule p50 "
                  f"{added(arm, base, 'p50'):+.3f} p99 {added(arm, base, 'p99'):+.3f}")
        print("all runs pooled (every request of an arm, whatever its run: with many short "
              "runs the arms saw the same mix of the machine's states), ms:")
        for arm in arms:
            sched, sent = pooled[arm]
            print(f"  {arm:<4} n {len(sent):>7,}  from send p50 {pct(sent, 0.5):.3f} p99 "
                  f"{pct(sent, 0.99):.3f} p99.9 {pct(sent, 0.999):.3f} | from schedule p50 "
                  f"{pct(sched, 0.5):.3f} p99 {pct(sched, 0.99):.3f}")
        for arm, base in (("B", "A"), ("C", "B"), ("Cfn", "B")):
            (a_sched, a_sent), (b_sched, b_sent) = pooled[arm], pooled[base]
            print(f"  {arm:>3} - {base}: from send p50 "
                  f"{pct(a_sent, 0.5) - pct(b_sent, 0.5):+.3f} p99 "
                  f"{pct(a_sent, 0.99) - pct(b_sent, 0.99):+.3f} | from schedule p50 "
                  f"{pct(a_sched, 0.5) - pct(b_sched, 0.5):+.3f} p99 "
                  f"{pct(a_sched, 0.99) - pct(b_sched, 0.99):+.3f}")
        return 0
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
