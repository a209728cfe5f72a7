"""The real command: ``quotagate serve`` (embedded Valkey, workers), ``demo``, ``--help``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml

from quotagate.limiter.embedded import free_port, free_ports
from tests.deployed import hold_the_day
from tests.helpers import PLANS, QUOTAGATE, wait_ready


def test_help_for_every_command():
    for args in ([], ["serve"], ["demo"], ["config", "check"], ["env"], ["env", "usage"],
                 ["env", "overage"], ["pack", "buy"], ["pack", "refund"], ["promo", "buy"],
                 ["plan", "quote"], ["plan", "change"], ["plan", "renew"], ["bill"]):
        out = subprocess.run([*QUOTAGATE, *args, "--help"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert "usage: quotagate" in out.stdout


@pytest.mark.deployed
def test_demo_walkthrough():
    hold_the_day(120)  # its plans are anchored on the 1st
    ports = free_ports(3)  # (three calls of free_port may hand out one port twice)
    out = subprocess.run(
        [*QUOTAGATE, "demo", "--once", "--port", str(ports[0]), "--admin-port", str(ports[1]),
         "--upstream-port", str(ports[2])],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "1. A function call passes" in text and "→ 200 OK" in text
    assert "(Host: demo-shop.api.tcloudbasegateway.com)" in text
    assert '1b. node-sdk' in text and '"action": "functions.invokeFunction"' in text
    assert "12 more calls → 8 passed, 4 refused" in text  # 60 - 1 - 1 - 50 = 8 left
    assert "quota-exceeded" in text and "→ 429 Too Many Requests" in text
    assert "refused with qps-exceeded" in text
    assert "6 calls → 6 passed" in text
    assert "→ 400 Bad Request" in text and "→ 404 Not Found" in text
    assert "→ 10 INIT_EVENT, 2 ERROR REALTIME_CONNECTION_LIMIT_EXCEEDED" in text
    assert "then INIT_WATCH w12 → INIT_EVENT" in text
    assert "→ 2 passed, 2 refused with concurrency-exceeded" in text
    # The access log is out of the walk-through, in the file it names at the end.
    assert '"logger":"quotagate.access"' not in text + out.stderr
    named = next(line for line in text.splitlines() if line.startswith("Access log"))
    logged = [json.loads(line) for line in
              Path(named.rsplit(": ", 1)[1]).read_text().splitlines()]
    assert {"demo-shop", "demo-free", "demo-live"} <= {e["env"] for e in logged}
    assert {e["logger"] for e in logged} == {"quotagate.access"}


def write_serve_config(tmp_path: Path, upstream_port: int) -> tuple[Path, int, int]:
    port, admin = free_ports(2)
    today = dt.date.today()
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "store": {"data_dir": "data"},  # no url: embedded Valkey
        "plans_file": str(PLANS),
        "routes": [{"prefix": "/functions/", "upstream": f"http://127.0.0.1:{upstream_port}",
                    "kind": "function"}],
    }))
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        # serve runs on the real clock: a period around today, whatever today is.
        "shop": {"plan": "standard", "anchor": (today - dt.timedelta(days=40)).isoformat(),
                 "expires": (today + dt.timedelta(days=400)).isoformat(),
                 "limits": {"calls": 5}},
    }}))
    return tmp_path / "gateway.yaml", port, admin


def valkey_children(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if "valkey-server" in " ".join(c.cmdline())]


@pytest.mark.deployed
@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_with_embedded_valkey(tmp_path: Path, upstream, workers):
    config, port, admin = write_serve_config(tmp_path, upstream.port)
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(config),
                             "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_ready(admin, proc)
        valkeys = valkey_children(proc.pid)
        assert len(valkeys) == 1
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(7):
                async with s.get(f"http://127.0.0.1:{port}/functions/x",
                                 headers={"X-CloudBase-Env": "shop"}) as r:
                    statuses.append(r.status)
            assert statuses == [200] * 5 + [429] * 2
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        assert 'quotagate_decisions_total{reason="quota-exceeded",result="refused"} 2.0' in text
        assert (tmp_path / "data" / "appendonlydir").is_dir()  # append-only persistence
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "embedded Valkey started" in err and "embedded Valkey stopped" in err
    for child in valkeys:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


@pytest.mark.deployed
async def test_serve_refuses_bad_config(tmp_path: Path):
    (tmp_path / "gateway.yaml").write_text("listen: 127.0.0.1:8080\nenforcment: off\n")
    out = subprocess.run([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "gateway.yaml" in out.stderr and "enforcment" in out.stderr


def test_no_stray_valkey_left(tmp_path: Path):
    """After the serve tests, no valkey-server of theirs is left running."""
    mine = [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "valkey-server" in p.info["cmdline"][0]
            and str(tmp_path.parent) in " ".join(p.info["cmdline"])
            and p.pid != os.getpid()]
    assert mine == []


@pytest.mark.deployed
async def test_serve_logs_json_lines(tmp_path: Path, upstream):
    config, port, admin = write_serve_config(tmp_path, upstream.port)
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(config), "--log-format",
                             "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as s:
            for _ in range(6):  # the 6th is over the 5 calls
                async with s.get(f"http://127.0.0.1:{port}/functions/x",
                                 headers={"X-CloudBase-Env": "shop"}) as r:
                    await r.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "quotagate.access"]
    assert [line["status"] for line in access] == [200] * 5 + [429]
    refused = [line for line in access if line["decision"] != "admitted"]
    assert len(refused) == 1 and refused[0]["decision"] == "quota-exceeded"
    assert refused[0]["env"] == "shop" and refused[0]["level"] == "info"
    # Logged once: the access log says it (the decisions log only at DEBUG).
    assert not [line for line in lines if line["logger"] == "quotagate.decisions"]


def test_demo_upstream_runs_as_a_module(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quotagate.demo.upstream", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=1) as r:
                    assert json.loads(r.read()) == {"ok": True}
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)


def workers_of(pid: int) -> dict[int, str]:
    """pid -> process title of serve's workers (as ps shows them)."""
    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            title = " ".join(child.cmdline()).strip()
            if title.startswith("quotagate worker"):
                out[child.pid] = title
    return out


