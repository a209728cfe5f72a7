"""``environments_dir`` (issue 24, item 2): environments spread over the files of a directory,
merged with environments.yaml; an id in two files is refused naming both; a reload parses
again only the files that changed, so one changed environment costs its file, not every
environment; and ``quotagate serve`` picks up a file changed, added or removed there."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from quotagate.gateway.app import STATE
from quotagate.limiter.embedded import free_ports
from quotagate.limiter.sync import file_digest
from quotagate.settings import ConfigError, check_files, load_config
from quotagate.settings.load import EnvSources
from tests.deployed import days
from tests.helpers import PLANS, QUOTAGATE, env, wait_ready, write_config


def put(directory: Path, name: str, envs: dict, settled: bool = True) -> Path:
    """A file written whole and moved in, as an operator (or a config tool) does; ``settled``:
    dated a minute back (a file changed within 2 s of its read has its content compared at
    the next load, in case a write in the same clock tick left its stat as it was)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump({"environments": envs}))
    if settled:
        back = time.time() - 60
        os.utime(tmp, (back, back))
    os.replace(tmp, directory / name)
    return directory / name


def staged(tmp_path: Path, **gateway: object) -> Path:
    write_config(tmp_path, {"main": env()}, **gateway)
    back = time.time() - 60
    os.utime(tmp_path / "environments.yaml", (back, back))  # (settled: see put)
    return tmp_path / "gateway.yaml"


def test_the_directory_is_merged_and_an_id_in_two_files_refused(tmp_path: Path) -> None:
    d = tmp_path / "environments.d"
    put(d, "a.yaml", {"a1": env(), "a2": env(plan="personal")})
    put(d, "b.yml", {"b1": env()})
    (d / "notes.txt").write_text("not an environments file")
    (d / ".editor.swp").write_text("{{{ not yaml")
    gateway = staged(tmp_path, environments_dir="environments.d")
    config = load_config(gateway)
    assert sorted(config.environments.environments) == ["a1", "a2", "b1", "main"]
    assert config.environments.environments["a2"].plan == "personal"
    assert d in config.files and d / "a.yaml" in config.files  # watched for changes

    put(d, "c.yaml", {"c1": env(), "a2": env()})
    with pytest.raises(ConfigError) as info:
        load_config(gateway)
    assert [(Path(i.file).name, i.path, i.reason) for i in info.value.issues] == [
        ("c.yaml", "$.environments.a2", f"declared already in {d / 'a.yaml'}")]
    put(d, "c.yaml", {"c1": env(limits={"calls": "many"})})
    issues = check_files([str(gateway)])  # `quotagate config check` sees the same
    assert [(Path(i.file).name, i.path) for i in issues] == [
        ("c.yaml", "$.environments.c1.limits.calls")]
    shutil.rmtree(d)
    with pytest.raises(ConfigError) as info:
        load_config(gateway)
    assert [i.path for i in info.value.issues] == ["$.environments_dir"]


def test_a_load_parses_again_only_the_files_that_changed(tmp_path: Path) -> None:
    d = tmp_path / "environments.d"
    for n in range(5):
        put(d, f"part-{n}.yaml", {f"e{n}-{i}": env(limits={"calls": i + 1}) for i in range(20)})
    put(d, "personal.yaml", {"on-personal": env(plan="personal")}, settled=False)
    shutil.copy(PLANS, tmp_path / "plans.yaml")
    gateway = staged(tmp_path, environments_dir="environments.d", plans_file="plans.yaml")
    sources = EnvSources()
    first = load_config(gateway, sources)
    assert len(sources.parsed) == 7  # environments.yaml and the six
    assert sources.files[str(d / "personal.yaml")].racy  # just written: content compared
    again = load_config(gateway, sources)
    assert sources.parsed == []
    assert file_digest(again) == file_digest(first)

    put(d, "part-3.yaml", {**{f"e3-{i}": env(limits={"calls": i + 1}) for i in range(20)},
                           "e3-0": env(limits={"calls": 999})})
    changed = load_config(gateway, sources)
    assert sources.parsed == [str(d / "part-3.yaml")]
    assert changed.environments.environments["e3-0"].limits.calls == 999
    # The other files' environments are the very objects loaded before: not parsed again.
    assert changed.environments.environments["e1-5"] is first.environments.environments["e1-5"]
    assert file_digest(changed) != file_digest(first)

    (d / "part-0.yaml").unlink()
    put(d, "part-9.yaml", {"new-one": env()})
    changed = load_config(gateway, sources)
    assert sources.parsed == [str(d / "part-9.yaml")]
    assert "e0-1" not in changed.environments.environments
    assert "new-one" in changed.environments.environments
    assert str(d / "part-0.yaml") not in sources.files  # forgotten with its file

    # plans.yaml changed: every file checked against the new plans, those not parsed again
    # too (a plan gone is named where it is used).
    plans = yaml.safe_load(PLANS.read_text())
    del plans["plans"]["personal"]
    (tmp_path / "plans.yaml").write_text(yaml.safe_dump(plans))
    with pytest.raises(ConfigError) as info:
        load_config(gateway, sources)
    assert sources.parsed == []
    assert [(Path(i.file).name, i.path) for i in info.value.issues] == [
        ("personal.yaml", "$.environments.on-personal.plan")]


