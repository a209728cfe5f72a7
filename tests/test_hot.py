"""Hot environments decided from leased budgets (hot.py, lease.lua), against a real store: the
store sees about one call per lease, and nothing is over-admitted, lost or charged unused."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.limiter import hot as hot_module
from quotagate.limiter import keys
from quotagate.limiter.codes import Flag, Outcome
from tests.helpers import at, env, script_calls, synced_limiter, until, write_config

CYCLE = day_number(dt.date(2026, 11, 1))
CALLS = f"{CYCLE}:calls".encode()


@pytest.fixture
async def limiters(store_url):
    made = []

    async def factory(config, clock=None, **kw):
        kw.setdefault("timeout_ms", 5_000)  # a busy machine: no fail-open in these tests
        lim = await synced_limiter(store_url, config, clock or at("2026-11-26T12:00:00"), **kw)
        made.append(lim)
        return lim

    yield factory
    for lim in made:
        await lim.close()


async def drive(lims, env_id: str, seconds: float, per_tick: int = 50,
                kind: str = "database") -> Counter:
    """Each limiter decides ``per_tick`` requests of ``env_id`` per loop tick, for ``seconds``:
    outcomes counted, leased ones apart."""
    seen: Counter = Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        batch = [lim.decide(env_id, kind, 1) for lim in lims for _ in range(per_tick)]
        for d in await asyncio.gather(*batch):
            seen[(d.outcome, bool(d.flags & Flag.LEASED))] += 1
        await asyncio.sleep(0)
    return seen


def admitted(seen: Counter) -> int:
    return seen[(Outcome.ADMITTED, True)] + seen[(Outcome.ADMITTED, False)]


async def used(client: aredis.Redis, env_id: str = "shop") -> int:
    return int(await client.hget(keys.usage(env_id), CALLS) or 0)


async def day_used(client: aredis.Redis, env_id: str = "shop") -> int:
    """The calls the day's count holds (the clock of these tests: 2026-11-26)."""
    day = day_number(dt.date(2026, 11, 26))
    return int(await client.hget(keys.days(env_id), f"{day}:calls") or 0)


async def test_hot_environment_is_decided_in_memory(tmp_path: Path, limiters, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10_000_000,
                                                         "qps": 1_000_000})})
    lim = await limiters(config)
    before = script_calls(await redis_client.info("commandstats"))
    seen = await drive([lim], "shop", 1.5)
    calls = script_calls(await redis_client.info("commandstats")) - before
    total = sum(seen.values())
    assert seen[(Outcome.ADMITTED, True)] > total / 2, seen
    assert calls / total < 0.1, (calls, total)
    await lim.close()
    # Every admission charged once, nothing held after the lease ended; the day counts them.
    assert await used(redis_client) == admitted(seen)
    assert await day_used(redis_client) == admitted(seen)
    assert await redis_client.exists(keys.hot("shop")) == 0


async def test_hard_stop_is_exact_across_leases(tmp_path: Path, limiters, redis_client):
    """Three instances at a hard stop crossed under load: exactly the quota admitted, the
    last calls decided per request once leases may hold no more."""
    quota = 20_000
    config = write_config(tmp_path, {"shop": env(limits={"calls": quota,
                                                         "qps": 1_000_000})})
    lims = [await limiters(config) for _ in range(3)]
    seen = await drive(lims, "shop", 3.0, per_tick=40)
    assert seen[(Outcome.ADMITTED, True)] > 0, seen  # leases were used
    assert admitted(seen) == quota, seen
    assert seen[(Outcome.QUOTA_EXCEEDED, False)] > 0
    for lim in lims:
        await lim.close()
    assert await used(redis_client) == quota