@pytest.mark.deployed
async def test_a_dead_worker_is_started_again(tmp_path: Path, upstream):
    config, port, admin = write_serve_config(tmp_path, upstream.port)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(config), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        await wait_ready(admin, proc)
        for _ in range(100):
            first = workers_of(proc.pid)
            if len(first) == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(first.values()) == ["quotagate worker 0", "quotagate worker 1"]
        victim = next(pid for pid, title in first.items() if title.endswith("1"))
        os.kill(victim, signal.SIGKILL)
        for _ in range(150):
            now = workers_of(proc.pid)
            if len(now) == 2 and victim not in now:
                break
            await asyncio.sleep(0.1)
        assert sorted(now.values()) == ["quotagate worker 0", "quotagate worker 1"], now
        assert proc.poll() is None  # the server stayed up
        async with aiohttp.ClientSession() as s:
            for _ in range(4):  # both workers answer (the port is shared)
                async with s.get(f"http://127.0.0.1:{port}/functions/x",
                                 headers={"X-CloudBase-Env": "shop"}) as r:
                    assert r.status in (200, 429)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.seek(0)
        text = log.read()
        log.close()
    assert "worker 1 exited" in text and "worker 1 started again" in text, text


@pytest.mark.deployed
def test_a_crash_loop_stops_serve_with_an_error(tmp_path: Path, upstream):
    """Workers that cannot start (their port is taken, without SO_REUSEPORT) are started
    again with backoff, then the server gives up and exits non-zero."""
    import socket

    config, port, _ = write_serve_config(tmp_path, upstream.port)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        out = subprocess.run([*QUOTAGATE, "serve", "--config", str(config), "--workers", "2"],
                             capture_output=True, text=True, timeout=120)
    finally:
        blocker.close()
    assert out.returncode != 0
    assert "crash loop" in out.stderr, out.stderr[-3000:]
    assert "starting it again" in out.stderr
