"""The platform's own SDKs (@cloudbase/js-sdk 3.7.0, @cloudbase/node-sdk 3.18.3, pinned in
tests/sdk/package-lock.json, installed by scripts/test) through a real ``quotagate serve`` with
the shipped config, in front of a stub platform (tests/sdk/platform.js, a Node ``ws`` server).

The SDKs are driven unmodified (tests/sdk/drive.js): only their endpoints are pointed at the
gateway through their own settings, under the platform's host names, which a private
/etc/hosts (a mount namespace of the driver alone) resolves to 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from quotagate.limiter.embedded import free_port
from tests.deployed import Deployed, days, hold_the_day, serve, shipped_config
from tests.helpers import ROOT

pytestmark = pytest.mark.deployed

SDK = ROOT / "tests" / "sdk"
ENVS = ("shop", "spent", "live", "lapse", "slow", "expiring", "released")
HOSTS = [f"{e}.api.tcloudbasegateway.com" for e in ENVS] + \
        [f"{e}.tcb-api.tencentcloudapi.com" for e in ENVS] + \
        [f"{e}.ap-shanghai.tcb-api.tencentcloudapi.com" for e in ENVS]


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    assert found, "Node (>= 18) runs the platform's SDKs"
    assert (SDK / "node_modules" / "@cloudbase" / "js-sdk").is_dir(), \
        "the SDKs are not installed: run scripts/test (npm ci --prefix tests/sdk)"
    return found


@pytest.fixture(scope="module")
def hosts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hosts"
    path.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 " + " ".join(HOSTS) + "\n")
    return path


@pytest.fixture(scope="module")
def platform(node: str) -> Iterator[tuple[int, int]]:
    """(platform port, the gateway's port it hands out as the realtime URL)."""
    gateway_port = free_port()
    proc = subprocess.Popen(
        [node, "platform.js", "0", f"ws://{{env}}.api.tcloudbasegateway.com:{gateway_port}/"],
        cwd=SDK, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    yield port, gateway_port
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, platform: tuple[int, int]
                  ) -> AsyncIterator[Deployed]:
    hold_the_day()
    directory = tmp_path_factory.mktemp("sdk")
    port, gateway_port = platform
    config = shipped_config(directory, f"http://127.0.0.1:{port}",
                            leases={"ttl_ms": 3000, "renew_interval_ms": 1000})
    config["listen"] = f"127.0.0.1:{gateway_port}"
    import yaml

    (directory / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    period = f"anchor: {days(-10)}, expires: {days(300)}"
    (directory / "environments.yaml").write_text(f"""environments:
  shop:  {{plan: standard, {period}}}
  spent: {{plan: standard, {period}, limits: {{calls: 0}}}}
  live:  {{plan: standard, {period}, limits: {{realtime: 3}}}}
  slow:  {{plan: standard, {period}, gateway: {{version: test, purchased: {days(-3)}, months: 1}}}}
  released: {{plan: standard, anchor: {days(-60)}, expires: {days(-20)}}}
""")
    served = await serve(directory, config)
    yield served
    served.stop()


def drive(node: str, hosts: Path, scenario: str, **args: object) -> subprocess.Popen[str]:
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    return subprocess.Popen(
        ["unshare", "--mount", "bash", "-c", script, "drive", str(hosts), node, "drive.js",
         scenario, json.dumps(args)],
        cwd=SDK, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "TENCENTCLOUD": "true"})


def result(proc: subprocess.Popen[str], timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, (out[-2000:], err[-2000:])
    return json.loads(lines[-1][len("RESULT "):])


def isolated_refusals(gateway: Deployed) -> float:
    """Requests the gateway refused as environment-isolated so far (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("quotagate_decisions_total{") and \
                    'reason="isolated"' in line and 'result="refused"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def platform_saw(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=5) as r:
        return json.loads(r.read())


async def test_sdk_calls_are_recognised_and_counted(gateway: Deployed, node: str,
                                                   hosts_file: Path, platform):
    assert os.geteuid() == 0, "the driver resolves the platform's host names in a private " \
                              "mount namespace: run the suite as root, as CI does"
    seen = result(drive(node, hosts_file, "calls", env="shop", port=gateway.port))
    assert seen["gateway"]["fn"]["resolved"]["result"] == {"fn": "sum", "sum": 3}, seen
    assert len(seen["gateway"]["db"]["resolved"]["data"]) == 2, seen
    assert seen["cloudApi"]["fn"]["resolved"]["result"] == {"fn": "sum", "sum": 7}, seen
    assert len(seen["cloudApi"]["db"]["resolved"]["data"]) == 2, seen
    assert seen["node"]["fn"]["resolved"]["result"] == {"fn": "sum", "sum": 11}, seen
    assert len(seen["node"]["db"]["resolved"]["data"]) == 2, seen
    # Each counted once, as what it is: two invocations and a query per SDK mode.
    usage = gateway.json("env", "usage", "shop")
    assert usage["meters"]["calls"]["used"] == 6
    requests = [r for r in platform_saw(platform[0])["requests"] if r["env"] == "shop"]
    assert len(requests) == 6
    paths = sorted(r["path"].split("?")[0] for r in requests)
    assert paths[:2] == ["/admin", "/admin"] and paths[-1] == "/web"


async def test_refusals_reach_the_app_as_errors(gateway: Deployed, node: str,
                                               hosts_file: Path, platform):
    seen = result(drive(node, hosts_file, "calls", env="spent", port=gateway.port))
    fn = seen["gateway"]["fn"]["resolved"]  # js-sdk GATEWAY mode resolves with the code
    assert fn["code"] == "QUOTA_EXCEEDED" and "result" not in fn, fn
    assert fn["message"] and fn["requestId"]
    db = seen["gateway"]["db"]["resolved"]
    assert db["code"] == "QUOTA_EXCEEDED" and db["data"]["list"] == [], db
    for call in ("fn", "db"):  # CLOUD_API mode and node-sdk throw on any non-200
        assert seen["cloudApi"][call]["rejected"]["message"] == "network request error", seen
        assert seen["node"][call]["rejected"]["code"] == 429, seen
    assert not [r for r in platform_saw(platform[0])["requests"] if r["env"] == "spent"]


async def test_watches_at_the_cap_as_the_sdk_sees_them(gateway: Deployed, node: str,
                                                      hosts_file: Path, platform):
    seen = result(drive(node, hosts_file, "watches", env="live", port=gateway.port,
                        platform=platform[0]), timeout=120)
    assert seen["atCap"] == ["change", "change", "change", "error"], seen
    assert "REALTIME_CONNECTION_LIMIT_EXCEEDED" in seen["refusal"], seen
    assert seen["afterClose"] == "change", seen  # CLOSE_WATCH gave the slot back
    assert seen["laterError"] == {"first": "change", "errors": 2}, seen  # onError twice
    assert seen["afterServerError"] == "change", seen  # the server's ERROR freed it
    assert seen["cutFirst"] == "change" and seen["reconnected"] and seen["rebuilt"] == 3, seen
    assert seen["afterReconnect"] == "error", seen  # the rebuilt 3 hold the cap: no leak
    assert 3001 in seen["closeCodes"], seen  # the SDK's own close, passed on
    deadline = time.monotonic() + 10
    while gateway.json("env", "usage", "live")["realtime"]["open"] != 0:
        assert time.monotonic() < deadline, "watches still counted after every one closed"
        await asyncio.sleep(0.3)


async def test_an_isolated_environment_ends_watches_with_3050(gateway: Deployed, node: str,
                                                             hosts_file: Path, platform):
    definition = Path(tempfile.mkdtemp()) / "lapse.yaml"
    definition.write_text(f"plan: standard\nanchor: {days(-40)}\nexpires: {days(30)}\n")
    gateway.ok("env", "put", "lapse", str(definition))
    proc = drive(node, hosts_file, "isolated", env="lapse", port=gateway.port,
                 platform=platform[0])
    assert proc.stderr is not None and proc.stdin is not None
    deadline = time.monotonic() + 60
    while "READY" not in proc.stderr.readline():
        assert time.monotonic() < deadline and proc.poll() is None
    refused_before = isolated_refusals(gateway)
    definition.write_text(f"plan: standard\nanchor: {days(-40)}\nexpires: {days(-1)}\n")
    gateway.ok("env", "put", "lapse", str(definition))  # expired yesterday: isolated
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen = result(proc)
    assert seen["first"] == "change", seen
    # The gateway's ERROR for the watch reaches onError (then the socket ends with 3050, the
    # SDK's "stop" code: tests/test_realtime.py checks the code)...
    assert any("ENVIRONMENT_ISOLATED - environment lapse is isolated" in e
               for e in seen["errors"]), seen
    assert seen["loginsAfter"] == 0, seen  # ...and the SDK does not reconnect: not even an
    assert isolated_refusals(gateway) == refused_before  # upgrade (on 1008 it would)


async def test_a_watch_on_a_1_mbps_version_is_paced_not_cut(gateway: Deployed, node: str,
                                                           hosts_file: Path, platform):
    """Gateway version `test` (1 Mbps, 125,000 B/s): the platform writes 40 NEXT_EVENT frames
    of ~10 kB at once. The js-sdk's watch gets every one, in order, with no error and no
    rebuild; and over at least the time 1 Mbps takes for them (the gateway delays the
    frames, it does not drop them; unpaced, loopback carries them in milliseconds)."""
    before = platform_saw(platform[0])
    seen = result(drive(node, hosts_file, "flood", env="slow", port=gateway.port, events=40),
                  timeout=120)
    assert not seen["errors"] and not seen["timeout"] and not seen["unhandled"], seen
    assert seen["ns"] == list(range(41)), seen  # INIT (0), then 1..40 in order, once each
    saw = platform_saw(platform[0])
    assert saw["inits"] == before["inits"] + 1  # no rebuild: nothing lost or out of order
    flooded = saw["floodBytes"] - before["floodBytes"]
    assert flooded > 400_000
    # A frame goes whole once its bytes' time has come: allow one frame (~10.3 KB, 80 ms)
    # of slack for when the clock starts; unpaced, it all takes milliseconds.
    assert seen["seconds"] >= (flooded - 10_400) / 125_000, (seen["seconds"], flooded)
    print(f"\n{flooded} B in {seen['seconds']} s")


def post_action(gateway: Deployed, env: str, action: str, **members: str) -> tuple[int, dict]:
    """One action request to /web, as js-sdk sends it (its env in the query and the body)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}/web?env={env}", method="POST",
        data=json.dumps({"action": action, "env": env, **members}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_an_isolated_environments_new_watch_learns_it(gateway: Deployed, node: str,
                                                            hosts_file: Path, platform):
    """An app signed in, then its environment isolated, then its first watch: js-sdk asks
    for the realtime sign (auth.wsWebSign on /web) before it opens the socket. The shipped
    /web route lets that one action through while isolated, at no cost, so the SDK opens the
    socket, where the gateway tells it (3050) and its onError fires. Without it the sign call
    is refused (403) and retried every 10 s (7 tries over about 50 s), and meanwhile the watch
    hears nothing. Everything else of the environment stays refused; a released one gets
    404."""
    definition = Path(tempfile.mkdtemp()) / "expiring.yaml"
    definition.write_text(f"plan: standard\nanchor: {days(-40)}\nexpires: {days(30)}\n")
    gateway.ok("env", "put", "expiring", str(definition))
    proc = drive(node, hosts_file, "lapsed", env="expiring", port=gateway.port, pause=True,
                 wait=20_000)
    assert proc.stderr is not None and proc.stdin is not None
    deadline = time.monotonic() + 60
    while "READY" not in proc.stderr.readline():
        assert time.monotonic() < deadline and proc.poll() is None
    used = gateway.json("env", "usage", "expiring")["meters"]["calls"]["used"]  # the sign-in
    before = len(platform_saw(platform[0])["requests"])
    definition.write_text(f"plan: standard\nanchor: {days(-40)}\nexpires: {days(-1)}\n")
    gateway.ok("env", "put", "expiring", str(definition))  # expired yesterday: isolated
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen = result(proc, timeout=120)
    print(f"\nwatch of an isolated environment: {seen['watch']}")
    # The watch is told, within the bound (20 s; the SDK's retries alone take 50 s).
    assert seen["watch"]["outcome"] == "error" and not seen["watch"]["timeout"], seen
    assert any("code 3050" in e and "ENVIRONMENT_ISOLATED" in e
               for e in seen["watch"]["errors"]), seen
    # Only the sign calls reached the platform, and they cost nothing.
    reached = [r for r in platform_saw(platform[0])["requests"][before:]
               if r["env"] == "expiring"]
    assert reached and all(r["path"].startswith("/web") and
                           json.loads(r["body"])["action"] == "auth.wsWebSign"
                           for r in reached), reached
    assert gateway.json("env", "usage", "expiring")["meters"]["calls"]["used"] == used
    # Its function calls and database requests are refused as ever, in both endpoint modes.
    gw = seen["gateway"]
    assert gw["fn"]["resolved"]["code"] == "ENVIRONMENT_ISOLATED", gw
    assert gw["db"]["resolved"]["code"] == "ENVIRONMENT_ISOLATED", gw
    # (js-sdk's add() keeps only the requestId of the refusal: docs/troubleshooting.md.)
    assert "code" not in gw["add"]["resolved"] and gw["add"]["resolved"]["requestId"], gw
    for call in ("fn", "add"):  # CLOUD_API mode: any non-200 is "network request error"
        assert seen["cloudApi"][call]["rejected"]["message"] == "network request error", seen
    # Through /web itself: the sign passes, another auth action does not.
    assert post_action(gateway, "expiring", "auth.wsWebSign")[0] == 200
    status, body = post_action(gateway, "expiring", "auth.signInAnonymously")
    assert (status, body["code"]) == (403, "ENVIRONMENT_ISOLATED"), body
    status, body = post_action(gateway, "expiring", "functions.invokeFunction",
                               function_name="sum")
    assert (status, body["code"]) == (403, "ENVIRONMENT_ISOLATED"), body
    assert gateway.json("env", "usage", "expiring")["meters"]["calls"]["used"] == used
    # A released environment's sign call is refused (404), its calls too.
    status, body = post_action(gateway, "released", "auth.wsWebSign")
    assert (status, body["code"]) == (404, "ENVIRONMENT_NOT_FOUND"), body
    gone = result(drive(node, hosts_file, "lapsed", env="released", port=gateway.port))
    assert gone["gateway"]["fn"]["resolved"]["code"] == "ENVIRONMENT_NOT_FOUND", gone
    assert gone["gateway"]["db"]["resolved"]["code"] == "ENVIRONMENT_NOT_FOUND", gone
    assert not [r for r in platform_saw(platform[0])["requests"] if r["env"] == "released"]
