"""The embedded store has one owner: real ``quotagate serve`` / ``demo`` processes, a second
one on the same data directory, ``kill -9`` of the gateway, busy ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from quotagate.limiter.embedded import DataDirInUse, EmbeddedValkey, free_port
from tests.deployed import Deployed, days, serve, shipped_config, start_upstream
from tests.helpers import QUOTAGATE

pytestmark = pytest.mark.deployed


def valkeys_in(directory: Path) -> list[psutil.Process]:
    """Running valkey-servers whose data directory is ``directory``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if cmd and "valkey-server" in cmd[0] and str(directory) in " ".join(cmd) \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def gone_within(procs: list[psutil.Process], seconds: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def origin() -> Iterator[str]:
    proc, url = start_upstream()
    yield url
    proc.terminate()
    proc.wait(10)


def laid_out(tmp_path: Path, origin: str) -> dict:
    gateway = shipped_config(tmp_path, origin)
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        "shop": {"plan": "standard", "anchor": days(-40), "expires": days(400),
                 "limits": {"calls": 5}}}}))
    return gateway


def second_serve(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Another serve on the same data directory but other ports."""
    other = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
    other["listen"], other["admin_listen"] = (f"127.0.0.1:{free_port()}",
                                              f"127.0.0.1:{free_port()}")
    other["store"]["data_dir"] = str(tmp_path / other["store"]["data_dir"])
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "gateway.yaml").write_text(yaml.safe_dump(other))
    for name in ("plans.yaml", "environments.yaml"):
        (tmp_path / "second" / name).write_text((tmp_path / name).read_text())
    return subprocess.run([*QUOTAGATE, "serve", "--config",
                           str(tmp_path / "second" / "gateway.yaml")],
                          capture_output=True, text=True, timeout=30)


async def test_a_second_serve_on_the_data_directory_refuses_at_once(tmp_path: Path, origin):
    first = await serve(tmp_path, laid_out(tmp_path, origin))
    try:
        url = first.route("function") + "f"
        assert await first.get(url, "shop", 2) == [200, 200]
        started = time.monotonic()
        out = second_serve(tmp_path)
        assert out.returncode == 1
        assert time.monotonic() - started < 10  # at once: no wait on a live holder
        line = out.stderr.strip().splitlines()[-1]  # after the INFO log of what it tried
        assert line.startswith("quotagate serve: the store's data directory"), out.stderr
        assert f"quotagate pid {first.proc.pid}" in line and "in use" in line, line
        assert "Traceback" not in out.stderr
        # The first's store is untouched: its socket is there and counts go on.
        assert (tmp_path / "data" / "valkey.sock").exists()
        assert len(valkeys_in(tmp_path / "data")) == 1
        assert await first.get(url, "shop", 4) == [200, 200, 200, 429]
    finally:
        first.stop()
    assert not valkeys_in(tmp_path / "data")


def test_the_lock_names_its_holder_and_is_given_back(tmp_path: Path):
    one = EmbeddedValkey(tmp_path, port=free_port()).start()
    try:
        with pytest.raises(DataDirInUse, match=f"quotagate pid {os.getpid()}"):
            EmbeddedValkey(tmp_path, port=free_port()).start()
    finally:
        one.stop()
    two = EmbeddedValkey(tmp_path, port=free_port()).start()  # free again once stopped
    two.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_kill_9_of_the_gateway_leaves_nothing_behind(tmp_path: Path, origin, workers):
    gateway = laid_out(tmp_path, origin)
    first = await serve(tmp_path, gateway, "--workers", str(workers))
    url = first.route("function") + "f"
    assert await first.get(url, "shop", 3) == [200] * 3
    store = valkeys_in(tmp_path / "data")
    children = psutil.Process(first.proc.pid).children(recursive=True)
    assert len(store) == 1 and store[0].pid in {c.pid for c in children}
    assert len(children) >= workers
    first.proc.kill()  # kill -9: no handler runs
    first.proc.wait()
    assert gone_within(children, 10), [c.cmdline() for c in children if c.is_running()]
    assert not valkeys_in(tmp_path / "data")

    again: Deployed = await serve(tmp_path, gateway, "--workers", str(workers))
    try:
        assert len(valkeys_in(tmp_path / "data")) == 1
        # The three calls before the kill were written (append-only, flushed on SIGTERM).
        assert await again.get(url, "shop", 3) == [200, 200, 429]
    finally:
        again.stop()


def test_serve_on_a_busy_port_says_so_and_leaves_nothing(tmp_path: Path, origin):
    gateway = laid_out(tmp_path, origin)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        gateway["listen"] = f"127.0.0.1:{taken}"
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(gateway))
        out = subprocess.run([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("quotagate serve: cannot listen on") and str(taken) in last, last
    assert "Traceback" not in out.stderr
    assert not valkeys_in(tmp_path / "data")


def demo_valkeys() -> set[int]:
    """Running valkey-servers of demos (their data is in a quotagate-demo- directory)."""
    return {p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] and "valkey-server" in p.info["cmdline"][0]
            and "quotagate-demo-" in " ".join(p.info["cmdline"])
            and p.info["status"] != psutil.STATUS_ZOMBIE}


def test_demo_on_a_busy_port_fails_with_one_line_and_leaves_nothing():
    before = demo_valkeys()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        out = subprocess.run([*QUOTAGATE, "demo", "--once", "--port", str(taken),
                              "--admin-port", str(free_port()),
                              "--upstream-port", str(free_port())],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"quotagate demo: port {taken} (--port)"), line
    assert demo_valkeys() <= before


def test_a_store_child_dies_with_its_parent(tmp_path: Path):
    """The parent-death signal, without quotagate around it: a Python parent that starts the
    store and is then SIGKILLed."""
    script = ("import sys, time; from quotagate.limiter.embedded import EmbeddedValkey; "
              f"EmbeddedValkey({str(tmp_path)!r}).start(); print('up', flush=True); "
              "time.sleep(60)")
    parent = subprocess.Popen([QUOTAGATE[0], "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "up"
        store = valkeys_in(tmp_path)
        assert len(store) == 1
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert gone_within(store, 10)
    finally:
        if parent.poll() is None:
            parent.kill()
