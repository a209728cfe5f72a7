"""The audit trail (control/audit.py) over a real admin listener and a real Valkey: every change
recorded once with who, what, the result and the request id, refused ones too; reads and
quotes never; filters and pages; retention; a config reload recorded once however many
instances apply it."""

from __future__ import annotations

import yaml

from quotagate.control import audit
from quotagate.gateway.app import STATE
from tests.helpers import ADMIN_TOKEN, assert_problem, env

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def api_env() -> dict:
    return {"plan": "personal", "anchor": "2026-11-01", "expires": "2027-11-01"}


async def entries(admin, query: str = "") -> list[dict]:
    resp = await admin.get(f"/admin/v1/audit{query}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["entries"]


async def test_every_change_is_recorded_once_with_who_and_the_result(
        make_gateway, admin_for, store):
    admin = await admin_for(await make_gateway({}))
    made = await admin.post("/admin/v1/tokens", json={"name": "billing desk", "role": "billing"},
                            headers={**AUTH, "X-Request-Id": "req-1"})
    billing = await made.json()
    viewer = await (await admin.post("/admin/v1/tokens", json={"name": "auditor",
                                                                "role": "viewer"},
                                      headers=AUTH)).json()
    put = await admin.put("/admin/v1/envs/shop", json=api_env(), headers=AUTH)
    assert put.status == 200
    bought = await admin.post("/admin/v1/envs/shop/packs", json={"pack": "calls-10m"},
                              headers={"Authorization": f"Bearer {billing['token']}"})
    assert bought.status == 201, await bought.text()
    refused = await admin.post("/admin/v1/envs/shop/packs", json={"pack": "calls-10m"},
                               headers={"Authorization": f"Bearer {viewer['token']}"})
    await assert_problem(refused, 403)
    invalid = await admin.put("/admin/v1/envs/shop/overage", json={"overage": "yes"},
                              headers=AUTH)
    assert invalid.status == 422
    # Reads and quotes change nothing: not recorded.
    for url in ("/admin/v1/envs", "/admin/v1/envs/shop/usage", "/admin/v1/audit"):
        assert (await admin.get(url, headers=AUTH)).status == 200
    assert (await admin.post("/admin/v1/envs/shop/plan/quote", json={"plan": "standard"},
                             headers=AUTH)).status == 200

    got = await entries(admin)
    assert [(e["action"], e["actor"], e["status"]) for e in got] == [
        ("put_overage", "admin-token", 422),
        ("buy_pack", viewer["id"], 403),
        ("buy_pack", billing["id"], 201),
        ("put_env", "admin-token", 200),
        ("create_token", "admin-token", 201),
        ("create_token", "admin-token", 201)]
    first = got[-1]
    assert first["request_id"] == "req-1" and made.headers["X-Request-Id"] == "req-1"
    buy = got[2]
    assert buy["request_id"] == bought.headers["X-Request-Id"] and len(buy["request_id"]) == 32
    assert buy["actor_name"] == "billing desk" and buy["role"] == "billing"
    assert buy["env"] == "shop" and buy["path"] == "/admin/v1/envs/shop/packs"
    assert '"calls-10m"' in buy["body"] and buy["method"] == "POST"
    store_ms = int((await store.time())[0]) * 1000
    assert abs(buy["at_ms"] - store_ms) < 60_000  # the store's clock
    assert buy["at"].endswith("Z") and buy["id"].startswith(str(buy["at_ms"]))
    # Never a secret: not in any entry, nor anywhere in the stream.
    raw = str(await store.xrange(audit.STREAM))
    assert billing["token"] not in raw and viewer["token"] not in raw


async def test_filters_and_pages(make_gateway, admin_for):
    admin = await admin_for(await make_gateway({}))
    for name in ("shop", "mall"):
        assert (await admin.put(f"/admin/v1/envs/{name}", json=api_env(),
                                headers=AUTH)).status == 200
    for i in range(12):
        name = "shop" if i % 3 else "mall"
        resp = await admin.put(f"/admin/v1/envs/{name}/overage",
                               json={"overage": bool(i % 2)}, headers=AUTH)
        assert resp.status == 200
    everything = await entries(admin, "?limit=1000")
    assert len(everything) == 14
    shop = [e for e in everything if e["env"] == "shop"]
    paged, cursor = [], None
    while True:
        query = "?env=shop&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = await (await admin.get(f"/admin/v1/audit{query}", headers=AUTH)).json()
        assert len(page["entries"]) <= 3
        paged += page["entries"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [e["id"] for e in paged] == [e["id"] for e in shop] and len(shop) == 9
    assert [e["id"] for e in paged] == sorted((e["id"] for e in paged),
                                              key=lambda i: tuple(map(int, i.split("-"))),
                                              reverse=True)
    assert {e["action"] for e in await entries(admin, "?action=put_env")} == {"put_env"}
    assert len(await entries(admin, "?action=put_env")) == 2
    assert await entries(admin, "?token=nobody") == []
    middle = everything[7]["at_ms"]
    since = await entries(admin, f"?since={middle}&limit=1000")
    until = await entries(admin, f"?until={middle}&limit=1000")
    assert len(since) + len(until) == 14 and all(e["at_ms"] >= middle for e in since)
    assert await entries(admin, "?since=2000-01-01&until=2000-01-02") == []
    for query, name in [("?limit=0", "limit"), ("?cursor=abc", "cursor"), ("?env=Bad_Id", "env"),
                        ("?since=yesterday", "since"), ("?colour=red", "colour"),
                        ("?until=2026-12-07T10:00:00", "until")]:
        resp = await admin.get(f"/admin/v1/audit{query}", headers=AUTH)
        problem = await assert_problem(resp, 400)
        assert problem["parameter"] == name, query


async def test_entries_older_than_the_retention_are_trimmed(make_gateway, admin_for, store):
    admin = await admin_for(await make_gateway({}, audit_retention_days=1))
    for i in range(300):  # three days ago (the store's stream nodes hold 100 entries)
        await store.xadd(audit.STREAM, {"actor": "old", "action": "x"},
                         id=f"{1_700_000_000_000 + i}-0")
    assert (await admin.put("/admin/v1/envs/shop", json=api_env(), headers=AUTH)).status == 200
    assert await store.xlen(audit.STREAM) < 150  # whole nodes of old entries trimmed
    assert next(e["action"] for e in await entries(admin)) == "put_env"


async def test_a_config_reload_is_recorded_once_across_instances(tmp_path, make_gateway,
                                                                 admin_for, store):
    one = await make_gateway({"shop": env(), "mall": env()})
    other = await make_gateway({"shop": env(), "mall": env()})
    admin = await admin_for(one)
    originals = {}
    for gw in (one, other):
        runtime = gw.app[STATE].runtime
        path = runtime.config.files[0].parent / "environments.yaml"
        originals[gw] = path.read_text()
        data = yaml.safe_load(path.read_text())
        data["environments"]["shop"]["overage"] = True
        del data["environments"]["mall"]
        path.write_text(yaml.safe_dump(data))
        assert await runtime.reload("test")
    reloads = await entries(admin, "?action=config_reload")
    assert len(reloads) == 1
    changed = {gw: (gw.app[STATE].runtime.config.files[0].parent
                    / "environments.yaml").read_text() for gw in (one, other)}
    for text, total in ((originals, 2), (changed, 3)):  # undone, then made again
        for gw in (one, other):
            runtime = gw.app[STATE].runtime
            (runtime.config.files[0].parent / "environments.yaml").write_text(text[gw])
            assert await runtime.reload("test")
        assert len(await entries(admin, "?action=config_reload")) == total
    reloads = (await entries(admin, "?action=config_reload"))[2:]
    assert set(reloads[0]["envs"].split()) == {"shop", "mall"} and reloads[0]["envs_count"] == 2
    assert reloads[0]["actor"] == "config" and "1 written, 1 removed" in reloads[0]["body"]
    assert [e["id"] for e in await entries(admin, "?env=mall")] == [
        e["id"] for e in await entries(admin, "?action=config_reload")]  # in each of the three

    # gateway.yaml alone changed (no environment): recorded too, once, naming the file.
    for gw in (one, other):
        runtime = gw.app[STATE].runtime
        path = runtime.config.files[0]
        data = yaml.safe_load(path.read_text())
        data["on_store_failure"] = "closed"
        path.write_text(yaml.safe_dump(data))
        assert await runtime.reload("test")
    newest = (await entries(admin, "?action=config_reload"))[0]
    assert len(await entries(admin, "?action=config_reload")) == 4
    assert newest["body"] == "test; gateway.yaml changed; 0 written, 0 removed"
    assert newest["envs_count"] == 0


async def test_an_environments_events_through_the_api(make_gateway, admin_for, store):
    """GET /envs/{env}/events: its own events only, newest first, paged — a quota alert its
    decisions wrote, purchases — and an environment token reads its own."""
    gw = await make_gateway({"shop": env(limits={"calls": 5}), "mall": env()})
    admin = await admin_for(gw)
    h = {"X-CloudBase-Env": "shop"}
    assert [(await gw.get("/functions/f", headers=h)).status for _ in range(4)] == [200] * 4
    for name in ("mall", "shop"):
        await store.xadd("qg:events", {"type": "pack-bought", "env": name, "pack": "p-" + name})
    resp = await admin.get("/admin/v1/envs/shop/events", headers=AUTH)
    assert resp.status == 200, await resp.text()
    events = (await resp.json())["events"]
    assert {e["env"] for e in events} == {"shop"}
    kinds = [e["type"] for e in events]
    assert "pack-bought" in kinds and "quota-alert" in kinds  # 4 of 5 calls: the 80 % alert
    alert = next(e for e in events if e["type"] == "quota-alert")
    assert (alert["meter"], alert["level"]) == ("calls", "80")
    paged, cursor = [], None  # one at a time: every event once, whichever stream it is in
    while True:
        query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = await (await admin.get(f"/admin/v1/envs/shop/events{query}", headers=AUTH)).json()
        paged += page["events"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert sorted(e["id"] for e in paged) == sorted(e["id"] for e in events)
    tenant = await (await admin.post("/admin/v1/tokens", json={
        "name": "t", "role": "env", "env": "shop"}, headers=AUTH)).json()
    mine = {"Authorization": f"Bearer {tenant['token']}"}
    assert (await admin.get("/admin/v1/envs/shop/events", headers=mine)).status == 200
    assert (await admin.get("/admin/v1/envs/mall/events", headers=mine)).status == 403
    bad = await admin.get("/admin/v1/envs/shop/events?cursor=x", headers=AUTH)
    await assert_problem(bad, 400)


async def test_a_change_is_found_by_the_environments_its_body_names(make_gateway, admin_for):
    """A token made for an environment, a usage batch, an import: the environments named in
    the body, not the path, find the entry (``?env=``); one named is its ``env``, several its
    ``envs`` with their count."""
    admin = await admin_for(await make_gateway({}))
    for env_id in ("shop", "mall"):
        assert (await admin.put(f"/admin/v1/envs/{env_id}", json=api_env(),
                                headers=AUTH)).status == 200
    made = await admin.post("/admin/v1/tokens", json={"name": "owner", "role": "env",
                                                      "env": "shop"}, headers=AUTH)
    assert made.status == 201
    token = await made.json()
    assert (await admin.delete(f"/admin/v1/tokens/{token['id']}", headers=AUTH)).status == 200
    batch = {"records": [{"id": f"r-{env_id}", "env": env_id, "meter": "ai_tokens",
                          "amount": 5} for env_id in ("shop", "mall")]}
    assert (await admin.post("/admin/v1/usage", json=batch, headers=AUTH)).status == 200
    assert [e["action"] for e in await entries(admin, "?env=shop")] == [
        "ingest_usage", "revoke_token", "create_token", "put_env"]
    assert [e["action"] for e in await entries(admin, "?env=mall")] == [
        "ingest_usage", "put_env"]
    [ingested] = await entries(admin, "?action=ingest_usage")
    assert ingested["env"] == "" and ingested["envs"] == "shop mall"
    assert ingested["envs_count"] == 2
    [created] = await entries(admin, "?action=create_token")
    assert created["env"] == "shop" and "envs" not in created


async def test_a_reload_of_the_tokens_file_alone_is_recorded(make_gateway, admin_for,
                                                            tmp_path):
    """A Secret's tokens changed, nothing else: recorded each time, after other reloads too
    (what it is told apart by includes the declared tokens)."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens: []\n")
    gw = await make_gateway({"shop": env()}, tokens_file=str(tokens))
    admin = await admin_for(gw)
    runtime = gw.app[STATE].runtime
    data = yaml.safe_load(runtime.config.files[0].read_text())
    data["on_store_failure"] = "closed"
    runtime.config.files[0].write_text(yaml.safe_dump(data))
    assert await runtime.reload("test")
    for n in (1, 2):
        tokens.write_text(yaml.safe_dump({"tokens": [
            {"name": f"desk {i}", "role": "viewer", "id": f"0000000{i}", "sha256": f"{i}" * 64}
            for i in range(n)]}))
        assert await runtime.reload("test")
    bodies = [e["body"] for e in await entries(admin, "?action=config_reload")]
    assert bodies == ["test; tokens.yaml changed; 0 written, 0 removed"] * 2 + [
        "test; gateway.yaml changed; 0 written, 0 removed"]