async def test_qps_share_keeps_the_rate(tmp_path: Path, limiters):
    """Two instances offered far more than the limit: admitted per second within the limit
    plus the local burst, and both get a fair part."""
    limit = 2_000
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10_000_000,
                                                         "qps": limit})})
    lims = [await limiters(config) for _ in range(2)]
    per: list[Counter] = [Counter(), Counter()]
    end = time.monotonic() + 4.0
    start = time.monotonic()
    while time.monotonic() < end:
        for i, lim in enumerate(lims):
            for d in await asyncio.gather(*(lim.decide("shop", "database", 1)
                                            for _ in range(20))):
                if d.admitted:
                    per[i][int(time.monotonic() - start)] += 1
        await asyncio.sleep(0)
    for second in (1, 2, 3):  # (the first second: leases being taken)
        total = per[0][second] + per[1][second]
        assert total <= limit * 1.03, (second, total)
        assert total >= limit * 0.8, (second, total)
    assert min(per[0][3], per[1][3]) > limit * 0.25, per


async def test_killed_instance_leases_are_told_by_its_journal(tmp_path: Path, limiters,
                                                              redis_client, store_url):
    """An instance that stops without ending its leases: the store charges what they held
    when they expire (nothing over-admitted meanwhile), and the journal, read by the next
    instance that starts, gives back what was not used — once."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1_000_000,
                                                         "qps": 1_000_000})})
    journal = tmp_path / "journal"
    dead = await limiters(config)
    dead.open_journal(journal)
    seen = await drive([dead], "shop", 1.0)
    assert seen[(Outcome.ADMITTED, True)] > 0
    # Killed: its leases stay out, its journal on disk (nothing told to the store).
    async def killed(h):  # the process is gone: nothing more reaches the store from it
        return None

    dead.hot._end = killed
    for h in list(dead.hot.envs.values()):
        h.task.cancel()
    await asyncio.sleep(0.05)
    record = await redis_client.hget(keys.hot("shop"), dead.instance)
    assert record is not None
    # The lease expires: what it held is charged, as used.
    await asyncio.sleep(hot_module.LEASE_MS / 1000 + 0.1)
    other = await limiters(config)
    await other.decide("shop", "database", 1)  # reaps it
    charged = await used(redis_client)
    assert charged >= admitted(seen) + 1
    assert await day_used(redis_client) == charged
    # The next start reads the journal: what was not used goes back, exactly once.
    dead._writeback.close()  # (its journal's lock released, as by the kill)
    third = await limiters(config)
    third.open_journal(journal)
    await third.recover_journals(journal)
    assert await used(redis_client) == admitted(seen) + 1
    await third.recover_journals(journal)
    assert await used(redis_client) == admitted(seen) + 1
    assert await day_used(redis_client) == admitted(seen) + 1
    assert not list(journal.glob(f"{dead.instance}*"))


async def test_refunds_of_leased_calls(tmp_path: Path, limiters, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1_000_000,
                                                         "qps": 1_000_000})})
    lim = await limiters(config)
    seen = await drive([lim], "shop", 1.0)
    leased = [h for h in lim.hot.envs.values()]
    assert leased
    lim.refund("shop", "calls", 5, lim.clock.now_ms())
    await lim.close()
    await until(lambda: _equal(redis_client, admitted(seen) - 5))


async def test_a_refund_of_a_call_charged_before_the_lease_is_the_stores(tmp_path: Path,
                                                                          limiters,
                                                                          redis_client):
    """A refund of a call the store charged yesterday, while the environment is leased
    today: it is the store's to give back, and the store's day check keeps yesterday's charge
    (it may be billed) — the lease's count of today's calls is not cut by it."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1_000_000,
                                                         "qps": 1_000_000})})
    lim = await limiters(config)
    seen = await drive([lim], "shop", 1.0)
    assert lim.hot.envs
    lim.refund("shop", "calls", 5, lim.clock.now_ms() - 86_400_000)
    await lim.close()
    assert await used(redis_client) == admitted(seen)


async def _equal(client: aredis.Redis, n: int) -> bool:
    return await used(client) == n


async def lease(lim, op: str, lease_id: int, used: int, want: int = 500,
                inst: str | None = None) -> list:
    """One lease.lua call as hot.py makes it."""
    from quotagate.common.clock import script_arg
    from quotagate.limiter.scripts import LEASE
    return await lim._calls.run(LEASE, "shop", keys.decision_keys("shop"), [
        script_arg(lim.clock.script_time()), inst or lim.instance, op, lease_id, used,
        "1000", want, 500, "enforce", ""])


