"""Run the Locust scenarios headless against a quotagate deployment, check the outcome against
the configured limits, and draw admitted vs refused per second per tenant.

    .venv/bin/python loadtests/run_locust.py [--time 60s] [--users 40] [--out loadtests/out]
    .venv/bin/python loadtests/run_locust.py --host https://gw.example --tenants FILE [...]

Without ``--host``: starts an embedded Valkey, the demo upstream and one gateway
(loadtests/gateway_proc.py) with the scenario's own tenants, runs ``locust --headless`` (CSV +
HTML report in --out), then checks:

- every QPS tenant: admitted per second never above its limit + its burst allowance, and over
  the run at most limit x seconds + burst (the GCRA bound of docs/operations.md);
- the burner: the store's plan usage equals its quota, its pack is used up exactly, and its
  pay-as-you-go equals what was admitted beyond plan + pack;
- the AI tenant: 50 calls in the store per chat admitted;
- the realtime tenant: the store never reports more open watches than the cap (sampled), and
  none is left once the sockets close;
- no error outcomes (5xx, broken streams).

With ``--host``: loads that deployment, with the environments and limits of the ``--tenants``
file (loadtests/tenants.example.yaml), and checks what a client can see: the QPS bounds, the
realtime cap (never more watches open at once than it), no errors. The store checks need the
store and are made on the runner's own stack only.

Writes outcomes.json, checks.json and admitted_refused.png next to Locust's files; exits 1 if a
check fails, 2 if the run could not be made (a bad tenants file, an unreachable host).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zoneinfo
from collections import defaultdict
from pathlib import Path
from typing import TypedDict

import msgspec
import redis
import yaml

from quotagate.common.calendar import day_number
from quotagate.common.envids import ENV_ID
from quotagate.demo.staging import shipped_routes, wait_ready_blocking
from quotagate.limiter import keys
from quotagate.limiter.embedded import EmbeddedValkey, free_port, free_ports

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BURST_MS = 100
QPS_TENANTS = {"t-free": 5, "t-personal": 10, "t-standard": 20, "t-enterprise": 40}
class Burner(TypedDict):
    env: str
    calls: int
    pack: int


BURNER: Burner = {"env": "burner", "calls": 300, "pack": 200}
LIVE_CAP = 10


class Tenant(msgspec.Struct, forbid_unknown_fields=True):
    env: str


class Live(msgspec.Struct, forbid_unknown_fields=True):
    env: str
    cap: int  # the environment's realtime watch cap in that deployment


class Tenants(msgspec.Struct, forbid_unknown_fields=True):
    """``--tenants``: the environments of a deployment to load, and the limits they have."""

    qps: dict[str, int]  # env id: its QPS limit
    burst_ms: int = 100  # the deployment's qps_burst_ms
    chat: Tenant | None = None
    live: Live | None = None
    burner: Tenant | None = None
    paths: dict[str, str] = {}  # qps, burner, chat, live: the paths they request
    chat_events: int | None = None  # data: events in a whole chat stream; None: any


def read_tenants(path: Path) -> Tenants:
    """The tenants file, or SystemExit naming what is wrong with it."""
    try:
        tenants = msgspec.yaml.decode(path.read_bytes(), type=Tenants, strict=True)
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read: {exc.strerror}") from None
    except msgspec.ValidationError as exc:
        raise SystemExit(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SystemExit(f"{path}: not YAML: {exc}") from None
    envs = [*tenants.qps, *(t.env for t in (tenants.chat, tenants.live, tenants.burner) if t)]
    bad = [e for e in envs if not ENV_ID.fullmatch(e)]
    if bad:
        raise SystemExit(f"{path}: not environment ids: {', '.join(map(repr, bad))}")
    if not tenants.qps or any(limit < 1 for limit in tenants.qps.values()):
        raise SystemExit(f"{path}: qps: name at least one environment, each with a limit >= 1")
    if tenants.burst_ms < 0 or (tenants.live and tenants.live.cap < 0):
        raise SystemExit(f"{path}: burst_ms and live.cap are >= 0")
    unknown = set(tenants.paths) - {"qps", "burner", "chat", "live"}
    if unknown or any(not p.startswith("/") for p in tenants.paths.values()):
        raise SystemExit(f"{path}: paths: keys are qps, burner, chat, live; each starts with /")
    return tenants


def write_config(tmp: Path, up_port: int, store_url: str) -> tuple[Path, int, int]:
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    period = {"anchor": anchor.isoformat(),
              "expires": anchor.replace(year=anchor.year + 1).isoformat()}
    plans = ("free", "personal", "standard", "enterprise")
    envs: dict[str, dict[str, object]] = {env: {"plan": plan, **period, "limits": {"qps": qps}}
            for (env, qps), plan in zip(QPS_TENANTS.items(), plans, strict=True)}
    envs[BURNER["env"]] = {"plan": "personal", **period, "overage": True,
                           "limits": {"calls": BURNER["calls"], "qps": 100_000},
                           "packs": [{"id": "b1", "meter": "calls", "amount": BURNER["pack"],
                                      "purchased": today.isoformat()}]}
    envs["chat"] = {"plan": "standard", **period, "overage": True, "limits": {"qps": 100_000}}
    envs["live"] = {"plan": "standard", **period,
                    "limits": {"realtime": LIVE_CAP, "qps": 100_000}}
    (tmp / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))
    port, admin = free_ports(2)
    up = f"http://127.0.0.1:{up_port}"
    gateway = {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "store": {"url": store_url}, "plans_file": str(ROOT / "config" / "plans.yaml"),
        "environments_file": str(tmp / "environments.yaml"), "qps_burst_ms": BURST_MS,
        # As shipped (realtime at /, AI streams at stream_cost 50), to this upstream.
        "routes": shipped_routes(up),
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway))
    return path, port, admin


Outcomes = dict[tuple[str, str], dict[int, int]]


def by_tenant(outcomes: list[dict]) -> Outcomes:
    per: Outcomes = defaultdict(lambda: defaultdict(int))
    for row in outcomes:
        per[(row["tenant"], row["outcome"])][row["second"]] += row["count"]
    return per


def _add(results: list[dict], name: str, ok: bool, detail: str) -> None:
    results.append({"check": name, "ok": bool(ok), "detail": detail})


def check_seen(outcomes: list[dict], qps_tenants: dict[str, int], burst_ms: int,
               live: tuple[str, int] | None, client_watch_peak: int) -> list[dict]:
    """What a client sees: each QPS tenant within its bounds, the clients never holding more
    watches open than the cap, no errors."""
    per = by_tenant(outcomes)
    seconds = max((row["second"] for row in outcomes), default=0) + 1
    results: list[dict] = []

    def add(name: str, ok: bool, detail: str) -> None:
        _add(results, name, ok, detail)

    for env, qps in qps_tenants.items():
        admitted = per[(env, "admitted")]
        burst = qps * burst_ms // 1000 + 1
        worst = max(admitted.values(), default=0)
        total = sum(admitted.values())
        refused = sum(per[(env, "refused")].values())
        add(f"{env} per second", worst <= qps + burst,
            f"max admitted in one second {worst}, limit {qps} + burst {burst}")
        # Offered above the limit, some must have been refused (if the load generator could
        # not offer that much, there is nothing to refuse).
        over = total + refused > qps * seconds + burst
        add(f"{env} over the run", total <= qps * seconds + burst and (refused > 0 or not over),
            f"admitted {total} in {seconds} s (bound {qps * seconds + burst}), refused {refused}"
            f"{'' if over else ' (offered no more than the limit)'}")
    if live is not None:
        env, cap = live
        opened = sum(per[(env, "watch-admitted")].values())
        add("watches held by the clients at the cap", opened > 0 and client_watch_peak <= cap,
            f"{opened} watches opened, at most {client_watch_peak} open at once (cap {cap})")
    errors = sum(n for (_, outcome), by in per.items() if outcome == "error"
                 for n in by.values())
    add("no errors", errors == 0, f"{errors} error outcomes")
    return results


def check_store(outcomes: list[dict], r: redis.Redis, watch_peak: int, users: int
                ) -> list[dict]:
    """The runner's own stack: what the store counted."""
    per = by_tenant(outcomes)
    results: list[dict] = []

    def add(name: str, ok: bool, detail: str) -> None:
        _add(results, name, ok, detail)

    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    cycle, day = day_number(today.replace(day=1)), day_number(today)
    env = BURNER["env"]
    burned = sum(per[(env, "admitted")].values())
    plan_used = int(r.hget(keys.usage(env), f"{cycle}:calls") or 0)
    pack_used = int(r.hget(keys.pack_usage(env), "b1") or 0)
    payg = int(r.hget(keys.payg(env), f"{day}:calls") or 0)
    # Requests in flight when Locust stops are counted by the store but never seen by the
    # client: at most one per user. How far the burner gets in the run depends on the
    # machine (a loaded one may not reach pay-as-you-go): what must hold is the order — the
    # pack only once the plan is used up, pay-as-you-go only once the pack is — and that
    # every call the clients saw admitted was counted once.
    counted = plan_used + pack_used + payg
    in_order = (plan_used <= BURNER["calls"] and pack_used <= BURNER["pack"]
                and (pack_used == 0 or plan_used == BURNER["calls"])
                and (payg == 0 or pack_used == BURNER["pack"]))
    add("burner waterfall", burned > 0 and in_order and burned <= counted <= burned + users,
        f"admitted {burned}: plan {plan_used}/{BURNER['calls']}, pack {pack_used}/"
        f"{BURNER['pack']}, pay-as-you-go {payg} (counted {counted}; in flight at the "
        f"stop: {counted - burned})")
    chats = sum(per[("chat", "admitted")].values())
    chat_calls = int(r.hget(keys.usage("chat"), f"{cycle}:calls") or 0) + int(
        r.hget(keys.payg("chat"), f"{day}:calls") or 0)
    add("AI chats cost 50 calls", chats > 0 and 50 * chats <= chat_calls <= 50 * (chats + users),
        f"{chats} chats seen by the clients, {chat_calls} calls counted")
    left = int(r.hget(keys.slots("live"), "=rt:") or 0)
    watches = sum(per[("live", "watch-admitted")].values())
    add("watch storm at the cap", watch_peak <= LIVE_CAP and left == 0 and watches > 0,
        f"{watches} watches opened, store peak {watch_peak} (cap {LIVE_CAP}), "
        f"{left} left after the sockets closed")
    return results


