"""Hot reload: SIGHUP and changed files re-validate and apply; a bad file is refused (logged
with file, key path and reason, counted) and the last good config stays."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from quotagate.common.metrics import RELOADS
from quotagate.gateway.app import STATE
from quotagate.limiter.embedded import free_ports
from tests.deployed import days
from tests.helpers import PLANS, QUOTAGATE, env, wait_ready, write_config

H = {"X-CloudBase-Env": "shop"}


def environments(directory: Path, envs: dict) -> None:
    (directory / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))


async def test_reload_applies_good_files_and_keeps_the_last_good(make_gateway, tmp_path,
                                                                  caplog):
    gw = await make_gateway({"shop": env(limits={"calls": 1})}, reload_poll_ms=0)
    state = gw.app[STATE]
    directory = state.config.base_dir
    assert (await gw.get("/functions/f", headers=H)).status == 200
    assert (await gw.get("/functions/f", headers=H)).status == 429
    failures = RELOADS.labels("failure")._value.get()

    # A broken file: refused with file, key path and reason; nothing changes.
    environments(directory, {"shop": env(limits={"calls": "many"})})
    with caplog.at_level(logging.ERROR, "quotagate.gateway"):
        assert await state.runtime.reload("test") is False
    assert RELOADS.labels("failure")._value.get() == failures + 1
    text = caplog.text
    assert "environments.yaml" in text and "$.environments.shop.limits.calls" in text
    assert (await gw.get("/functions/f", headers=H)).status == 429
    assert state.config.environments.environments["shop"].limits.calls == 1

    # A good one: applied (usage kept, the new quota in force), a new env and a new route.
    envs = {"shop": env(limits={"calls": 3}), "new": env()}
    environments(directory, envs)
    gateway = yaml.safe_load((directory / "gateway.yaml").read_text())
    gateway["routes"].append({"prefix": "/extra/", "kind": "database",
                              "upstream": gateway["routes"][0]["upstream"]})
    (directory / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    assert await state.runtime.reload("test") is True
    assert [(await gw.get("/functions/f", headers=H)).status for _ in range(3)] == \
        [200, 200, 429]
    assert (await gw.get("/extra/x", headers={"X-CloudBase-Env": "new"})).status == 200

    # Removed from the file: forgotten (404).
    environments(directory, {"shop": env(limits={"calls": 3})})
    assert await state.runtime.reload("test") is True
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "new"})).status == 404


async def test_changed_file_is_picked_up_by_polling(make_gateway):
    gw = await make_gateway({"shop": env(limits={"calls": 0})}, reload_poll_ms=100)
    assert (await gw.get("/functions/f", headers=H)).status == 429
    state = gw.app[STATE]
    await asyncio.sleep(0.05)
    environments(state.config.base_dir, {"shop": env(limits={"calls": 5})})
    for _ in range(40):
        await asyncio.sleep(0.1)
        if (await gw.get("/functions/f", headers=H)).status == 200:
            break
    else:
        raise AssertionError("the changed file was not applied")


@pytest.mark.deployed
async def test_sighup_reloads_a_running_serve(tmp_path: Path, valkey_url: str, upstream):
    port, admin = free_ports(2)
    # serve runs on the real clock: a plan period around today, whatever today is.
    period = {"anchor": days(-40), "expires": days(400)}
    config = write_config(tmp_path, {"shop": env(limits={"calls": 0}, **period)},
                          listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}",
                          store={"url": valkey_url}, plans_file=str(PLANS), reload_poll_ms=0,
                          routes=[{"prefix": "/functions/", "kind": "function",
                                   "upstream": f"http://127.0.0.1:{upstream.port}"}])
    del config
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        await wait_ready(admin, proc)
        url = f"http://127.0.0.1:{port}/functions/f"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers=H) as r:
                assert r.status == 429
            environments(tmp_path, {"shop": env(limits={"calls": "x"}, **period)})  # broken
            os.kill(proc.pid, signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with s.get(url, headers=H) as r:
                assert r.status == 429  # still the last good config
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                assert 'quotagate_config_reloads_total{result="failure"} 1.0' in await r.text()
            environments(tmp_path, {"shop": env(limits={"calls": 10}, **period)})
            os.kill(proc.pid, signal.SIGHUP)
            await asyncio.sleep(0.5)
            async with s.get(url, headers=H) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "$.environments.shop.limits.calls" in err and "last good config stays" in err


async def test_reload_rewrites_api_owned_snapshots_and_guards_them(make_gateway, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from quotagate.control.admin import init_admin_app
    from tests.helpers import PLANS

    plans = yaml.safe_load(PLANS.read_text())
    plans["plans"]["tiny"] = {**plans["plans"]["personal"], "calls": 1}
    plans_file = tmp_path / "my-plans.yaml"
    plans_file.write_text(yaml.safe_dump(plans))
    gw = await make_gateway({}, plans_file=str(plans_file), reload_poll_ms=0)
    state = gw.app[STATE]
    admin = TestClient(TestServer(init_admin_app(state.runtime, token="t")))
    await admin.start_server()
    try:
        auth = {"Authorization": "Bearer t"}
        resp = await admin.put("/admin/v1/envs/api-env", headers=auth, json={
            "plan": "tiny", "anchor": "2026-11-01", "expires": "2027-11-01"})
        assert resp.status == 200
        h = {"X-CloudBase-Env": "api-env"}
        assert [(await gw.get("/functions/f", headers=h)).status for _ in range(2)] == \
            [200, 429]
        plans["plans"]["tiny"]["calls"] = 3  # the plan grows: the API env's snapshot too
        plans_file.write_text(yaml.safe_dump(plans))
        assert await state.runtime.reload("test") is True
        assert (await gw.get("/functions/f", headers=h)).status == 200
        del plans["plans"]["tiny"]  # an API env still uses it: the reload is refused
        plans_file.write_text(yaml.safe_dump(plans))
        assert await state.runtime.reload("test") is False
        assert "tiny" in state.config.plans.plans
        assert (await gw.get("/functions/f", headers=h)).status == 200
    finally:
        await admin.close()


async def test_a_start_with_the_files_already_written_writes_nothing(make_gateway, store,
                                                                      caplog):
    """Issue 24: a restart (or another instance) with the very files whose snapshots are all
    in the store builds and writes none of them (the store keeps the files' digest); changed
    files are written; and a snapshot missing from the store is written again whatever the
    digest says."""
    from quotagate.limiter import keys

    caplog.set_level(logging.INFO, "quotagate.sync")
    envs = {"shop": env(limits={"calls": 5}), "other": env()}
    await make_gateway(envs)
    assert "environments applied: 2 written, 0 removed" in caplog.text
    await store.set(keys.entitlements("other"), "left as it was")  # a mark: written or not?
    caplog.clear()
    gw = await make_gateway(envs)  # the same files (another directory)
    assert "unchanged since they were last written whole (2;" in caplog.text, caplog.text
    assert await store.get(keys.entitlements("other")) == b"left as it was"
    caplog.clear()
    await make_gateway({**envs, "shop": env(limits={"calls": 6})})  # a change: all written
    assert "environments applied: 2 written, 0 removed" in caplog.text, caplog.text
    assert await store.get(keys.entitlements("other")) != b"left as it was"
    # The store lost one snapshot (the files' digest is still there): a request for it
    # has the environments written again, forced.
    await make_gateway(envs)  # the first files again: written (the digest was the change's)
    await store.delete(keys.entitlements("shop"))
    caplog.clear()
    for _ in range(100):
        await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})
        if await store.exists(keys.entitlements("shop")):
            break
        await asyncio.sleep(0.05)
    assert await store.exists(keys.entitlements("shop")), caplog.text
    assert "environments applied: 2 written" in caplog.text, caplog.text