async def test_a_reload_applies_one_changed_file(make_gateway, tmp_path: Path) -> None:
    d = tmp_path / "envs.d"
    for n in range(3):
        put(d, f"p{n}.yaml", {f"shop-{n}-{i}": env(limits={"calls": 1}) for i in range(10)})
    gw = await make_gateway({"main": env()}, environments_dir=str(d), reload_poll_ms=0)
    state = gw.app[STATE]
    h = {"X-CloudBase-Env": "shop-1-4"}
    assert (await gw.get("/functions/f", headers=h)).status == 200
    assert (await gw.get("/functions/f", headers=h)).status == 429
    before = state.config.environments.environments

    put(d, "p1.yaml", {**{f"shop-1-{i}": env(limits={"calls": 1}) for i in range(10)},
                       "shop-1-4": env(limits={"calls": 5})})
    assert await state.runtime.reload("test") is True
    assert state.config.sources is not None
    # (environments.yaml, written by the fixture just now, was read within 2 s of its change:
    # its content is compared, and it is not parsed again.)
    assert state.config.sources.parsed == [str(d / "p1.yaml")]
    assert state.config.environments.environments["shop-2-0"] is before["shop-2-0"]
    assert (await gw.get("/functions/f", headers=h)).status == 200  # 2 of 5 used

    (d / "p2.yaml").unlink()
    assert await state.runtime.reload("test") is True
    assert (await gw.get("/functions/f",
                         headers={"X-CloudBase-Env": "shop-2-0"})).status == 404


