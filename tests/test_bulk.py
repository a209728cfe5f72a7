"""Bulk import and export of environments (issue 24, item 1): NDJSON through the admin API on a
real listener and a real Valkey. An import writes what ``PUT /envs/{env}`` writes, checks every
line first (one bad line: nothing written), and is idempotent; the export streams every
environment in id order, and what it writes imports back unchanged. On a cluster, each record
and its snapshot go to their environment's slot."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from redis.asyncio.cluster import RedisCluster

from quotagate.control.envs import API_ENV_INDEX, Environments
from quotagate.limiter import due, keys
from quotagate.limiter.entitlements import build_snapshot, encode
from quotagate.limiter.sync import sync_environments
from quotagate.settings.schema import Environment
from tests.helpers import ADMIN_TOKEN, assert_problem, at, env, write_config
from tests.test_cluster import cluster  # noqa: F401  (the module's cluster fixture)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NDJSON = {**AUTH, "Content-Type": "application/x-ndjson"}


async def stored_keys(store) -> set[bytes]:
    """Every key but the audit trail's (a refused import is recorded there, as refused)."""
    return {k for k in await store.keys("*") if not k.startswith(b"qg:{audit}:")}


def line(env_id: str, **extra: object) -> bytes:
    definition = {"plan": "personal", "anchor": "2026-11-01", "expires": "2027-11-01", **extra}
    return json.dumps({"id": env_id, "environment": definition}).encode() + b"\n"


async def stored(store, env_id: str) -> tuple[bytes | None, bytes | None]:
    return (await store.get(keys.definition(env_id)), await store.get(keys.entitlements(env_id)))


async def test_import_writes_what_put_writes_and_again_changes_nothing(
        make_gateway, admin_for, store):
    gw = await make_gateway({"filed": env()})
    admin = await admin_for(gw)
    body = b"".join(line(f"bulk-{i:04d}", limits={"calls": 1000 + i}) for i in range(1200))
    resp = await admin.post("/admin/v1/envs:import", data=body, headers=NDJSON)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"received": 1200, "created": 1200, "updated": 0,
                                 "unchanged": 0}
    # The same environment through PUT: byte for byte what the import stored.
    put = await admin.put("/admin/v1/envs/by-put", headers=AUTH, json=json.loads(
        line("by-put", limits={"calls": 1000 + 7}))["environment"])
    assert put.status == 200
    record, snapshot = await stored(store, "bulk-0007")
    assert (record, snapshot) == await stored(store, "by-put")
    _, snapshot = await stored(store, "bulk-0003")
    assert await store.scard(keys.API_OWNED_ENVS) == 1201
    assert await store.zscore(API_ENV_INDEX, "bulk-1199") == 0
    due_shard = keys.due(due.shard_of("bulk-0500"))
    assert await store.zscore(due_shard, "bulk-0500") is not None  # due: looked at next round
    # Decided at once, on the public port.
    ok = await gw.get("/functions/hello", headers={"X-CloudBase-Env": "bulk-0042"})
    assert ok.status == 200

    # Again: nothing written, nothing made due again.
    await store.zrem(due_shard, "bulk-0500")
    again = await admin.post("/admin/v1/envs:import", data=body, headers=NDJSON)
    assert await again.json() == {"received": 1200, "created": 0, "updated": 0,
                                  "unchanged": 1200}
    assert await store.zscore(due_shard, "bulk-0500") is None
    # One line changed: only it is written.
    changed = body.replace(b'"calls": 1500', b'"calls": 9')
    assert changed != body
    resp = await admin.post("/admin/v1/envs:import", data=changed, headers=NDJSON)
    assert await resp.json() == {"received": 1200, "created": 0, "updated": 1,
                                 "unchanged": 1199}
    record, _ = await stored(store, "bulk-0500")
    assert msgspec.json.decode(record)["limits"]["calls"] == 9
    assert await store.zscore(due_shard, "bulk-0500") is not None
    # A snapshot the store lost is written again, though the record is as it was.
    await store.delete(keys.entitlements("bulk-0003"))
    resp = await admin.post("/admin/v1/envs:import", data=changed, headers=NDJSON)
    assert await resp.json() == {"received": 1200, "created": 0, "updated": 1,
                                 "unchanged": 1199}
    assert await store.get(keys.entitlements("bulk-0003")) == snapshot


