"""Listing environments at scale through ``quotagate serve`` (issue 24, item 5): a few thousand
environments, file- and API-owned interleaved by id, paged through the admin API and the CLI —
every one once, in id order; a cursor that stays right while environments come and go; each
filter exactly its set; every bad parameter a 400 naming it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aredis
import yaml

from quotagate.control.envs import API_ENV_INDEX
from quotagate.limiter import keys
from tests.deployed import TOKEN, Deployed, days, serve, shipped_config, start_upstream, today
from tests.helpers import assert_problem

pytestmark = pytest.mark.deployed

N_FILE = 1500
N_API = 1500
PLANS = ("free", "personal", "standard")
#: For the API-owned: released ones would be removed by the scheduler (file-owned stay).
STATES = ("active", "isolated", "not-started", "released-pending")


def definition(i: int, state: str) -> dict[str, Any]:
    """The ``i``-th environment, in ``state`` today, on a plan, with or without a gateway
    version, expiring on one of many days."""
    if state == "active":
        anchor, expires = days(-3), days(20 + i % 200)
    elif state == "isolated":
        anchor, expires = days(-60), days(-1 - i % 10)
    elif state == "not-started":
        anchor, expires = days(3 + i % 5), days(370 + i % 50)
    else:
        anchor, expires = days(-120), days(-16 - i % 30)
    env: dict[str, Any] = {"plan": PLANS[i % 3], "anchor": anchor, "expires": expires,
                           "overage": i % 7 == 0}
    if i % 5 < 2:
        env["gateway"] = {"version": ("basic", "test")[i % 5], "purchased": days(-10),
                          "months": 12}
    return env


def state_of(env: dict[str, Any]) -> str:
    """Worked out here from the dates, not by the code under test."""
    now = today()
    expires, anchor = dt.date.fromisoformat(env["expires"]), dt.date.fromisoformat(env["anchor"])
    if now >= expires + dt.timedelta(days=15):
        return "released-pending"
    if now >= expires:
        return "isolated"
    return "not-started" if now < anchor else "active"


class Listing:
    """The served gateway, a client of its store, and what it holds: id -> (owner, env)."""

    def __init__(self, deployed: Deployed, store: aredis.Redis,
                 expected: dict[str, tuple[str, dict[str, Any]]], files: dict[str, Any]):
        self.d = deployed
        self.store = store
        self.expected = expected
        self.files = files
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.d.admin}/admin/v1{path}"

    async def page(self, **query: Any) -> dict[str, Any]:
        async with self.session.get(self.url("/envs?" + urllib.parse.urlencode(query))) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def pages(self, **query: Any) -> list[list[dict[str, Any]]]:
        """Every page in turn, following next_cursor."""
        out = []
        while True:
            data = await self.page(**query)
            assert set(data) == {"environments", "next_cursor"}, data.keys()
            out.append(data["environments"])
            if data["next_cursor"] is None:
                return out
            query["cursor"] = data["next_cursor"]

    async def put(self, env_id: str, env: dict[str, Any]) -> None:
        async with self.session.put(self.url(f"/envs/{env_id}"), json=env) as r:
            assert r.status == 200, await r.text()

    async def release(self, env_id: str) -> None:
        """What the scheduler's release does to an API-owned record (the admin API has no
        delete): the record goes, and the id leaves the set."""
        async with self.store.pipeline(transaction=False) as pipe:
            pipe.delete(keys.definition(env_id), keys.entitlements(env_id))
            pipe.srem(keys.API_OWNED_ENVS, env_id)
            await pipe.execute()


def fresh_ids(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        e = f"e{rng.randrange(16 ** 8):08x}"
        if e not in taken:
            taken.add(e)
            out.append(e)
    return out


@pytest.fixture(scope="module")
async def listing(tmp_path_factory: pytest.TempPathFactory, servers: dict[str, object]
                  ) -> AsyncIterator[Listing]:
    url = servers["valkey"].url  # type: ignore[attr-defined]
    store = aredis.Redis.from_url(url)
    await store.flushall()
    rng = random.Random(24)
    taken: set[str] = set()
    ids = fresh_ids(rng, N_FILE + N_API, taken)  # random: file and API ids interleave
    file_ids, api_ids = ids[:N_FILE], ids[N_FILE:]
    expected: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, e in enumerate(file_ids):
        expected[e] = ("file", definition(i, STATES[i % 4]))
    for i, e in enumerate(api_ids):
        expected[e] = ("api", definition(i, STATES[i % 3]))
    files = {e: expected[e][1] for e in file_ids}

    upstream, origin = start_upstream()
    directory = tmp_path_factory.mktemp("listing")
    # The scheduler would release nothing here (no API-owned environment is due), but a
    # round over thousands of them every minute is only load: once an hour.
    gateway = shipped_config(directory, origin, store={"url": url},
                             lifecycle_interval_ms=3_600_000, reload_poll_ms=200)
    (directory / "environments.yaml").write_text(yaml.safe_dump({"environments": files}))
    deployed = await serve(directory, gateway)
    state = Listing(deployed, store, expected, files)
    try:
        gate = asyncio.Semaphore(16)  # PUT concurrently, as a provisioning system would

        async def put(e: str) -> None:
            async with gate:
                await state.put(e, expected[e][1])

        await asyncio.gather(*(put(e) for e in api_ids))
        yield state
    finally:
        await state.session.close()
        log = deployed.stop()
        upstream.kill()
        upstream.wait()
        await store.aclose()
        assert "Traceback" not in log, log[-4000:]


def row(env_id: str, owner: str, env: dict[str, Any]) -> dict[str, Any]:
    return {"env": env_id, "owner": owner, "plan": env["plan"], "expires": env["expires"],
            "overage": env["overage"]}


async def test_pages_of_37_hold_every_environment_once_in_id_order(listing: Listing) -> None:
    everything = sorted(listing.expected)
    pages = await listing.pages(limit=37)
    assert all(len(p) == 37 for p in pages[:-1]) and len(pages[-1]) <= 37
    assert len(pages) in (len(everything) // 37 + 1, len(everything) // 37 + 2)
    rows = [r for p in pages for r in p]
    assert [r["env"] for r in rows] == everything  # once each, in id order
    assert rows == [row(e, *listing.expected[e]) for e in everything]
    owners = [r["owner"] for r in rows[:200]]
    assert "file" in owners and "api" in owners  # the two sources merged, not one after another
    first = await listing.page()
    assert len(first["environments"]) == 100 and first["next_cursor"]  # the default limit
    assert len((await listing.page(limit=1000))["environments"]) == 1000


@pytest.mark.parametrize("query", [
    *({"state": s} for s in STATES),
    *({"plan": p} for p in PLANS),
    {"owner": "file"}, {"owner": "api"},
    {"gateway": "basic"}, {"gateway": "test"}, {"gateway": "none"}, {"gateway": "pro"},
    {"expiring_before": "TODAY+100"},
    {"state": "active", "plan": "free", "owner": "api", "expiring_before": "TODAY+120"},
    {"state": "isolated", "gateway": "none", "owner": "file"},
    {"prefix": "e"}, {"prefix": "e0"}, {"prefix": "eab"}, {"prefix": "ef"}, {"prefix": "x"},
    {"prefix": "e7", "owner": "api", "state": "active"},
])
async def test_each_filter_returns_exactly_its_set(listing: Listing, query: dict[str, str]
                                                   ) -> None:
    query = {k: days(int(v[6:])) if v.startswith("TODAY+") else v for k, v in query.items()}

    def keep(owner: str, env: dict[str, Any]) -> bool:
        grant = env.get("gateway")
        return all([
            query.get("state") in (None, state_of(env)),
            query.get("plan") in (None, env["plan"]),
            query.get("owner") in (None, owner),
            query.get("gateway") in (None, grant["version"] if grant else "none"),
            "expiring_before" not in query or env["expires"] < query["expiring_before"]])

    wanted = sorted(e for e, (owner, env) in listing.expected.items()
                    if keep(owner, env) and e.startswith(query.get("prefix", "")))
    assert wanted or query in ({"gateway": "pro"}, {"prefix": "x"})
    pages = await listing.pages(limit=37, **query)
    assert all(len(p) <= 37 for p in pages)
    assert [r["env"] for p in pages for r in p] == wanted


async def test_the_cli_pages_through_everything(listing: Listing) -> None:
    everything = sorted(listing.expected)
    lines = listing.d.ok("env", "list", "--limit", "50", "--json").splitlines()
    rows = [json.loads(line) for line in lines]  # NDJSON: one object a line
    assert [r["env"] for r in rows] == everything
    assert rows == [row(e, *listing.expected[e]) for e in everything]

    table = listing.d.ok("env", "list", "--limit", "50").splitlines()
    assert table[0].split() == ["env", "owner", "plan", "expires", "overage"]
    assert set(table[1]) == {"-", " "}
    assert [line.split()[0] for line in table[2:]] == everything  # one header, every row

    isolated = [json.loads(line) for line in listing.d.ok(
        "env", "list", "--limit", "50", "--state", "isolated", "--owner", "file",
        "--expiring-before", days(-3), "--json").splitlines()]
    assert [r["env"] for r in isolated] == sorted(
        e for e, (owner, env) in listing.expected.items()
        if owner == "file" and state_of(env) == "isolated" and env["expires"] < days(-3))
    refused = listing.d.cli("env", "list", "--limit", "0")
    assert refused.returncode == 1 and "limit" in refused.stderr, refused.stderr
    refused = listing.d.cli("env", "list", "--plan", "gold")
    assert refused.returncode == 1 and "gold" in refused.stderr, refused.stderr


@pytest.mark.parametrize(("query", "parameter"), [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"), ("limit=", "limit"),
    ("limit=-5", "limit"), ("limit=1&limit=2", "limit"),
    ("cursor=not-a-cursor!", "cursor"), ("cursor=", "cursor"),
    ("cursor=MjplMDAwMDAwMA", "cursor"),  # "2:e0000000": another version
    ("cursor=MTpCYWRfSWQ", "cursor"),  # "1:Bad_Id": not an environment id
    ("state=expired", "state"), ("plan=gold", "plan"), ("owner=both", "owner"),
    ("gateway=ultra", "gateway"), ("expiring_before=2027-13-01", "expiring_before"),
    ("expiring_before=20270101", "expiring_before"), ("expiring_before=", "expiring_before"),
    ("plans=standard", "plans"), ("offset=100", "offset"),
    ("prefix=", "prefix"), ("prefix=Shop", "prefix"), ("prefix=-a", "prefix"),
])
async def test_bad_parameters_are_400_naming_them(listing: Listing, query: str,
                                                  parameter: str) -> None:
    async def listed() -> tuple[Any, ...]:
        return (sorted(await listing.store.smembers(keys.API_OWNED_ENVS)),
                await listing.store.zrange(API_ENV_INDEX, 0, -1))

    before = await listed()
    async with listing.session.get(listing.url(f"/envs?{query}")) as resp:
        body = await assert_problem(resp, 400)
    assert body["parameter"] == parameter, body
    assert parameter in body["detail"], body
    assert await listed() == before


async def test_the_cursor_holds_while_environments_come_and_go(listing: Listing) -> None:
    """Last: it changes what the gateway holds. Between pages, API-owned environments are
    created and released, and the file gains and loses some (reloaded), on both sides of the
    cursor: every environment there all along is listed once, in order; those that came
    ahead of the cursor are listed, those gone ahead are not."""
    rng = random.Random(5)
    taken = set(listing.expected)
    start = sorted(listing.expected)
    pages: list[list[dict[str, Any]]] = []
    query: dict[str, Any] = {"limit": 37}
    added: set[str] = set()
    gone: set[str] = set()
    ahead_added: set[str] = set()
    ahead_gone: set[str] = set()
    step = 0
    while True:
        data = await listing.page(**query)
        pages.append(data["environments"])
        if data["next_cursor"] is None:
            break
        query["cursor"] = data["next_cursor"]
        step += 1
        if step % 5:
            continue
        position = data["environments"][-1]["env"] if data["environments"] else ""
        # API-owned: a few new ones (either side), a few present ones released (either side).
        for e in fresh_ids(rng, 4, taken):
            await listing.put(e, definition(step, "active"))
            added.add(e)
            if e > position:
                ahead_added.add(e)
        present = sorted(e for e, (owner, _) in listing.expected.items()
                         if owner == "api" and e not in gone)
        for e in rng.sample(present, 3):
            await listing.release(e)
            gone.add(e)
            if e > position:
                ahead_gone.add(e)
        if step == 10:  # once: the file loses two ahead and one behind, gains two (reloaded)
            files = dict(listing.files)
            file_ahead = [e for e in sorted(files) if e > position]
            file_behind = [e for e in sorted(files) if e < position]
            dropped = [*rng.sample(file_ahead, 2), rng.choice(file_behind)]
            for e in dropped:
                del files[e]
                gone.add(e)
                if e > position:
                    ahead_gone.add(e)
            new = fresh_ids(rng, 2, taken)
            for e in new:
                files[e] = definition(1, "active")
                added.add(e)
                if e > position:
                    ahead_added.add(e)
            (listing.d.directory / "environments.yaml").write_text(
                yaml.safe_dump({"environments": files}))
            for _ in range(300):  # until reloaded
                async with listing.session.get(listing.url(f"/envs/{new[0]}")) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("environments.yaml was not reloaded")
    listed = [r["env"] for p in pages for r in p]
    assert listed == sorted(set(listed)), "ids out of order or twice"
    assert all(len(p) <= 37 for p in pages)
    throughout = [e for e in start if e not in gone]
    assert sorted(set(listed) & set(throughout)) == throughout  # each once (no duplicates)
    assert ahead_added <= set(listed), ahead_added - set(listed)
    assert not ahead_gone & set(listed), ahead_gone & set(listed)
    assert set(listed) <= set(start) | added
    assert step >= 10 and ahead_gone and ahead_added and gone - ahead_gone
    # The released ones' entries are gone from the index too, once the listing passed them.
    released_api = [e for e in gone if listing.expected.get(e, ("file",))[0] == "api"]
    assert [await listing.store.zscore(API_ENV_INDEX, e) for e in released_api
            if e in ahead_gone] == [None] * len(ahead_gone & set(released_api))