async def test_a_renewal_counts_its_own_commit_once(tmp_path: Path, limiters, redis_client):
    """A grant used up and renewed: what the renewal commits is not also counted as held (it
    would read as plan used up while half of it is left, and refuse)."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1000, "qps": 1_000_000})})
    lim = await limiters(config)
    first = await lease(lim, "lease", 1, 0, want=500)
    assert (first[0], int(first[3])) == (0, 500)  # hard stop: half of what is free
    again = await lease(lim, "lease", 1, 250, want=500)
    assert again[0] == 0 and not int(again[1]) & 32, again  # not "used up"
    assert int(again[6]) == 750, again  # plan + packs hold 750 for it: 1000 - 250
    assert int(again[3]) == 750  # granted, cumulative: 250 more (half of the 500 free)
    assert await used(redis_client) == 250
    # The hash outlives any lease by far: a live record never goes with its expiry.
    assert await redis_client.pttl(keys.hot("shop")) > 86_400_000
    end = await lease(lim, "end", 1, 300)
    assert end[0] == 8 and await used(redis_client) == 300
    assert await redis_client.exists(keys.hot("shop")) == 0


async def test_a_new_lease_of_an_instance_keeps_the_old_ones_count(tmp_path: Path, limiters,
                                                                   redis_client):
    """An instance leases again before the end of its last lease reached the store: the old
    lease is kept as a note (what it held charged), and its end, when it comes, gives back
    what it did not use — its admissions counted, nothing lost."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1000, "qps": 1_000_000})})
    lim = await limiters(config)
    assert (await lease(lim, "lease", 1, 0))[0] == 0          # holds 500
    assert (await lease(lim, "lease", 2, 0))[0] == 0          # the old one: charged whole
    assert await used(redis_client) == 500
    assert (await lease(lim, "end", 1, 100))[0] == 8          # it used 100: 400 back
    assert await used(redis_client) == 100
    assert (await lease(lim, "end", 2, 10))[0] == 8
    assert await used(redis_client) == 110


async def test_a_late_renewal_of_a_reaped_lease_holds_what_it_did_not_use(tmp_path: Path,
                                                                         limiters,
                                                                         redis_client):
    """A renewal that reaches the store after its lease ended (a slow store, a stalled
    loop), once another decision reaped it: what it did not use is held for it again, not
    given to others — the instance may still admit it until its own lease ends."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1000, "qps": 1_000_000})})
    lim = await limiters(config)
    assert int((await lease(lim, "lease", 1, 0))[3]) == 500
    await asyncio.sleep(0.6)  # past the lease's end (500 ms)
    other = await limiters(config)
    await other.decide("shop", "database", 1)  # reaps it: 500 charged as used
    assert await used(redis_client) == 501
    again = await lease(lim, "lease", 1, 40)  # it had used 40
    assert again[0] == 0
    assert await used(redis_client) == 41  # 460 back from the usage, held for it again
    await lease(lim, "end", 1, 500)  # it went on to use all it held
    assert await used(redis_client) == 501


async def test_a_needed_meter_used_up_is_refused_under_a_lease(tmp_path: Path, limiters):
    """Hard stop on a meter a route needs (outbound bytes, quota 0): while the environment is
    leased, every request needing it is still refused — by the store until a lease has been
    asked about the meter, in memory after — and none admitted."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10_000_000, "qps": 1_000_000,
                                                         "outbound_gb": 0})})
    lim = await limiters(config)
    await drive([lim], "shop", 1.0)  # leased, on requests needing nothing
    assert lim.hot.envs
    seen: Counter = Counter()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        for d in await asyncio.gather(*(lim.decide("shop", "function", 1, needs="outbound_bytes")
                                        for _ in range(50))):
            seen[(d.outcome, d.meter, bool(d.flags & Flag.LEASED))] += 1
        await asyncio.sleep(0)
    assert not any(o is Outcome.ADMITTED for o, _, _ in seen), seen
    assert seen[(Outcome.QUOTA_EXCEEDED, "outbound_bytes", True)] > 0, seen


