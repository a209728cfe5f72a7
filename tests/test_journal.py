"""Fail-open usage survives a crash (issue 13): two gateways serve through a store outage,
are killed (``kill -9``) before the store returns, and two new ones start at once with the
same journal directory — every admitted call is counted exactly once."""

from __future__ import annotations

import asyncio
import json
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
    configs: list[dict] = []
    gateways: list[Deployed] = []
    restarted: list[Deployed] = []
    try:
        # Each is staged once the one before listens, so the free ports it is given are not
        # that one's (staged together, both could be given one port).
        for name in "ab":
            configs.append(shipped_config(tmp_path / name, origin, store=store))
            gateways.append(await serve(tmp_path / name, configs[-1]))
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
        for gw in [*gateways, *restarted]:
            if gw.proc.poll() is None:  # (those the test killed are stopped already)
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
        assert (await recover(journal, "me", lim.write_back)).written == 2
        assert await used_calls(valkey_url, "jr2") == 5 + 700  # the calls once, the GBs
        assert (await recover(journal, "me", lim.write_back)).written == 0  # claimed, removed
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


# ------------------------------------------------------------ damaged journals (issue 23)


def test_keys_are_checked_against_the_backlogs_slots():
    """journal.py checks a key's slot without importing backlog.py (which imports it)."""
    from quotagate.limiter import backlog, journal

    assert journal.SLOT_MS == backlog.SLOT_MS
    assert {"function", "database", backlog.METER_PREFIX + "gbs"} <= journal.KNOWN_WHAT


async def outage_journals(tmp_path: Path, store_server, origin: str,
                          plans: list[list[tuple[str, int]]]) -> tuple[list[dict], Path]:
    """One ``quotagate serve`` per plan over one journal directory: each environment of the
    plans is put and called once by each gateway while the store is up; the store is killed,
    each gateway makes its plan's calls (fail-open), all are killed (``kill -9``), the store
    is started again. Returns the gateways' configs and the journal directory."""
    journal = tmp_path / "journal"
    store = {"url": store_server.url, "timeout_ms": 200, "journal_dir": str(journal)}
    configs = [shipped_config(tmp_path / f"g{i}", origin, store=store)
               for i in range(len(plans))]
    gateways = [await serve(tmp_path / f"g{i}", cfg) for i, cfg in enumerate(configs)]
    try:
        envs = sorted({env_id for plan in plans for env_id, _ in plan})
        for env_id in envs:
            gateways[0].put_env(env_id, f"plan: standard\nanchor: {days(-2)}\n"
                                        f"expires: {days(300)}\n")
        for gw in gateways:  # each has seen them in the store: known to exist
            for env_id in envs:
                assert [s for s, _ in await calls(gw, env_id, 1)] == [200]
        store_server.kill()
        for gw, plan in zip(gateways, plans, strict=True):
            for env_id, n in plan:
                assert set(await calls(gw, env_id, n)) == {(200, "store-unavailable")}
        for gw in gateways:  # killed before the store comes back: nothing written back
            gw.proc.kill()
            gw.proc.wait()
    finally:
        for gw in gateways:
            gw.stop()
    assert len(list(journal.glob("*.journal"))) == len(plans)
    store_server.start()
    return configs, journal


async def calls_in_store(url: str, env_id: str) -> int:
    """The calls the store counts for ``env_id`` (plan quota and pay-as-you-go)."""
    import redis.asyncio as aredis

    from quotagate.limiter import keys

    client = aredis.Redis.from_url(url)
    try:
        fields = {**await client.hgetall(keys.usage(env_id)),
                  **await client.hgetall(keys.payg(env_id))}
    finally:
        await client.aclose()
    return sum(int(v) for k, v in fields.items() if k.decode().split(":")[1] == "calls")


async def scrape(gw: Deployed, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{gw.admin}/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.split(" ")[0] == name)