def draw(outcomes: list[dict], path: Path, limits: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = sorted({row["tenant"] for row in outcomes})
    fig, axes = plt.subplots(len(tenants), 1, figsize=(10, 2.2 * len(tenants)), sharex=True)
    for ax, tenant in zip(axes if len(tenants) > 1 else [axes], tenants, strict=True):
        for outcome, color in (("admitted", "tab:green"), ("refused", "tab:red")):
            series: defaultdict[int, int] = defaultdict(int)
            for row in outcomes:
                if row["tenant"] == tenant and row["outcome"] == outcome:
                    series[row["second"]] += row["count"]
            xs = sorted(series)
            ax.plot(xs, [series[x] for x in xs], color=color, label=outcome)
        limit = limits.get(tenant)
        if limit:
            ax.axhline(limit, color="gray", linestyle="--", linewidth=1, label=f"limit {limit}")
        ax.set_ylabel("per s")
        ax.set_title(tenant, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right")
    plt.xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_locust(host: str, scenario: dict, classes: list[str], args: argparse.Namespace,
               out: Path) -> tuple[list[dict], int] | None:
    """``locust --headless`` against ``host``; its outcomes and the clients' watch peak (None
    if it wrote none: its output is printed)."""
    cmd = [PY, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time,
           "--host", host, "--csv", str(out / "locust"),
           "--html", str(out / "locust.html"), "--only-summary", *classes]
    env = {**os.environ, "QG_SCENARIO": json.dumps(scenario), "QG_OUT": str(out)}
    for name in ("outcomes.json", "watches.json"):
        (out / name).unlink(missing_ok=True)
    locust = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not (out / "outcomes.json").exists():
        print(locust.stdout[-3000:], locust.stderr[-3000:], file=sys.stderr)
        return None
    return (json.loads((out / "outcomes.json").read_text()),
            json.loads((out / "watches.json").read_text())["peak"])


def report(results: list[dict], outcomes: list[dict], out: Path, limits: dict[str, int]
           ) -> int:
    (out / "checks.json").write_text(json.dumps(results, indent=2))
    draw(outcomes, out / "admitted_refused.png", limits)
    for res in results:
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {res['check']}: {res['detail']}")
    print(f"report: {out / 'locust.html'}, chart: {out / 'admitted_refused.png'}")
    return 0 if all(res["ok"] for res in results) else 1


def run_remote(args: argparse.Namespace, out: Path) -> int:
    """Any deployment: the tenants file names its environments and their limits."""
    tenants = read_tenants(Path(args.tenants))
    scenario: dict[str, object] = {"qps_tenants": list(tenants.qps), "paths": tenants.paths,
                                   "chat_events": tenants.chat_events}
    classes = ["QpsTenant"]
    for name, user_class in (("burner", "QuotaBurner"), ("chat", "AiChat"),
                             ("live", "WatchStorm")):
        tenant = getattr(tenants, name)
        if tenant is not None:
            scenario[name] = tenant.env
            classes.append(user_class)
    ran = run_locust(args.host.rstrip("/"), scenario, classes, args, out)
    if ran is None:
        return 2
    outcomes, client_peak = ran
    live = (tenants.live.env, tenants.live.cap) if tenants.live else None
    results = check_seen(outcomes, tenants.qps, tenants.burst_ms, live, client_peak)
    return report(results, outcomes, out, tenants.qps)


def run_own(args: argparse.Namespace, out: Path) -> int:
    """The runner's own stack: Valkey, the demo upstream and a gateway, checked in the store."""
    tmp = Path(tempfile.mkdtemp(prefix="qg-locust-"))
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
    procs: list[subprocess.Popen] = []
    try:
        valkey.start()
        up_port = free_port()
        procs.append(subprocess.Popen([PY, str(HERE / "upstream_proc.py"), str(up_port)]))
        config, port, admin = write_config(tmp, up_port, valkey.url)
        gateway = subprocess.Popen([PY, str(HERE / "gateway_proc.py"), str(config), valkey.url,
                                    "--admin"])
        procs.append(gateway)

        def alive() -> None:
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited with {gateway.returncode}")

        wait_ready_blocking(admin, alive=alive)
        r = redis.Redis.from_url(valkey.url)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:  # the store's count of open watches, while the storm runs
            while not stop.is_set():
                peak[0] = max(peak[0], int(r.hget(keys.slots("live"), "=rt:") or 0))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        scenario = {"qps_tenants": list(QPS_TENANTS), "burner": BURNER["env"], "chat": "chat",
                    "live": "live", "chat_events": 6}
        ran = run_locust(f"http://127.0.0.1:{port}", scenario, [], args, out)
        time.sleep(1.0)  # sockets closed: slots given back
        stop.set()
        sampler.join()
        if ran is None:
            return 2
        outcomes, client_peak = ran
        results = check_seen(outcomes, QPS_TENANTS, BURST_MS, ("live", LIVE_CAP), client_peak)
        results[-1:-1] = check_store(outcomes, r, peak[0], args.users)  # "no errors" last
        return report(results, outcomes, out, QPS_TENANTS)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        valkey.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", default="60s", help="locust --run-time (%(default)s)")
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--spawn-rate", type=float, default=20)
    p.add_argument("--out", default=str(HERE / "out"))
    p.add_argument("--host", help="a deployment's public URL; without it, the runner starts "
                                  "its own stack")
    p.add_argument("--tenants", help="with --host: YAML naming the environments to load and "
                                     "their limits (loadtests/tenants.example.yaml)")
    args = p.parse_args(argv)
    if bool(args.host) != bool(args.tenants):
        p.error("--host and --tenants go together")
    if args.host and not args.host.startswith(("http://", "https://")):
        p.error("--host is a URL: http://… or https://…")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        return run_remote(args, out)
    return run_own(args, out)


if __name__ == "__main__":
    sys.exit(main())