async def test_one_bad_line_and_nothing_is_written(make_gateway, admin_for, store):
    gw = await make_gateway({"filed": env()})
    admin = await admin_for(gw)
    good = [line(f"ok-{i}") for i in range(5)]
    bad = {
        2: b"{not json\n",
        3: line("Bad_Id"),
        4: line("gold-plan", plan="gold"),
        5: line("ok-0"),  # twice
        6: line("filed"),  # the file's
        7: b'{"id": "x-extra", "environment": {}, "colour": "red"}\n',
        9: b"[1, 2]\n",
    }
    lines = [good[0], *(bad[n] for n in range(2, 8)), b"\n", bad[9], *good[1:]]
    before = await stored_keys(store)
    resp = await admin.post("/admin/v1/envs:import", data=b"".join(lines), headers=NDJSON)
    problem = await assert_problem(resp, 422)
    assert problem["refused"] == 7
    assert problem["detail"] == "7 of 12 lines refused; nothing was written"
    assert [i["line"] for i in problem["issues"]] == [2, 3, 4, 5, 6, 7, 9]
    reasons = {i["line"]: i["reason"] for i in problem["issues"]}
    assert "given already on line 1" in reasons[5]
    assert "environments.yaml" in reasons[6]
    assert "gold" in reasons[4]
    assert await stored_keys(store) == before
    assert not await store.exists(keys.definition("ok-0"))

    # Not NDJSON, too many lines, parameters: refused before anything is read.
    assert (await admin.post("/admin/v1/envs:import", data=good[0],
                             headers={**AUTH, "Content-Type": "application/json"})).status == 415
    too_many = b"".join(line(f"m-{i}") for i in range(10_001))
    await assert_problem(await admin.post("/admin/v1/envs:import", data=too_many,
                                          headers=NDJSON), 413)
    await assert_problem(await admin.post("/admin/v1/envs:import?dry=1", data=good[0],
                                          headers=NDJSON), 400)
    assert (await admin.post("/admin/v1/envs:import", data=good[0])).status == 401
    assert await stored_keys(store) == before