async def _payg_calls(client: aredis.Redis) -> int:
    day = day_number(dt.date(2026, 11, 26))
    return int(await client.hget(keys.payg("shop"), f"{day}:calls") or 0)


@pytest.mark.parametrize("how", ["ingested", "written back"])
async def test_usage_charged_beside_a_lease_takes_none_of_what_it_holds(
        tmp_path: Path, limiters, redis_client, how):
    """Overage on, a lease holding 500 of the plan's 1,000 calls: 600 calls charged beside it
    (an ingested usage record through settle.lua; a fail-open write-back through decide.lua)
    take the 500 it leaves and 100 of pay-as-you-go. When the lease tells it used all it held,
    the plan reads exactly its quota and the 100 are billed — not 1,100 of plan and 0 billed
    (the settle took the lease's calls, and the lease then charged them again)."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 1000, "qps": 1_000_000},
                                                 overage=True)})
    lim = await limiters(config)
    first = await lease(lim, "lease", 1, 0, want=500)
    assert (first[0], int(first[3])) == (0, 500), first
    at_ms = lim.clock.now_ms()
    if how == "ingested":
        assert await lim.ingest("shop", "rec-1", "calls", 600, at_ms) == 0
    else:
        assert await lim.write_back("shop", "database", 600, at_ms, "wb-1")
    assert await used(redis_client) == 500
    assert await _payg_calls(redis_client) == 100
    assert (await lease(lim, "end", 1, 500))[0] == 8
    assert await used(redis_client) == 1000
    assert await _payg_calls(redis_client) == 100


async def test_a_lease_ended_after_its_environment_left_the_file_still_counts(
        tmp_path: Path, limiters, redis_client):
    """The environment is taken out of the file while leased (its snapshot deleted, its usage
    kept for the bills): the lease's end still charges what it admitted — 100 from the plan it
    reserved, 200 beyond as pay-as-you-go (overage on) — and gives the rest back. Before, the
    end was answered "unknown" and the 300 calls were never counted."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 100, "qps": 1_000_000},
                                                 overage=True)})
    lim = await limiters(config)
    first = await lease(lim, "lease", 1, 0, want=500)
    assert (first[0], int(first[3])) == (0, 500), first
    await redis_client.delete(keys.entitlements("shop"))  # as a reload does for a removed one
    end = await lease(lim, "end", 1, 300)
    assert end[0] == 4, end
    assert await used(redis_client) == 100
    assert await _payg_calls(redis_client) == 200
    assert await redis_client.exists(keys.hot("shop")) == 0
    # Told again (a retry, the journal): nothing more.
    await lease(lim, "end", 1, 300)
    assert (await used(redis_client), await _payg_calls(redis_client)) == (100, 200)


async def test_the_first_lease_asks_for_the_rate_seen_before_it(tmp_path: Path, limiters,
                                                               redis_client):
    """An environment found hot asks in its first lease for the rate this instance saw of it
    (x 1.25 headroom), not for a fixed multiple of ``hot_rate``: a fixed one squeezed the
    others' shares when it was too much and starved a very hot one when it was too little."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10_000_000,
                                                         "qps": 1_000_000})})
    lim = await limiters(config)
    lim.hot.rate = 10  # gateway.hot_rate: 10 requests/s (asked for before: 2 x 10 x 1.25)
    asked: list[float] = []
    lease = lim.hot._lease

    async def recorded(h, want_qps: float) -> bool:  # what each lease call asks for
        asked.append(want_qps)
        return await lease(h, want_qps)

    lim.hot._lease = recorded
    for _ in range(3):  # 400 requests in each of three periods: far above 10/s
        for _ in range(400):
            lim.hot.note("shop")
        await asyncio.sleep(hot_module.PERIOD_S)

    async def leased() -> bool:
        return await redis_client.hget(keys.hot("shop"), lim.instance) is not None

    await until(leased)
    # 400 in a period of 0.1 s is 4,000/s; a machine stalled 2 s in it still saw 200/s.
    assert asked[0] >= 200 * hot_module.HEADROOM, asked