async def until(check, seconds: float = 90) -> None:
    """Poll ``check()`` (async) until true; generous: a busy 2-core machine."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)


def hostile_lines(slot: int) -> list[bytes]:
    """Lines no journal writes, each of a key of its own (one taken would count calls)."""
    slots = iter(range(slot - 15 * 60_000, 0, -15 * 60_000))

    def line(text: str) -> bytes:
        return text.replace("S", str(next(slots))).encode()

    return [
        line('{"k":["jr","database",S],"v":1e30}'),
        line('{"k":["jr","database",S],"v":Infinity}'),
        line('{"k":["jr","database",S],"v":NaN}'),
        line('{"k":["jr","database",S],"v":-5}'),
        line('{"k":["jr","database",S],"v":2.5}'),
        line('{"k":["jr","database",S],"v":"7"}'),
        line('{"k":["jr","database",S],"v":9007199254740992}'),  # 2^53
        b"[" * 100_000,  # longer than any line the journal writes
        b"[" * 3_000,  # nested deeper than the parser goes
        line('{"k":["jr","database",S],"v":3,"by":"hand"}'),  # an unknown field
        line('{"k":["JR_1","database",S],"v":3}'),  # not an environment id
        line('{"k":["jr","coffee",S],"v":3}'),  # not a route kind or meter
        line('{"k":["jr","meter:cups",S],"v":3}'),
        line('{"k":["jr","database",S],"v":3}').replace(b'],"v"', b'1],"v"'),  # mid-slot
        line('{"k":["jr","database",S],"v":3,"v":4}'),  # a field twice
        line('{"k":["jr","database",S],"w":3,"id":"../x y"}'),
        line('{"k":["jr","database",S],"v":true}'),
        line('{"k":["jr","database",S]}'),
        line('{"k":["jr","database",S],"v":3}').replace(b'"jr"', b'"j\xffr"'),  # not UTF-8
    ]


async def test_damaged_lines_are_skipped_and_every_real_entry_is_written_back_once(
        tmp_path: Path, own_valkey):
    """Hostile lines before the real ones of the journal that sorts first, and a line cut
    at its end: a gateway's start skips each (logged with file and line, counted in
    quotagate_journal_lines_skipped_total), writes back every real entry of both journals
    exactly once, and removes them."""
    upstream, origin = start_upstream()
    restarted: Deployed | None = None
    try:
        configs, journal = await outage_journals(tmp_path, own_valkey, origin,
                                                 [[("jr", 12)], [("jr", 8)]])
        first, second = sorted(journal.glob("*.journal"))
        real = first.read_bytes()
        slot = json.loads(real.splitlines()[0])["k"][2]
        bad = hostile_lines(slot)
        cut = len(bad) + len(real.splitlines()) + 1  # the last line's number
        first.write_bytes(b"\n".join(bad) + b"\n" + real + b'{"k":["jr","database",9')
        restarted = await serve(tmp_path / "g0", configs[0])

        async def recovered() -> bool:
            return (not first.exists() and not second.exists()
                    and await calls_in_store(own_valkey.url, "jr") == 2 + 20)

        await until(recovered)
        await asyncio.sleep(0.5)  # and nothing more after that
        log = restarted.log_text()
        assert await calls_in_store(own_valkey.url, "jr") == 2 + 20, log[-3000:]
        assert not first.exists() and not second.exists(), log[-3000:]
        for number in [*range(1, len(bad) + 1), cut]:
            assert f"{first.name}, line {number}: skipped" in log, (number, log[-3000:])
        assert await scrape(restarted, "quotagate_journal_lines_skipped_total") \
            == len(bad) + 1
        assert "Traceback" not in log, log[-3000:]
    finally:
        if restarted is not None:
            restarted.stop()
        upstream.kill()
        upstream.wait()


async def test_an_entry_the_store_refuses_is_kept_while_the_others_are_written_back(
        tmp_path: Path, own_valkey):
    """The store answers one environment's write-backs with an error (WRONGTYPE: its QPS
    key is a hash) and they come first in both journals: every other entry is written back,
    the refused ones are tried a bounded number of times and kept in their journals (not
    removed); once the key is right again, the next start writes them back, once."""
    import redis.asyncio as aredis

    from quotagate.limiter import keys
    from quotagate.limiter.journal import replay

    upstream, origin = start_upstream()
    gateways: list[Deployed] = []
    try:
        configs, journal = await outage_journals(
            tmp_path, own_valkey, origin, [[("jx", 5), ("jr", 12)], [("jx", 3), ("jr", 8)]])
        journals = sorted(journal.glob("*.journal"))
        refused = [[entry for entry in replay(path) if entry[0][:2] == ("jx", "function")]
                   for path in journals]
        admin = aredis.Redis.from_url(own_valkey.url)
        await admin.delete(keys.qps("jx"))
        await admin.hset(keys.qps("jx"), "not", "a string")
        gateways.append(await serve(tmp_path / "g0", configs[0]))

        async def others_written() -> bool:
            return (await calls_in_store(own_valkey.url, "jr") == 2 + 20
                    and gateways[0].log_text().count("kept in the journal") >= 2)

        await until(others_written)
        log = gateways[0].log_text()
        assert await calls_in_store(own_valkey.url, "jr") == 2 + 20, log[-3000:]
        assert await calls_in_store(own_valkey.url, "jx") == 2, log[-3000:]
        assert "WRONGTYPE" in log and "tried again in" in log, log[-3000:]
        # Kept: each journal holds just the refused calls, under the ids they had.
        held = [replay(path) for path in journals]
        assert held == refused, held
        assert sorted(sum(n for _, n, _ in entries) for entries in held) == [3, 5]

        await admin.delete(keys.qps("jx"))  # the store takes them again
        await admin.aclose()
        gateways[0].stop()
        gateways.append(await serve(tmp_path / "g0", configs[0]))

        async def all_written() -> bool:
            return (not any(path.exists() for path in journals)
                    and await calls_in_store(own_valkey.url, "jx") == 2 + 8)

        await until(all_written)
        await asyncio.sleep(0.5)  # and nothing more after that
        log = gateways[1].log_text()
        assert await calls_in_store(own_valkey.url, "jx") == 2 + 8, log[-3000:]
        assert await calls_in_store(own_valkey.url, "jr") == 2 + 20, log[-3000:]
        assert not any(path.exists() for path in journals), log[-3000:]
    finally:
        for gw in gateways:
            if gw.proc.poll() is None:
                gw.stop()
        upstream.kill()
        upstream.wait()
