"""Run the Locust scenarios headless against a real gateway, check the outcome against the
configured limits, and draw admitted vs refused per second per tenant.

    .venv/bin/python loadtests/run_locust.py [--time 60s] [--users 40] [--out loadtests/out]

Starts an embedded Valkey, the demo upstream and one gateway (loadtests/gateway_proc.py) with
the scenario's tenants, runs ``locust --headless`` (CSV + HTML report in --out), then checks:

- every QPS tenant: admitted per second never above its limit + its burst allowance, and over
  the run at most limit x seconds + burst (the GCRA bound of docs/operations.md);
- the burner: the store's plan usage equals its quota, its pack is used up exactly, and its
  pay-as-you-go equals what was admitted beyond plan + pack;
- the AI tenant: 50 calls in the store per chat admitted;
- the realtime tenant: the store never reports more open watches than the cap (sampled), and
  none is left once the sockets close;
- no error outcomes (5xx, broken streams).

Writes outcomes.json, checks.json and admitted_refused.png next to Locust's files; exits 1 if a
check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
import zoneinfo
from collections import defaultdict
from pathlib import Path
from typing import TypedDict

import redis
import yaml

from quotagate.common.calendar import day_number
from quotagate.demo.staging import shipped_routes, wait_ready_blocking
from quotagate.limiter import keys
from quotagate.limiter.embedded import EmbeddedValkey, free_port

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
    port, admin = free_port(), free_port()
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


def check(outcomes: list[dict], r: redis.Redis, watch_peak: int, users: int) -> list[dict]:
    per: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for row in outcomes:
        per[(row["tenant"], row["outcome"])][row["second"]] += row["count"]
    seconds = max((row["second"] for row in outcomes), default=0) + 1
    results = []

    def add(name: str, ok: bool, detail: str) -> None:
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    for env, qps in QPS_TENANTS.items():
        admitted = per[(env, "admitted")]
        burst = qps * BURST_MS // 1000 + 1
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
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    cycle, day = day_number(today.replace(day=1)), day_number(today)
    env = BURNER["env"]
    burned = sum(per[(env, "admitted")].values())
    plan_used = int(r.hget(keys.usage(env), f"{cycle}:calls") or 0)
    pack_used = int(r.hget(keys.pack_usage(env), "b1") or 0)
    payg = int(r.hget(keys.payg(env), f"{day}:calls") or 0)
    # Requests in flight when Locust stops are counted by the store but never seen by the
    # client: at most one per burner user.
    beyond = burned - BURNER["calls"] - BURNER["pack"]
    add("burner waterfall", plan_used == BURNER["calls"] and pack_used == BURNER["pack"]
        and beyond <= payg <= beyond + users,
        f"admitted {burned}: plan {plan_used}/{BURNER['calls']}, pack {pack_used}/"
        f"{BURNER['pack']}, pay-as-you-go {payg} (client saw {beyond}; in flight at the "
        f"stop: {payg - beyond})")
    chats = sum(per[("chat", "admitted")].values())
    chat_calls = int(r.hget(keys.usage("chat"), f"{cycle}:calls") or 0) + int(
        r.hget(keys.payg("chat"), f"{day}:calls") or 0)
    add("AI chats cost 50 calls", chats > 0 and 50 * chats <= chat_calls <= 50 * (chats + users),
        f"{chats} chats seen by the clients, {chat_calls} calls counted")
    left = int(r.hget(keys.slots("live"), "=rt:") or 0)
    watches = sum(per[("live", "admitted")].values())
    add("watch storm at the cap", watch_peak <= LIVE_CAP and left == 0 and watches > 0,
        f"{watches} watches opened, store peak {watch_peak} (cap {LIVE_CAP}), "
        f"{left} left after the sockets closed")
    errors = sum(n for (_, outcome), by in per.items() if outcome == "error"
                 for n in by.values())
    add("no errors", errors == 0, f"{errors} error outcomes")
    return results


def draw(outcomes: list[dict], path: Path) -> None:
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
        limit = QPS_TENANTS.get(tenant)
        if limit:
            ax.axhline(limit, color="gray", linestyle="--", linewidth=1, label=f"limit {limit}")
        ax.set_ylabel("per s")
        ax.set_title(tenant, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right")
    plt.xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", default="60s", help="locust --run-time (%(default)s)")
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--spawn-rate", type=float, default=20)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
                    "live": "live"}
        cmd = [PY, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time,
               "--host", f"http://127.0.0.1:{port}", "--csv", str(out / "locust"),
               "--html", str(out / "locust.html"), "--only-summary"]
        env = {**__import__("os").environ, "QG_SCENARIO": json.dumps(scenario),
               "QG_OUT": str(out)}
        locust = subprocess.run(cmd, env=env, capture_output=True, text=True)
        time.sleep(1.0)  # sockets closed: slots given back
        stop.set()
        sampler.join()
        if not (out / "outcomes.json").exists():
            print(locust.stdout[-3000:], locust.stderr[-3000:], file=sys.stderr)
            return 2
        outcomes = json.loads((out / "outcomes.json").read_text())
        results = check(outcomes, r, peak[0], args.users)
        (out / "checks.json").write_text(json.dumps(results, indent=2))
        draw(outcomes, out / "admitted_refused.png")
        for res in results:
            print(f"{'ok  ' if res['ok'] else 'FAIL'} {res['check']}: {res['detail']}")
        print(f"report: {out / 'locust.html'}, chart: {out / 'admitted_refused.png'}")
        return 0 if all(res["ok"] for res in results) else 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