async def test_export_streams_every_environment_and_imports_back(make_gateway, admin_for,
                                                                 store):
    gw = await make_gateway({"filed": env(), "zz-filed": env(plan="personal")})
    admin = await admin_for(gw)
    body = b"".join(line(f"exp-{i:04d}", limits={"calls": i + 1}) for i in range(2500))
    assert (await admin.post("/admin/v1/envs:import", data=body, headers=NDJSON)).status == 200
    resp = await admin.get("/admin/v1/envs:export", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    rows = [json.loads(raw) for raw in (await resp.read()).splitlines()]
    assert [r["id"] for r in rows] == sorted(
        [f"exp-{i:04d}" for i in range(2500)] + ["filed", "zz-filed"])
    assert {r["id"]: r["owner"] for r in rows}["filed"] == "file"
    assert rows[3]["environment"]["limits"]["calls"] == 4

    api_only = await (await admin.get("/admin/v1/envs:export?owner=api&after=exp-2497",
                                      headers=AUTH)).read()
    assert [json.loads(r)["id"] for r in api_only.splitlines()] == ["exp-2498", "exp-2499"]
    # What the export wrote (the API's lines) imports back, changing nothing.
    back = b"".join(json.dumps(r).encode() + b"\n" for r in rows if r["owner"] == "api")
    again = await admin.post("/admin/v1/envs:import", data=back, headers=NDJSON)
    assert await again.json() == {"received": 2500, "created": 0, "updated": 0,
                                  "unchanged": 2500}
    for query in ("owner=mine", "after=Not_An_Id", "cursor=x"):
        await assert_problem(await admin.get(f"/admin/v1/envs:export?{query}", headers=AUTH),
                             400)


async def test_import_on_a_cluster(cluster: list[int], tmp_path: Path) -> None:  # noqa: F811
    config = write_config(tmp_path, {"filed": env()})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    try:
        await rc.initialize()
        await rc.delete(keys.API_OWNED_ENVS, API_ENV_INDEX)
        await sync_environments(rc, config)
        envs = Environments(rc, lambda: config, at("2026-11-26T12:00:00"))  # type: ignore[arg-type]
        definition = msgspec.convert(env(plan="personal"), Environment)
        items = [(f"k{i:03d}", definition) for i in range(40)]  # every node
        assert await envs.put_many(items) == {"created": 40, "updated": 0, "unchanged": 0}
        snapshot = encode(build_snapshot(definition, config.plans, config.gateway.timezone))
        for env_id, _ in items:
            assert (await rc.get(keys.entitlements(env_id))).decode() == snapshot
        assert await rc.scard(keys.API_OWNED_ENVS) == 40
        assert await envs.put_many(items) == {"created": 0, "updated": 0, "unchanged": 40}
    finally:
        await rc.aclose()


async def test_an_export_cut_short_ends_without_its_last_chunk(make_gateway, admin_for,
                                                               monkeypatch):
    """The store lost after the first page: the status is sent already, so the stream is cut
    (no final chunk) and the client sees an error, never a complete-looking short export."""
    import aiohttp
    from redis.exceptions import ConnectionError as StoreGone

    gw = await make_gateway({})
    admin = await admin_for(gw)
    body = b"".join(line(f"cut-{i:04d}") for i in range(1500))
    assert (await admin.post("/admin/v1/envs:import", data=body, headers=NDJSON)).status == 200
    calls = 0
    page = Environments.page

    async def failing(self, *args, **kw):
        nonlocal calls
        calls += 1
        if calls > 1:
            raise StoreGone("the store went away")
        return await page(self, *args, **kw)

    monkeypatch.setattr(Environments, "page", failing)
    resp = await admin.get("/admin/v1/envs:export", headers=AUTH)
    assert resp.status == 200
    try:
        await resp.read()
    except aiohttp.ClientPayloadError:
        pass
    else:
        raise AssertionError("a cut export read as complete")
    assert calls == 2


async def test_an_import_is_built_from_the_plans_in_force(tmp_path: Path, store) -> None:
    """plans.yaml reloaded between the check of the lines and their write: each batch is built
    from the plans in force when it is written, checked against them again (a plan gone is
    refused, nothing of that batch written)."""
    import shutil

    import yaml

    from quotagate.control.envs import Invalid
    from quotagate.settings import load_config
    from tests.helpers import PLANS

    shutil.copy(PLANS, tmp_path / "plans.yaml")
    before = write_config(tmp_path, {}, plans_file="plans.yaml")
    plans = yaml.safe_load(PLANS.read_text())
    plans["plans"]["personal"]["calls"] = 777
    (tmp_path / "plans.yaml").write_text(yaml.safe_dump(plans))
    after = load_config(tmp_path / "gateway.yaml")
    held = [after]
    envs = Environments(store, lambda: held[0], at("2026-11-26T12:00:00"))
    definition = msgspec.convert(env(plan="personal"), Environment)
    assert await envs.put_many([("late-1", definition)], checked_with=before.plans) == {
        "created": 1, "updated": 0, "unchanged": 0}
    snapshot = json.loads(await store.get(keys.entitlements("late-1")))
    assert snapshot["quota"]["calls"] == 777  # the plans in force, not those checked

    del plans["plans"]["personal"]
    (tmp_path / "plans.yaml").write_text(yaml.safe_dump(plans))
    held[0] = load_config(tmp_path / "gateway.yaml")
    try:
        await envs.put_many([("late-2", definition)], checked_with=before.plans)
    except Invalid as exc:
        assert "unknown plan 'personal'" in str(exc)
    else:
        raise AssertionError("a plan gone was not refused")
    assert not await store.exists(keys.definition("late-2"))
