"""A store that hangs or dies mid-test: bounded waits, fail-open / fail-closed, recovery,
script reload after SCRIPT FLUSH and restart, and write-back of fail-open usage."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest
import redis.asyncio as aredis

from quotagate.common.addresses import StoreAddress
from quotagate.limiter import keys
from quotagate.limiter.codes import Outcome
from quotagate.limiter.embedded import EmbeddedValkey
from quotagate.limiter.errors import StoreTimeout, StoreUnavailable
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.scripts import LIBRARY_NAME
from quotagate.limiter.store import PipelinedStore
from tests.helpers import at, env, synced_limiter, write_config

TIMEOUT_MS = 150


async def used_calls(url: str, env_id: str = "shop") -> int:
    client = aredis.Redis.from_url(url)
    try:
        values = await client.hvals(keys.usage(env_id))
    finally:
        await client.aclose()
    return sum(int(v) for v in values)


def write_config_for_shop():
    import tempfile

    return write_config(Path(tempfile.mkdtemp()), {"shop": env(limits={"calls": 1000})})


@pytest.fixture
async def setup(tmp_path: Path, own_valkey: EmbeddedValkey):
    config = write_config_for_shop()
    made = []

    async def make(policy: str = "open"):
        lim = await synced_limiter(own_valkey.url, config, at("2026-11-26T12:00:00"),
                                   timeout_ms=TIMEOUT_MS, on_failure=policy)
        made.append(lim)
        return lim

    yield own_valkey, make
    own_valkey.resume()
    for lim in made:
        await lim.close()


async def timed(coro):
    started = time.monotonic()
    try:
        return await coro, time.monotonic() - started
    except Exception as exc:
        return exc, time.monotonic() - started


# A hung store costs at most the timeout plus one watchdog tick (timeout / 4), plus slack for a
# loaded 2-core machine; a request must never wait for the OS's TCP timeouts.
BOUND_S = TIMEOUT_MS / 1000 * 1.25 + 0.35


async def test_hung_store_fail_open_is_bounded_and_written_back(setup):
    server, make = setup
    lim = await make("open")
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
    server.pause()  # SIGSTOP: connection open, no answer
    results = await asyncio.gather(*(timed(lim.decide("shop", "function", 1)) for _ in range(20)))
    for decision, elapsed in results:
        assert decision.store_bypassed and decision.admitted
        assert elapsed < BOUND_S
    # While it is known down, requests fail fast without waiting again.
    decision, elapsed = await timed(lim.decide("shop", "function", 1))
    assert decision.store_bypassed and elapsed < 0.05
    assert lim.backlog.total("shop") == 21
    server.resume()
    await drained(lim)
    # The 20 that timed out ran once the server resumed: what they charged was given back,
    # and the backlog wrote all 21 back. Exactly once each.
    assert await settled_at(server.url, 1 + 21) == 1 + 21
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED


async def settled_at(url: str, expected: int, env_id: str = "shop") -> int:
    """What the store counts once refunds and write-backs have landed (bounded wait)."""
    deadline = time.monotonic() + 8
    used = await used_calls(url, env_id)
    while used != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        used = await used_calls(url, env_id)
    await asyncio.sleep(0.3)  # and nothing more after that
    return await used_calls(url, env_id)


async def drained(lim, seconds: float = 8.0) -> None:
    deadline = time.monotonic() + seconds
    while lim.backlog.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not lim.backlog.pending, lim.backlog.pending


async def test_hung_store_killed_then_restarted_writes_back_exactly(setup):
    """Commands stuck in a frozen server that then dies never ran: all written back once."""
    server, make = setup
    lim = await make("open")
    await lim.decide("shop", "function", 1)
    server.pause()
    results = await asyncio.gather(*(lim.decide("shop", "function", 1) for _ in range(15)))
    assert all(r.store_bypassed for r in results)
    server.kill()
    server.start()  # same port, same data directory (still this test's: it holds the lock)
    await drained(lim)
    assert await used_calls(server.url) == 1 + 15


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_store_that_cannot_serve_applies_the_policy(setup, policy):
    """OOM (and BUSY, LOADING, READONLY…) replies are "unavailable", not request errors —
    also right after a SCRIPT FLUSH, when the EVAL fallback is what meets the error."""
    server, make = setup
    lim = await make(policy)
    await lim.decide("shop", "function", 1)
    client = aredis.Redis.from_url(server.url)
    try:
        await client.script_flush()
        await client.config_set("maxmemory", 1)
        outcome = await timed(lim.decide("shop", "function", 1))
        if policy == "closed":
            assert isinstance(outcome[0], StoreUnavailable) and "OOM" in str(outcome[0])
        else:
            assert outcome[0].store_bypassed
    finally:
        await client.config_set("maxmemory", 0)
        await client.aclose()
    if policy == "open":
        await drained(lim)
        assert await used_calls(server.url) == 2


async def test_write_back_survives_a_store_that_lost_its_data(setup):
    server, make = setup
    missing: list[str] = []
    lim = await make("open")
    lim.on_missing = missing.append
    await lim.decide("shop", "function", 1)
    server.kill()
    assert (await lim.decide("shop", "function", 1)).store_bypassed
    snapshot_dir = server.data_dir
    for f in snapshot_dir.glob("appendonlydir/*"):  # the restart comes back empty
        f.unlink()
    server.start()  # same port, same data directory (still this test's: it holds the lock)
    await asyncio.sleep(0.5)
    await lim.flush_backlog()
    assert lim.backlog.total("shop") == 1  # kept: the store has no snapshot to record against
    assert "shop" in missing  # the gateway re-syncs on this
    await synced_limiter(server.url, write_config_for_shop(), at("2026-11-26T12:00:00"))
    await lim.flush_backlog()
    assert not lim.backlog.pending
    assert await used_calls(server.url) == 1


async def test_write_back_records_at_the_time_the_usage_passed(setup, tmp_path: Path):
    """An outage across local midnight and a cycle reset: each pass lands on its own day and
    cycle; an environment that expired meanwhile still gets its usage recorded."""
    from quotagate.common.calendar import day_number

    server, _ = setup
    config = write_config(tmp_path / "x", {"shop": env(limits={"calls": 0}, overage=True,
                                                       expires="2026-12-01")})
    clock = at("2026-11-30T23:50:00")
    lim = await synced_limiter(server.url, config, clock, timeout_ms=TIMEOUT_MS)
    try:
        server.pause()
        assert (await lim.decide("shop", "function", 3)).store_bypassed
        clock.advance(minutes=20)  # 12-01 00:10: new day, new cycle, and the plan expired
        server.resume()
        await drained(lim)
        client = aredis.Redis.from_url(server.url)
        payg = await client.hgetall(keys.payg("shop"))
        await client.aclose()
        import datetime as dt

        assert payg == {f"{day_number(dt.date(2026, 11, 30))}:calls".encode(): b"3"}
    finally:
        await lim.close()


async def test_concurrent_flushes_write_each_entry_once(setup):
    server, make = setup
    lim = await make("open")
    await lim.decide("shop", "function", 1)
    server.kill()
    for _ in range(7):
        await lim.decide("shop", "function", 1)
    server.start()  # same port, same data directory (still this test's: it holds the lock)
    await asyncio.sleep(0.3)
    await asyncio.gather(lim.flush_backlog(), lim.flush_backlog(), lim.flush_backlog())
    assert await used_calls(server.url) <= 1 + 7  # never twice
    # A write-back that timed out (150 ms: a busy machine) stays in doubt and goes again
    # under its id at the next flush, counted once; a loaded CI run left one so (7 of 8).
    for _ in range(50):
        if not lim.backlog.pending and not lim.backlog.in_doubt:
            break
        await asyncio.sleep(0.1)
        await lim.flush_backlog()
    assert not lim.backlog.pending and not lim.backlog.in_doubt
    assert await used_calls(server.url) == 1 + 7


async def test_hung_store_fail_closed_raises_within_bound(setup):
    server, make = setup
    lim = await make("closed")
    await lim.decide("shop", "function", 1)
    server.pause()
    exc, elapsed = await timed(lim.decide("shop", "function", 1))
    assert isinstance(exc, StoreTimeout)
    assert elapsed < BOUND_S
    exc, elapsed = await timed(lim.decide("shop", "function", 1))
    assert isinstance(exc, StoreUnavailable) and elapsed < 0.05
    assert not lim.backlog.pending


async def test_a_503_is_never_charged_even_when_its_call_runs_late(setup):
    """Fail-closed: calls stuck in a frozen store time out (the client gets 503) and run when
    it resumes; each is given back once, so what the store counts is what was admitted."""
    server, make = setup
    lim = await make("closed")
    assert (await lim.decide("shop", "function", 1)).admitted
    server.pause()
    results = await asyncio.gather(*(timed(lim.decide("shop", "function", 1))
                                     for _ in range(20)), timed(lim.decide(
                                         "shop", "function", 1, "fn:f")))
    assert all(isinstance(exc, StoreTimeout) for exc, _ in results)
    server.resume()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and await used_calls(server.url) != 1:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # nothing given back twice either
    assert await used_calls(server.url) == 1
    await lim.renew()  # (every renew_interval_ms in a gateway) the slot went back too
    client = aredis.Redis.from_url(server.url)
    try:
        assert int(await client.hget(keys.slots("shop"), "=fn:f") or 0) == 0
    finally:
        await client.aclose()


async def test_killed_store_then_restart_recovers_and_reloads_script(setup, tmp_path: Path):
    server, make = setup
    lim = await make("open")
    for _ in range(3):
        await lim.decide("shop", "function", 1)
    server.kill()
    decision, elapsed = await timed(lim.decide("shop", "function", 1))
    assert decision.store_bypassed and elapsed < BOUND_S
    # Same port, same data dir: the append-only file brings the state back, not the scripts.
    server.start()  # same port, same data directory (still this test's: it holds the lock)
    reloads = lim.script_reloads
    await asyncio.sleep(0.15)  # past the retry interval
    decision = await lim.decide("shop", "function", 1)
    assert decision.outcome is Outcome.ADMITTED and not decision.store_bypassed
    assert lim.script_reloads == reloads  # the new connection loaded it before the call
    await lim.flush_backlog()
    assert await used_calls(server.url) == 3 + 1 + 1


@pytest.mark.parametrize("flushed", [("function",), ("function", "script")])
async def test_function_and_script_flush_is_not_fatal(setup, flushed):
    server, make = setup
    lim = await make("closed")
    await lim.decide("shop", "function", 1)
    client = aredis.Redis.from_url(server.url)
    if "function" in flushed:
        await client.function_flush()
    if "script" in flushed:
        await client.script_flush()
    results = await asyncio.gather(*(lim.decide("shop", "function", 1) for _ in range(10)))
    assert all(r.outcome is Outcome.ADMITTED for r in results)
    assert lim.script_reloads >= 1
    assert await used_calls(server.url) == 11
    # The library is back for the next calls: no reload more.
    assert await client.function_list(LIBRARY_NAME)
    reloads = lim.script_reloads
    await lim.decide("shop", "function", 1)
    assert lim.script_reloads == reloads and lim.functions
    await client.aclose()


@pytest.mark.parametrize("denied", [["-function", "-fcall", "-fcall_ro"], ["-function"]],
                         ids=["no-fcall", "fcall-but-no-load"])
async def test_store_refusing_functions_falls_back_to_scripts(tmp_path: Path, own_valkey,
                                                              denied):
    """An ACL without FUNCTION and FCALL (as some managed services set), or with FCALL but no
    way to load the library: the connection still opens, the first calls learn it, every
    later call is a script (no reload per request), and counts stay exact."""
    admin = aredis.Redis.from_url(own_valkey.url)
    await admin.function_flush()
    await admin.acl_setuser("scripts-only", enabled=True, passwords=["+pw"], keys=["*"],
                            channels=["*"], commands=["+@all", *denied])
    await admin.aclose()
    url = own_valkey.url.replace("redis://", "redis://scripts-only:pw@")
    lim = await synced_limiter(url, write_config_for_shop(), at("2026-11-26T12:00:00"))
    try:
        results = await asyncio.gather(*(lim.decide("shop", "function", 1) for _ in range(5)))
        assert all(r.outcome is Outcome.ADMITTED for r in results)
        assert not lim.functions
        reloads = lim.script_reloads
        for _ in range(3):
            await lim.decide("shop", "function", 1)
        assert lim.script_reloads == reloads  # scripts from now on, nothing re-sent
        assert await lim.scripts_loaded()
        lim.meter("shop", "gbs", 5)
        lim.release("shop", "fn:x")
        assert await lim.renew() == {"shop": 0}  # settle and renew as scripts too
    finally:
        await lim.close()
    client = aredis.Redis.from_url(own_valkey.url)
    usage = {k.decode().split(":", 1)[1]: int(v)
             for k, v in (await client.hgetall(keys.usage("shop"))).items()}
    await client.aclose()
    assert usage == {"calls": 8, "gbs": 5}


async def test_unreachable_store_at_start_fails_fast(tmp_path: Path):
    from quotagate.common.addresses import StoreAddress
    from quotagate.limiter.embedded import free_port
    from quotagate.limiter.limiter import Limiter
    from quotagate.limiter.store import PipelinedStore

    store = PipelinedStore(StoreAddress(port=free_port()), timeout_ms=TIMEOUT_MS)
    lim = Limiter(store, on_failure="closed")
    exc, elapsed = await timed(lim.decide("shop", "function", 1))
    assert isinstance(exc, StoreUnavailable) and elapsed < BOUND_S
    await lim.close()


async def test_store_at_maxmemory_still_refuses(own_valkey):
    """At maxmemory (noeviction) a function that may write is refused before it runs; the
    decision goes again as a script, which runs until it writes: a refusal is still decided,
    an admission meets the failure policy, and a new connection still opens."""
    config = write_config(Path(tempfile.mkdtemp()), {
        "shop": env(limits={"calls": 1000}), "empty": env(limits={"calls": 0})})
    lim = await synced_limiter(own_valkey.url, config, at("2026-11-26T12:00:00"),
                               on_failure="closed")
    admin = aredis.Redis.from_url(own_valkey.url)
    try:
        assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
        await admin.set("ballast", b"x" * (1024 * 1024))
        used = int((await admin.info("memory"))["used_memory"])
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", used // 2)  # over: writes are refused
        fresh = Limiter(PipelinedStore(StoreAddress.from_url(own_valkey.url)),
                        clock=at("2026-11-26T12:00:00"), on_failure="closed")
        for limiter in (lim, fresh):  # (a new connection's set-up meets the OOM too)
            refused = await limiter.decide("empty", "function", 1)
            assert refused.outcome is Outcome.QUOTA_EXCEEDED
            with pytest.raises(StoreUnavailable):
                await limiter.decide("shop", "function", 1)
            if limiter is not lim:
                await limiter.close()
        await admin.config_set("maxmemory", 0)
        assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
        assert lim.functions
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
        await lim.close()
    assert await used_calls(own_valkey.url) == 2


async def test_fail_open_admits_only_environments_known_to_exist(tmp_path: Path,
                                                                 make_gateway):
    """With the store away, a made-up (valid-looking) environment id is refused 503, never
    proxied uncounted, and takes no room in the backlog; a declared one passes and is kept
    for write-back. A full backlog refuses rather than admits uncounted."""
    from quotagate.gateway.app import STATE
    from quotagate.limiter.embedded import free_port
    from tests.helpers import assert_problem

    gw = await make_gateway({"shop": env()}, store_url=f"redis://127.0.0.1:{free_port()}/0",
                            store={"timeout_ms": 100}, on_store_failure="open")
    for stranger in ("made-up-1", "made-up-2"):
        body = await assert_problem(await gw.get("/functions/f", headers={
            "X-CloudBase-Env": stranger}), 503)
        assert body["code"] == "STORE_UNAVAILABLE"
    resp = await gw.get("/database/x", headers={"X-CloudBase-Env": "shop"})
    assert resp.status == 200 and resp.headers["X-Quotagate-Bypass"] == "store-unavailable"
    limiter = gw.app[STATE].limiter
    assert {key[0] for key in limiter.backlog.pending} == {"shop"}

    limiter.backlog.max_per_env = len(limiter.backlog.pending)  # this environment's room
    for path in ("/functions/f", "/storage/x"):  # new keys (other kinds): no room
        await assert_problem(await gw.get(path, headers={"X-CloudBase-Env": "shop"}), 503)
    assert (await gw.get("/database/x", headers={"X-CloudBase-Env": "shop"})).status == 200
    assert limiter.backlog.dropped == 0  # nothing admitted was lost
    assert sum(limiter.backlog.pending.values()) == 2


async def test_a_refused_fail_open_call_that_runs_late_is_given_back(setup, tmp_path: Path):
    """Fail-open, an environment this instance does not know: refused 503 while the store
    hangs; its call runs when the store resumes, and is given back."""
    server, make = setup
    lim = await make("open")
    other = write_config(tmp_path / "o", {"shop": env(limits={"calls": 1000}),
                                           "other": env()})
    client = aredis.Redis.from_url(server.url)
    from quotagate.limiter.sync import sync_environments

    await sync_environments(client, other)  # e.g. put by another instance's admin API
    await client.aclose()
    await lim.decide("shop", "function", 1)
    server.pause()
    exc, _ = await timed(lim.decide("other", "function", 1))
    assert isinstance(exc, StoreUnavailable) and "not known" in str(exc)
    server.resume()
    # The late reply is read, then its refund settled (sent again every REFUND_RETRY_S while
    # the reconnect waits out retry_interval_ms): given back within a few seconds.
    for _ in range(50):
        if await used_calls(server.url, "other") == 0:
            break
        await asyncio.sleep(0.1)
    assert await used_calls(server.url, "other") == 0
    assert await used_calls(server.url, "shop") == 1
    assert not lim.backlog.pending


async def test_a_write_back_that_times_out_and_runs_late_is_not_counted_twice(setup):
    server, make = setup
    lim = await make("open")
    await lim.decide("shop", "function", 1)
    server.pause()
    decisions = await asyncio.gather(*(lim.decide("shop", "function", 1) for _ in range(3)))
    assert all(d.store_bypassed for d in decisions)
    server.resume()
    await drained(lim)  # the three ran late (given back) and were written back
    assert await settled_at(server.url, 1 + 3) == 1 + 3
    assert (await lim.decide("shop", "function", 1)).admitted
    server.pause()
    lim.backlog.admit(("shop", "function", 1_795_000_000_000 - 1_795_000_000_000 % 900_000), 4)
    with pytest.raises(StoreTimeout):
        await lim.flush_backlog()  # sent: in doubt
    server.resume()
    await asyncio.sleep(0.3)  # it ran
    await lim.flush_backlog()  # sent again under the same id: not counted again
    assert not lim.backlog.pending and not lim.backlog.in_doubt
    assert await settled_at(server.url, 1 + 3 + 1 + 4) == 1 + 3 + 1 + 4


async def test_api_owned_environments_are_read_at_start_a_bounded_number(
        make_gateway, store, monkeypatch):
    """The API-owned environments admitted fail-open are read once, when the environments
    are written, by SSCAN and at most KNOWN_AT_START of them (issue 24: 10^6 ids read into
    every process every 30 s before); the clock's follower reads them no more."""
    from quotagate.control import runtime
    from quotagate.gateway.app import STATE

    ids = [f"api-{i:04d}" for i in range(2500)]
    await store.sadd(keys.API_OWNED_ENVS, *ids)
    monkeypatch.setattr(runtime, "KNOWN_AT_START", 2000)
    monkeypatch.setattr(runtime, "SYNC_INTERVAL_S", 0.05)  # the clock's follower, 20 x a second
    gw = await make_gateway({"shop": env()})
    rt = gw.app[STATE].runtime
    assert rt.synced
    learned = rt.limiter.known & set(ids)
    assert len(learned) == 2000, len(learned)  # (all 2,500 with no bound)
    assert "shop" in rt.limiter.known
    await store.config_resetstat()
    await asyncio.sleep(0.5)  # ~10 rounds of the clock's follower
    stats = await store.info("commandstats")
    assert not {"cmdstat_smembers", "cmdstat_sscan"} & set(stats), stats
