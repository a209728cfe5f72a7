"""Fail-open usage survives a crash (issue 13): two gateways serve through a store outage,
are killed (``kill -9``) before the store returns, and two new ones start at once with the
same journal directory — every admitted call is counted exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.deployed import Deployed, days, serve, shipped_config, start_upstream

pytestmark = pytest.mark.deployed


async def calls(gw: Deployed, env_id: str, n: int) -> list[tuple[int, str]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(gw.route("function") + "f",
                             headers={"X-CloudBase-Env": env_id}) as r:
                await r.read()
                out.append((r.status, r.headers.get("X-Quotagate-Bypass", "")))
    return out


async def test_usage_admitted_during_an_outage_survives_kill_9_exactly_once(
        tmp_path: Path, own_valkey):
    upstream, origin = start_upstream()
    journal = tmp_path / "journal"
    store = {"url": own_valkey.url, "timeout_ms": 200, "journal_dir": str(journal)}
    configs = [shipped_config(tmp_path / name, origin, store=store) for name in "ab"]
    gateways = [await serve(tmp_path / name, cfg) for name, cfg in zip("ab", configs,
                                                                        strict=True)]
    restarted: list[Deployed] = []
    try:
        gateways[0].put_env("jr", f"plan: standard\nanchor: {days(-2)}\nexpires: {days(300)}\n")
        for gw in gateways:  # each has seen the environment in the store: known to exist
            assert [s for s, _ in await calls(gw, "jr", 2)] == [200, 200]
        own_valkey.kill()
        during = [await calls(gw, "jr", n) for gw, n in zip(gateways, (30, 20), strict=True)]
        for answers in during:
            assert {a for a in answers} == {(200, "store-unavailable")}
        for gw in gateways:  # killed before the store comes back: nothing written back
            gw.proc.kill()
            gw.proc.wait()
            gw.stop()
        assert len(list(journal.glob("*.journal"))) == 2
        own_valkey.start()
        # Two new instances start at once over the same journals: each journal is claimed
        # by one, and written back once.
        restarted = list(await asyncio.gather(*(serve(tmp_path / name, cfg) for name, cfg
                                                in zip("ab", configs, strict=True))))
        used = -1
        for _ in range(100):
            used = restarted[0].json("env", "usage", "jr")["meters"]["calls"]["used"]
            if used == 4 + 50 and not list(journal.glob("*.journal"))[2:]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert restarted[0].json("env", "usage", "jr")["meters"]["calls"]["used"] == 4 + 50
        left = {p.name for p in journal.glob("*.journal")}
        assert len(left) == 2, left  # only the new instances' own (empty) journals
    finally:
        for gw in restarted:
            gw.stop()
        upstream.kill()
        upstream.wait()


async def test_a_replayed_entry_the_store_took_before_the_crash_is_not_counted_twice(
        tmp_path: Path, valkey_url: str):
    """The process died after the store took a write-back and before its journal said so:
    the replay sends it again under the same id, and the store counts it once."""
    import json

    from quotagate.limiter.journal import recover
    from tests.helpers import at, env, synced_limiter, write_config
    from tests.test_store_failure import used_calls

    config = write_config(tmp_path / "cfg", {"jr2": env()})
    lim = await synced_limiter(valkey_url, config, at("2026-11-26T12:00:00"))
    try:
        slot = 1_795_000_000_000 - 1_795_000_000_000 % (15 * 60 * 1000)
        assert await lim.write_back("jr2", "function", 5, slot, "dead.7")
        assert await used_calls(valkey_url, "jr2") == 5
        journal = tmp_path / "journal"
        journal.mkdir()
        key = ["jr2", "function", slot]
        (journal / "dead.journal").write_text(
            json.dumps({"k": key, "v": 5}) + "\n"
            + json.dumps({"k": key, "w": 5, "id": "dead.7"}) + "\n"
            + json.dumps({"k": ["jr2", "meter:gbs", slot], "v": 700}) + "\n"
            + '{"k": ["jr2", "func')  # a line cut by the crash
        assert await recover(journal, "me", lim.write_back) == 2
        assert await used_calls(valkey_url, "jr2") == 5 + 700  # the calls once, the GBs
        assert await recover(journal, "me", lim.write_back) == 0  # claimed and removed
        assert not list(journal.glob("dead.*"))
    finally:
        await lim.close()


def test_replay_keeps_an_open_intent_through_later_value_lines(tmp_path: Path):
    """An add (or a late removal) while a write-back is in flight writes a value line: the
    intent stays open until its own answer (``d``) closes it."""
    import json

    from quotagate.limiter.journal import replay

    key = ["e", "function", 900_000]
    path = tmp_path / "gone.journal"
    path.write_text("".join(json.dumps(line) + "\n" for line in (
        {"k": key, "v": 10}, {"k": key, "w": 10, "id": "A.1"}, {"k": key, "v": 13},
        {"k": ["e", "database", 900_000], "v": 2}, {"k": ["e", "database", 900_000], "w": 2,
                                                     "id": "A.2"},
        {"k": ["e", "database", 900_000], "v": 0, "d": "A.2"})))
    assert sorted(replay(path)) == sorted([
        (("e", "function", 900_000), 10, "A.1"),          # again, under its id
        (("e", "function", 900_000), 3, "gone.function.900000")])  # the rest