@pytest.mark.deployed
async def test_serve_picks_up_a_file_changed_added_or_removed(tmp_path: Path, valkey_url: str,
                                                              upstream) -> None:
    port, admin = free_ports(2)
    period = {"anchor": days(-40), "expires": days(400)}  # the real clock, whatever today is
    d = tmp_path / "environments.d"
    put(d, "a.yaml", {"shop-a": env(limits={"calls": 0}, **period)})
    write_config(tmp_path, {"main": env(**period)}, listen=f"127.0.0.1:{port}",
                 admin_listen=f"127.0.0.1:{admin}", store={"url": valkey_url},
                 plans_file=str(PLANS), reload_poll_ms=100, environments_dir="environments.d",
                 routes=[{"prefix": "/functions/", "kind": "function",
                          "upstream": f"http://127.0.0.1:{upstream.port}"}])
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/functions/f"

    async def status(s: aiohttp.ClientSession, env_id: str) -> int:
        async with s.get(url, headers={"X-CloudBase-Env": env_id}) as r:
            return r.status

    async def until(s: aiohttp.ClientSession, env_id: str, want: int) -> None:
        for _ in range(200):
            if await status(s, env_id) == want:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{env_id} never answered {want}")

    async def failures(s: aiohttp.ClientSession) -> float:
        async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
            text = await r.text()
        line = next((x for x in text.splitlines()
                     if x.startswith('quotagate_config_reloads_total{result="failure"}')), "")
        return float(line.split()[-1]) if line else 0.0

    async def refused_again(s: aiohttp.ClientSession, before: float) -> None:
        for _ in range(200):  # (a busy machine: the watcher's poll may come late)
            if await failures(s) > before:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the bad file was never refused")

    try:
        await wait_ready(admin, proc)
        async with aiohttp.ClientSession() as s:
            assert await status(s, "shop-a") == 429
            assert await status(s, "shop-b") == 404
            put(d, "a.yaml", {"shop-a": env(limits={"calls": 10}, **period)})
            await until(s, "shop-a", 200)
            put(d, "b.yaml", {"shop-b": env(**period)})
            await until(s, "shop-b", 200)
            # A JSON file, as a program writes one.
            (d / ".j.tmp").write_text(json.dumps({"environments": {"shop-j": env(**period)}}))
            os.replace(d / ".j.tmp", d / "j.json")
            await until(s, "shop-j", 200)
            (d / "a.yaml").unlink()
            await until(s, "shop-a", 404)
            refused = await failures(s)
            put(d, "b.yaml", {"shop-b": env(**period), "main": env(**period)})  # twice: refused
            await refused_again(s, refused)
            assert await status(s, "shop-b") == 200  # the last good config stays
            put(d, "b.yaml", {"shop-b": env(**period)}, settled=False)
            # A new file refused, then fixed in place (the directory's mtime stays): seen.
            refused = await failures(s)
            put(d, "c.yaml", {"shop-c": env(plan="gold", **period)}, settled=False)
            await refused_again(s, refused)
            assert await status(s, "shop-c") == 404
            (d / "c.yaml").write_text(yaml.safe_dump({"environments": {
                "shop-c": env(**period)}}))
            await until(s, "shop-c", 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "declared already in" in err and "last good config stays" in err
    assert "unknown plan 'gold'" in err


def test_a_big_file_is_parsed_by_a_child_process_to_the_same_config(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Past PARSE_ELSEWHERE_BYTES a file is parsed by ``python -m quotagate.settings.child``
    (its parse's memory peak stays there): the same environments, digest and issues as a
    parse here."""
    from quotagate.settings import load as load_module

    d = tmp_path / "environments.d"
    put(d, "a.yaml", {f"a{i}": env(limits={"calls": i + 1}, overage=bool(i % 2))
                      for i in range(2500)})
    put(d, "b.yaml", {"b1": env(plan="personal", packs=[
        {"id": "p1", "meter": "calls", "amount": 10, "purchased": "2026-11-02"}])})
    gateway = staged(tmp_path, environments_dir="environments.d")
    here = EnvSources()
    expected = load_config(gateway, here)
    assert not any(e.elsewhere for e in here.files.values())

    monkeypatch.setattr(load_module, "PARSE_ELSEWHERE_BYTES", 0)
    there = EnvSources()
    got = load_config(gateway, there)
    assert all(e.elsewhere for e in there.files.values()) and len(there.files) == 3
    assert got.environments == expected.environments
    assert got.environments.environments["b1"].packs == expected.environments.environments[
        "b1"].packs
    assert file_digest(got) == file_digest(expected)

    put(d, "a.yaml", {"bad": env(limits={"calls": "many"})})
    with pytest.raises(ConfigError) as child_says:
        load_config(gateway, there)
    monkeypatch.setattr(load_module, "PARSE_ELSEWHERE_BYTES", 1 << 40)
    with pytest.raises(ConfigError) as here_says:
        load_config(gateway, EnvSources())
    assert child_says.value.issues == here_says.value.issues
    assert [i.path for i in child_says.value.issues] == ["$.environments.bad.limits.calls"]
    # No child to be had: parsed here, said in the log, nothing else changes.
    monkeypatch.setattr(load_module, "PARSE_ELSEWHERE_BYTES", 0)
    monkeypatch.setattr(load_module.sys, "executable", str(tmp_path / "no-such-python"))
    fallback = EnvSources()
    with pytest.raises(ConfigError) as fallback_says:
        load_config(gateway, fallback)
    assert fallback_says.value.issues == here_says.value.issues
    assert not any(e.elsewhere for e in fallback.files.values())


def test_json_environments_files(tmp_path: Path) -> None:
    """A ``.json`` file (the environments file, or one in the directory) is read as JSON —
    many times faster than YAML — with the same checks, and a key given twice refused as in
    YAML."""
    d = tmp_path / "environments.d"
    d.mkdir()
    (d / "a.json").write_text(
        '{"environments": {"j1": {"plan": "personal", "anchor": "2026-11-01", '
        '"expires": "2027-11-01", "limits": {"calls": 5}, "paid": "19.90"}}}')
    put(d, "b.yaml", {"y1": env()})
    gateway = staged(tmp_path, environments_dir="environments.d")
    config = load_config(gateway)
    j1 = config.environments.environments["j1"]
    assert (j1.plan, j1.anchor.isoformat(), j1.limits.calls, j1.paid) == (
        "personal", "2026-11-01", 5, "19.90")
    assert "y1" in config.environments.environments

    cases = {
        '{"environments": {"j1": {"plan": "personal"}, "j1": {}}}':
            ("$", "invalid JSON: duplicate key 'j1'"),
        '{"environments": {"j1": {"plan": "personal",}}}':
            ("line 1, column 45", "invalid JSON: Expecting property name enclosed in double "
                                  "quotes"),
        '[1, 2]': ("$", "expected a mapping at the top level"),
        '{"environments": {"j1": {"plan": "personal", "anchor": "2026-11-01", '
        '"expires": "2027-11-01", "overage": "yes"}}}':
            ("$.environments.j1.overage", "Expected `bool`, got `str`"),
    }
    huge = '{"environments": {"j1": {"plan": "personal", "limits": {"calls": 1' + "0" * 5000
    cases[huge + "}}}}"] = ("$", "invalid JSON: Exceeds the limit (4300 digits) for integer "
                                 "string conversion: value has 5001 digits; use "
                                 "sys.set_int_max_str_digits() to increase the limit")
    # A lone surrogate escape: JSON allows it, no text does (the digest cannot encode it).
    cases['{"environments": {"j1": {"plan": "personal", "anchor": "2026-11-01", '
          '"expires": "2027-11-01", "timezone": "\\ud800"}}}'] = (
        "$", "invalid text: 'utf-8' codec can't encode character '\\ud800' in position 0: "
             "surrogates not allowed")
    for text, (path, reason) in cases.items():
        (d / "a.json").write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(gateway)
        assert [(i.path, i.reason) for i in info.value.issues] == [(path, reason)], text


def test_a_directory_holding_the_config_files_is_refused(tmp_path: Path) -> None:
    gateway = staged(tmp_path)
    settings = yaml.safe_load(gateway.read_text())
    gateway.write_text(yaml.safe_dump({**settings, "environments_dir": "."}))
    with pytest.raises(ConfigError) as info:
        load_config(gateway)
    assert [i.path for i in info.value.issues] == ["$.environments_dir"]
    assert "one of the config's own files" in info.value.issues[0].reason
