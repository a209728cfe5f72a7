"""The admin API over a real listener, a real Valkey and real gateways: authentication, bad
input, ownership, overage, packs, promos, plan changes with the seed's prices, bills."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from quotagate.billing.bills import price_line
from quotagate.common.calendar import day_number
from quotagate.gateway.app import STATE
from quotagate.limiter import keys
from quotagate.settings.load import PlansFile, parse_yaml
from tests.helpers import ADMIN_TOKEN, PLANS, assert_problem, at, env, local

TOKEN = ADMIN_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def api_env(**extra) -> dict:
    return {"plan": "personal", "anchor": "2026-11-01", "expires": "2027-11-01", **extra}


async def test_authentication(make_gateway, admin_for):
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    assert (await admin.get("/admin/v1/envs")).status == 401
    wrong = await admin.get("/admin/v1/envs", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    basic = await admin.get("/admin/v1/envs", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status == 401
    ok = await admin.get("/admin/v1/envs", headers=AUTH)
    assert ok.status == 200
    assert (await ok.json())["environments"][0] == {
        "env": "shop", "owner": "file", "plan": "standard", "expires": "2027-11-01",
        "overage": False}
    assert (await admin.get("/healthz")).status == 200  # health stays open
    off = await admin_for(gw, token="")
    resp = await off.get("/admin/v1/envs", headers=AUTH)
    assert resp.status == 401 and "QUOTAGATE_ADMIN_TOKEN" in (await resp.json())["detail"]
    # Never on the public port: there it is just a path without a route.
    public = await gw.get("/admin/v1/envs", headers={**AUTH, "X-CloudBase-Env": "shop"})
    assert public.status == 404


async def test_bad_input_changes_nothing(make_gateway, admin_for, store):
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    cases = [
        ("PUT", "/admin/v1/envs/new", b"{not json", 400),
        ("PUT", "/admin/v1/envs/new", b"[1, 2]", 400),
        ("PUT", "/admin/v1/envs/Bad_Id", b"{}", 400),
        ("PUT", "/admin/v1/envs/new", b'{"plan": "gold", "anchor": "2026-11-01", '
                                      b'"expires": "2027-11-01"}', 422),
        ("PUT", "/admin/v1/envs/new", b'{"plan": "personal"}', 422),
        ("PUT", "/admin/v1/envs/new", b'{"plan": "personal", "anchor": "2026-11-01", '
                                      b'"expires": "2027-11-01", "colour": "red"}', 422),
        ("PUT", "/admin/v1/envs/shop", b'{"plan": "personal", "anchor": "2026-11-01", '
                                       b'"expires": "2027-11-01"}', 409),
        ("GET", "/admin/v1/envs/nobody/usage", None, 404),
        ("PUT", "/admin/v1/envs/shop/overage", b'{"overage": "yes"}', 422),
        ("PUT", "/admin/v1/envs/shop/overage", b'{"overage": true}', 409),
        ("PUT", "/admin/v1/envs/shop/mode", b'{"mode": "strict"}', 422),
        ("PUT", "/admin/v1/envs/shop/mode", b'{}', 422),
        ("PUT", "/admin/v1/envs/shop/mode", b'{"mode": "off", "why": "sale"}', 422),
        ("PUT", "/admin/v1/envs/shop/mode", b'{"mode": "off"}', 409),  # the file's
        ("PUT", "/admin/v1/envs/nobody/mode", b'{"mode": "off"}', 404),
        ("GET", "/admin/v1/bills?date=yesterday", None, 422),
        ("DELETE", "/admin/v1/envs/shop", None, 405),  # aiohttp's own refusals too
        ("GET", "/admin/v1/no-such-route", None, 404),
    ]
    async def everything() -> dict[bytes, bytes]:  # (but the audit: refusals are recorded)
        return {k: await store.dump(k) for k in sorted(await store.keys("*"))
                if not k.startswith(b"qg:{audit}:")}

    before = await everything()
    for method, path, body, status in cases:
        resp = await admin.request(method, path, data=body, headers=AUTH)
        assert resp.status == status, (path, body, await resp.text())
        await assert_problem(resp, status)
    assert await everything() == before  # keys and values
    # Each refused change recorded as refused (not the reads, nor routes that do not exist).
    recorded = await store.xrange("qg:{audit}:log")
    assert [int(f[b"status"]) for _, f in recorded] == [
        status for method, path, _, status in cases
        if method in ("PUT", "POST") and "no-such" not in path]


async def test_api_owned_env_overage_switch_on_every_instance(make_gateway, admin_for):
    gws = [await make_gateway({"shop": env()}) for _ in range(2)]
    admin = await admin_for(gws[0])
    resp = await admin.put("/admin/v1/envs/api-1", json=api_env(limits={"calls": 2}),
                           headers=AUTH)
    assert resp.status == 200 and (await resp.json())["owner"] == "api"
    h = {"X-CloudBase-Env": "api-1"}
    assert [(await gws[i % 2].get("/functions/f", headers=h)).status for i in range(3)] == \
        [200, 200, 429]
    resp = await admin.put("/admin/v1/envs/api-1/overage", json={"overage": True}, headers=AUTH)
    assert (await resp.json()) == {"env": "api-1", "overage": True}
    # The next request on every instance.
    assert (await gws[1].get("/functions/f", headers=h)).status == 200
    assert (await gws[0].get("/functions/f", headers=h)).status == 200
    usage = await (await admin.get("/admin/v1/envs/api-1/usage", headers=AUTH)).json()
    calls = usage["meters"]["calls"]
    assert calls["quota"] == 2 and calls["used"] == 2 and calls["payg"] == 2
    assert usage["cycle"] == {"start": "2026-11-01", "end": "2026-12-01"}
    assert usage["qps_limit"] == 500 and usage["realtime"] == {"open": 0, "cap": 10}
    listed = await (await admin.get("/admin/v1/envs", headers=AUTH)).json()
    assert {e["env"]: e["owner"] for e in listed["environments"]} == {"api-1": "api",
                                                                       "shop": "file"}


async def test_api_owned_env_mode_on_every_instance(make_gateway, admin_for):
    """shadow: past the quota, let through (and marked); off: not decided nor counted;
    default: the gateway's enforcement again — on the next request of every instance."""
    gws = [await make_gateway({}) for _ in range(2)]
    admin = await admin_for(gws[0])
    await admin.put("/admin/v1/envs/api-1", json=api_env(limits={"calls": 2}), headers=AUTH)
    h = {"X-CloudBase-Env": "api-1"}

    async def mode(value: str | None) -> dict:
        resp = await admin.put("/admin/v1/envs/api-1/mode", json={"mode": value},
                               headers=AUTH)
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def used() -> int:
        usage = await (await admin.get("/admin/v1/envs/api-1/usage", headers=AUTH)).json()
        return usage["meters"]["calls"]["used"]

    assert [(await gws[i % 2].get("/functions/f", headers=h)).status for i in range(3)] == \
        [200, 200, 429]
    assert await mode("shadow") == {"env": "api-1", "mode": "shadow", "effective": "shadow"}
    for gw in gws:
        resp = await gw.get("/functions/f", headers=h)
        assert resp.status == 200 and resp.headers["X-Quotagate-Shadow"] == "would-refuse"
    assert await mode("off") == {"env": "api-1", "mode": "off", "effective": "off"}
    before = await used()
    for gw in gws:
        resp = await gw.get("/functions/f", headers=h)
        assert resp.status == 200 and "RateLimit" not in resp.headers
    assert await used() == before
    usage = await (await admin.get("/admin/v1/envs/api-1/usage", headers=AUTH)).json()
    assert (usage["mode"], usage["mode_by"]) == ("off", "environment")
    assert await mode(None) == {"env": "api-1", "mode": "default", "effective": "enforce"}
    assert [(await gw.get("/functions/f", headers=h)).status for gw in gws] == [429, 429]
    usage = await (await admin.get("/admin/v1/envs/api-1/usage", headers=AUTH)).json()
    assert (usage["mode"], usage["mode_by"]) == ("enforce", "gateway")
    definition = await (await admin.get("/admin/v1/envs/api-1", headers=AUTH)).json()
    assert definition.get("mode") is None


async def test_packs_buy_list_refund(make_gateway, admin_for, store):
    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({}, clock=clock)
    admin = await admin_for(gw)
    await admin.put("/admin/v1/envs/free-1", json=api_env(plan="free"), headers=AUTH)
    resp = await admin.post("/admin/v1/envs/free-1/packs", json={"pack": "calls-10m"},
                            headers=AUTH)
    assert resp.status == 409 and "free cannot buy" in (await resp.json())["detail"]
    await admin.put("/admin/v1/envs/p-1", json=api_env(limits={"calls": 1}), headers=AUTH)
    for body, status in (({"pack": "calls-1g"}, 422), ({"meter": "calls", "amount": -5}, 422),
                         ({"meter": "qps", "amount": 5}, 422), ({}, 422)):
        assert (await admin.post("/admin/v1/envs/p-1/packs", json=body,
                                 headers=AUTH)).status == status
    resp = await admin.post("/admin/v1/envs/p-1/packs", json={"meter": "calls", "amount": 3,
                                                              "id": "a-small"}, headers=AUTH)
    assert resp.status == 201
    assert (await resp.json())["pack"]["purchased"] == "2026-11-26"
    unused = await admin.post("/admin/v1/envs/p-1/packs", json={"pack": "calls-10m",
                                                                "id": "b-big"}, headers=AUTH)
    assert unused.status == 201
    h = {"X-CloudBase-Env": "p-1"}
    # 1 from the plan, then the pack expiring first; both expire 12-26: by id, a-small.
    assert [(await gw.get("/functions/f", headers=h)).status for _ in range(3)] == [200] * 3
    packs = {p["id"]: p for p in (await (await admin.get(
        "/admin/v1/envs/p-1/packs", headers=AUTH)).json())["packs"]}
    assert packs["b-big"]["remaining"] == 10_000_000 and packs["a-small"]["remaining"] == 1
    assert packs["a-small"]["expires"] == "2026-12-26"
    used = await admin.delete("/admin/v1/envs/p-1/packs/a-small", headers=AUTH)
    assert used.status == 409 and "has been used" in (await used.json())["detail"]
    clock.set(local("2026-12-02T23:59:59"))  # day 7 after purchase: still refundable
    ok = await admin.delete("/admin/v1/envs/p-1/packs/b-big", headers=AUTH)
    assert ok.status == 200 and (await ok.json())["refunded"]["id"] == "b-big"
    assert (await admin.delete("/admin/v1/envs/p-1/packs/b-big", headers=AUTH)).status == 404
    await admin.post("/admin/v1/envs/p-1/packs", json={"pack": "sms-1k", "id": "late"},
                     headers=AUTH)
    clock.set(local("2026-12-10T00:00:00"))  # 8 days later
    late = await admin.delete("/admin/v1/envs/p-1/packs/late", headers=AUTH)
    assert late.status == 409 and "within 7 days" in (await late.json())["detail"]


async def test_promo_for_days_in_env_timezone(make_gateway, admin_for):
    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({}, clock=clock)
    admin = await admin_for(gw)
    await admin.put("/admin/v1/envs/sale", json=api_env(plan="standard"), headers=AUTH)
    resp = await admin.post("/admin/v1/envs/sale/promos", json={"pack": "fn-500g", "days": 2},
                            headers=AUTH)
    assert resp.status == 201 and (await resp.json())["promo"]["start"] == "2026-11-26"
    bad = await admin.post("/admin/v1/envs/sale/promos",
                           json={"pack": "fn-500g", "start": "2026-11-01"}, headers=AUTH)
    assert bad.status == 422
    h = {"X-CloudBase-Env": "sale"}
    limit = await gw.get("/functions/f", headers=h)
    assert limit.headers["RateLimit-Policy"].startswith('"qps";q=10000;')
    clock.set(local("2026-11-27T23:59:59"))
    assert (await gw.get("/functions/f", headers=h)).headers["RateLimit-Policy"].startswith(
        '"qps";q=10000;')
    clock.set(local("2026-11-28T00:00:00"))  # two whole days are over at 00:00
    assert (await gw.get("/functions/f", headers=h)).headers["RateLimit-Policy"].startswith(
        '"qps";q=500;')


def seed_plans(tmp_path: Path) -> Path:
    plans = yaml.safe_load(PLANS.read_text())
    base = {"qps": 500, "calls": 1000, "realtime": 10, "gbs": 100, "capacity_gb": 1,
            "outbound_gb": 1, "storage_traffic_gb": 1, "cdn_origin_gb": 1, "custom_domains": 1}
    plans["plans"]["p100"] = {**base, "price": "100"}
    plans["plans"]["p1000"] = {**base, "price": "1000", "calls": 100_000}
    path = tmp_path / "seed-plans.yaml"
    path.write_text(yaml.safe_dump(plans))
    return path


async def test_plan_change_prices_reproduce_the_seed(make_gateway, admin_for, tmp_path, store):
    clock = at("2022-12-15T10:00:00")
    gw = await make_gateway({}, clock=clock, plans_file=str(seed_plans(tmp_path)))
    admin = await admin_for(gw)
    period = {"anchor": "2022-11-01", "expires": "2023-02-01"}
    await admin.put("/admin/v1/envs/up", json={"plan": "p100", **period}, headers=AUTH)
    await admin.put("/admin/v1/envs/down", json={"plan": "p1000", **period}, headers=AUTH)
    up = await (await admin.post("/admin/v1/envs/up/plan/quote", json={"plan": "p1000"},
                                 headers=AUTH)).json()
    assert up["change"] == "upgrade" and up["amount"] == "1420.27" and up["days_left"] == 48
    down = await (await admin.post("/admin/v1/envs/down/plan/quote", json={"plan": "p100"},
                                   headers=AUTH)).json()
    assert down["change"] == "downgrade" and down["amount"] == "1390.59"
    assert down["parts"]["unused_value"] == "1548.39" and down["parts"]["new_plan_cost"] == \
        "157.80"
    assert down["allowed"] is True
    # Upgrade at once: anchor and expiry stay.
    changed = await admin.post("/admin/v1/envs/up/plan", json={"plan": "p1000"}, headers=AUTH)
    assert changed.status == 200 and (await changed.json())["amount"] == "1420.27"
    record = await (await admin.get("/admin/v1/envs/up", headers=AUTH)).json()
    assert record["definition"]["plan"] == "p1000"
    assert record["definition"]["anchor"] == "2022-11-01"
    assert record["definition"]["paid"] == "1720.27"  # 3 months at 100 + the fee
    # Downgrade refused while this cycle's usage exceeds the target (calls 1,000).
    cycle = day_number(dt.date(2022, 12, 1))
    await store.hset(keys.usage("down"), f"{cycle}:calls", 1001)
    refused = await admin.post("/admin/v1/envs/down/plan", json={"plan": "p100"}, headers=AUTH)
    body = await refused.json()
    assert refused.status == 409 and body["meters"] == ["calls"] and "calls" in body["detail"]
    await store.hset(keys.usage("down"), f"{cycle}:calls", 1000)
    ok = await admin.post("/admin/v1/envs/down/plan", json={"plan": "p100"}, headers=AUTH)
    assert ok.status == 200 and (await ok.json())["amount"] == "1390.59"
    # Arrears block plan changes.
    await admin.put("/admin/v1/envs/owing", json={"plan": "p100", "arrears": True, **period},
                    headers=AUTH)
    owing = await admin.post("/admin/v1/envs/owing/plan", json={"plan": "p1000"}, headers=AUTH)
    assert owing.status == 409 and "arrears" in (await owing.json())["detail"]


async def test_bill_lines_reconcile_with_the_counted_usage(make_gateway, admin_for, store):
    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({"shop": env(overage=True, limits={
        "calls": 3, "storage_traffic_gb": 0, "gbs": 0})}, clock=clock)
    admin = await admin_for(gw)
    h = {"X-CloudBase-Env": "shop"}
    for _ in range(10):
        assert (await gw.get("/functions/f", headers=h)).status == 200
    resp = await gw.get("/storage/x/bytes?n=5000", headers=h)
    assert len(await resp.read()) == 5000
    await asyncio.sleep(0.1)
    today = day_number(dt.date(2026, 11, 26))
    payg = {k.decode(): int(v) for k, v in (await store.hgetall(keys.payg("shop"))).items()}
    bill = await (await admin.get("/admin/v1/bills?date=2026-11-26", headers=AUTH)).json()
    lines = {line["meter"]: line for line in bill["lines"]}
    assert lines["calls"]["quantity"] == payg[f"{today}:calls"] == 8  # 10 - 3 + the storage 1
    assert lines["calls"]["amount"] == "0.00"  # 8 x 0.5 / 10,000 = 0.0004 -> 0.00 (down)
    assert lines["storage_traffic_bytes"]["quantity"] == 5000
    assert lines["gbs"]["quantity"] == payg[f"{today}:gbs"] >= 10 * 256  # 10 runs, >= 1 ms
    assert lines["gbs"]["unit"] == "MB·ms" and lines["gbs"]["per"] == "1024000"
    assert Decimal(bill["total"]) == sum(Decimal(line["amount"]) for line in bill["lines"])
    other_day = await (await admin.get("/admin/v1/bills?date=2026-11-25", headers=AUTH)).json()
    assert other_day["lines"] == [] and other_day["total"] == "0.00"


@pytest.mark.parametrize(("meter", "quantity", "amount"), [
    ("calls", 12_345_678, "617.28"),  # 0.5 per 10,000
    ("calls", 19_999, "0.99"),
    ("gbs", 1_000_000 * 1_024_000, "111.08"),  # 0.00011108 per GBs; counted in MB·ms
    ("gbs", 1_024_000 * 90_000 + 1, "9.99"),  # 9.9972000... down
    ("storage_traffic_bytes", 5 * 1024**3, "1.05"),  # 0.21 per GiB
    ("outbound_bytes", 3 * 1024**3 + 1, "2.40"),  # 0.8 per GiB
    ("cdn_origin_bytes", 1024**3 - 1, "0.14"),  # 0.15 per GiB, just under one
])
def test_bill_line_prices_exact(meter, quantity, amount) -> None:
    line = price_line(parse_yaml(PLANS, PlansFile), "e", dt.date(2026, 11, 26), meter,
                      quantity)
    assert line is not None and line.amount == amount and line.quantity == quantity


async def test_ingestion_counts_each_record_once_and_enforces(make_gateway, admin_for, store):
    gw = await make_gateway({"shop": env(limits={"ai_tokens": 1000}),
                             "big": env(overage=True, limits={"outbound_gb": 1})})
    admin = await admin_for(gw)
    batch = {"records": [
        {"id": "r1", "env": "shop", "meter": "ai_tokens", "amount": 600},
        {"id": "r2", "env": "big", "meter": "outbound_bytes", "amount": 1024**3 + 10,
         "at": "2026-11-26T09:00:00+08:00"},
    ]}
    first = await admin.post("/admin/v1/usage", json=batch, headers=AUTH)
    assert first.status == 200
    assert (await first.json())["counted"] == 2
    again = await (await admin.post("/admin/v1/usage", json=batch, headers=AUTH)).json()
    assert again["counted"] == 0 and again["duplicates"] == 2  # a retried batch
    cycle = day_number(dt.date(2026, 11, 1))
    assert int(await store.hget(keys.usage("shop"), f"{cycle}:ai_tokens")) == 600
    today = day_number(dt.date(2026, 11, 26))
    assert int(await store.hget(keys.payg("big"), f"{today}:outbound_bytes")) == 10
    h = {"X-CloudBase-Env": "shop"}
    assert (await gw.get("/ai/chat", headers=h)).status == 200
    more = {"records": [{"id": "r3", "env": "shop", "meter": "ai_tokens", "amount": 500}]}
    assert (await (await admin.post("/admin/v1/usage", json=more, headers=AUTH)).json()
            )["counted"] == 1
    refused = await gw.get("/ai/chat", headers=h)  # 1,100 of 1,000 tokens, hard stop
    body = await refused.json(content_type=None)
    assert refused.status == 429 and body["meter"] == "ai_tokens"
    assert (await gw.get("/database/q", headers=h)).status == 200  # not an AI route
    bill = await (await admin.get("/admin/v1/bills?date=2026-11-26&env=big",
                                  headers=AUTH)).json()
    assert [(line["meter"], line["quantity"]) for line in bill["lines"]] == [
        ("outbound_bytes", 10)]


async def test_ingestion_bad_batches_count_nothing(make_gateway, admin_for, store):
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    good = {"id": "ok", "env": "shop", "meter": "ai_tokens", "amount": 5}
    for bad, status in (
        ({"records": []}, 422),
        ({"records": "x"}, 422),
        ({"records": [good, {**good, "id": "n", "amount": -1}]}, 422),
        ({"records": [good, {**good, "id": "u", "env": "nobody"}]}, 422),
        ({"records": [good, {**good, "id": "m", "meter": "calls"}]}, 422),
        ({"records": [good, {**good, "id": "bad id!"}]}, 422),
        ({"records": [good, good]}, 422),
        ({"records": [good, {**good, "id": "t", "at": "2026-11-26T09:00:00"}]}, 422),
        ({"records": [good, {**good, "id": "f", "at": "2099-01-01T00:00:00+00:00"}]}, 422),
    ):
        resp = await admin.post("/admin/v1/usage", json=bad, headers=AUTH)
        assert resp.status == status, bad
        await assert_problem(resp, status)
    assert await store.hgetall(keys.usage("shop")) == {}
    assert not await store.keys("qg:{shop}:seen:*")


async def test_capacity_gauge_refuses_writes_only_and_bills_per_day(make_gateway, admin_for,
                                                                    store):
    gib = 1024**3
    gw = await make_gateway({"shop": env(limits={"capacity_gb": 3}),
                             "over": env(overage=True, limits={"capacity_gb": 3})})
    admin = await admin_for(gw)

    async def report(rid: str, env_id: str, size: int) -> None:
        body = {"records": [{"id": rid, "env": env_id, "meter": "capacity_bytes",
                             "amount": size}]}
        resp = await admin.post("/admin/v1/usage", json=body, headers=AUTH)
        assert resp.status == 200, await resp.text()

    h = {"X-CloudBase-Env": "shop"}
    await report("c1", "shop", 2 * gib)
    assert (await gw.post("/database/write", headers=h, data="x")).status == 200
    await report("c2", "shop", 3 * gib)  # full
    refused = await gw.post("/database/write", headers=h, data="x")
    assert refused.status == 429
    assert (await refused.json(content_type=None))["meter"] == "capacity_bytes"
    assert (await gw.put("/storage/file", headers=h, data="x")).status == 429
    assert (await gw.get("/database/read", headers=h)).status == 200  # reads still pass
    assert (await gw.get("/functions/f", headers=h)).status == 200
    usage = await (await admin.get("/admin/v1/envs/shop/usage", headers=AUTH)).json()
    assert usage["meters"]["capacity_bytes"]["current"] == 3 * gib
    assert usage["meters"]["capacity_bytes"]["remaining"] == 0
    await report("c3", "shop", 1 * gib)  # data deleted: writes pass again
    assert (await gw.post("/database/write", headers=h, data="x")).status == 200

    # Overage: the day's largest excess is billed per GB-day.
    for rid, size in (("o1", 4 * gib), ("o2", 5 * gib), ("o3", 4 * gib)):
        await report(rid, "over", size)
    bill = await (await admin.get("/admin/v1/bills?date=2026-11-26&env=over",
                                  headers=AUTH)).json()
    [line] = bill["lines"]
    assert line["meter"] == "capacity_bytes" and line["quantity"] == 2 * gib
    assert line["amount"] == "0.20"  # 2 GB x 0.1 CNY for the day
    assert (await gw.post("/database/write", headers={"X-CloudBase-Env": "over"},
                          data="x")).status == 200


async def test_ids_days_and_old_records_are_checked(make_gateway, admin_for, store):
    gw = await make_gateway({})
    admin = await admin_for(gw)
    await admin.put("/admin/v1/envs/shop", json=api_env(), headers=AUTH)
    for body in ({"meter": "calls", "amount": 1, "id": "a b"}, {"pack": "sms-1k", "id": "x/y"},
                 {"pack": "sms-1k", "id": "z" * 65}):
        resp = await admin.post("/admin/v1/envs/shop/packs", json=body, headers=AUTH)
        assert resp.status == 422, body
    for days in (0, -1, 10**9):
        resp = await admin.post("/admin/v1/envs/shop/promos", json={"pack": "db-3k",
                                                                    "days": days},
                                headers=AUTH)
        assert resp.status == 422, days
    assert (await admin.get("/admin/v1/envs/shop/usage", headers=AUTH)).status == 200
    old = {"records": [{"id": "old", "env": "shop", "meter": "ai_tokens", "amount": 1,
                        "at": "2026-10-20T00:00:00+08:00"}]}  # 37 days before the clock
    assert (await admin.post("/admin/v1/usage", json=old, headers=AUTH)).status == 422


async def test_renewing_early_extends_the_paid_period(make_gateway, admin_for):
    gw = await make_gateway({}, clock=at("2026-01-02T12:00:00"))
    admin = await admin_for(gw)
    await admin.put("/admin/v1/envs/e", headers=AUTH, json={
        "plan": "enterprise", "anchor": "2026-01-01", "expires": "2026-04-01"})  # 3 x 999
    body = await (await admin.post("/admin/v1/envs/e/renew", json={"months": 1},
                                   headers=AUTH)).json()
    assert body["expires"] == "2026-05-01" and body["paid"] == "3996.00"
    record = await (await admin.get("/admin/v1/envs/e", headers=AUTH)).json()
    assert record["definition"]["period_start"] is None  # still the anchor
    quote = await (await admin.post("/admin/v1/envs/e/plan/quote", json={"plan": "standard"},
                                    headers=AUTH)).json()
    # 3996 - 2/121 x 3996 = 3929.9504.. -> 3929.96 (up); 119 days of standard
    # 119 x 199 x 12 / 365 = 778.553.. -> 778.55 (down); 3929.96 - 778.55 = 3151.41
    assert quote["parts"]["unused_value"] == "3929.96"
    assert quote["parts"]["new_plan_cost"] == "778.55"
    assert quote["amount"] == "3151.41"


async def test_capacity_late_reports_ignored_and_carried_to_later_days(make_gateway, admin_for,
                                                                       store):
    gib = 1024**3
    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({"over": env(overage=True, limits={"capacity_gb": 3})},
                            clock=clock)
    admin = await admin_for(gw)

    async def report(rid: str, size: int, when: str) -> None:
        body = {"records": [{"id": rid, "env": "over", "meter": "capacity_bytes",
                             "amount": size, "at": when}]}
        assert (await admin.post("/admin/v1/usage", json=body, headers=AUTH)).status == 200

    await report("a", 5 * gib, "2026-11-26T11:00:00+08:00")
    await report("b", 50 * gib, "2026-11-26T10:00:00+08:00")  # older: ignored
    usage = await (await admin.get("/admin/v1/envs/over/usage", headers=AUTH)).json()
    assert usage["meters"]["capacity_bytes"]["current"] == 5 * gib
    clock.set(local("2026-11-27T09:00:00"))  # no report today: the scheduler carries it
    await gw.app[STATE].runtime.scheduler.run_once()
    await asyncio.sleep(0.1)
    for day in ("2026-11-26", "2026-11-27"):
        bill = await (await admin.get(f"/admin/v1/bills?date={day}&env=over",
                                      headers=AUTH)).json()
        assert [(line["meter"], line["quantity"]) for line in bill["lines"]] == [
            ("capacity_bytes", 2 * gib)], day


async def test_capacity_guards_pack_refunds_and_downgrades(make_gateway, admin_for):
    gib = 1024**3
    gw = await make_gateway({})
    admin = await admin_for(gw)
    await admin.put("/admin/v1/envs/big", json=api_env(plan="standard"), headers=AUTH)
    await admin.post("/admin/v1/envs/big/packs", json={"pack": "capacity-100g", "id": "c1"},
                     headers=AUTH)
    body = {"records": [{"id": "g1", "env": "big", "meter": "capacity_bytes",
                         "amount": 150 * gib}]}
    assert (await admin.post("/admin/v1/usage", json=body, headers=AUTH)).status == 200
    refund = await admin.delete("/admin/v1/envs/big/packs/c1", headers=AUTH)
    assert refund.status == 409 and "in use" in (await refund.json())["detail"]
    down = await admin.post("/admin/v1/envs/big/plan", json={"plan": "personal"}, headers=AUTH)
    assert down.status == 409 and (await down.json())["meters"] == ["capacity_bytes"]


async def test_a_store_outage_is_a_503_problem_and_changes_nothing(make_gateway, admin_for,
                                                                   own_valkey):
    gw = await make_gateway({"shop": env()}, store_url=own_valkey.url)
    admin = await admin_for(gw)
    body = {"plan": "personal", "anchor": "2026-11-01", "expires": "2027-11-01"}
    assert (await admin.put("/admin/v1/envs/fresh", json=body, headers=AUTH)).status == 200
    own_valkey.kill()
    for method, path, data in (("GET", "/admin/v1/envs/fresh", None),
                               ("GET", "/admin/v1/envs/shop/usage", None),
                               ("PUT", "/admin/v1/envs/fresh", {**body, "overage": True}),
                               ("POST", "/admin/v1/envs/fresh/packs", {"pack": "calls-10m"}),
                               ("GET", "/admin/v1/bills?date=2026-11-26", None)):
        resp = await admin.request(method, path, json=data, headers=AUTH)
        problem = await assert_problem(resp, 503)
        assert problem["type"].endswith("/admin/store-unavailable")
        assert resp.headers["Retry-After"] == "1" and "Traceback" not in problem["detail"]
    own_valkey.start()
    resp = await admin.get("/admin/v1/envs/fresh", headers=AUTH)
    assert resp.status == 200
    definition = (await resp.json())["definition"]
    assert definition["overage"] is False and definition["packs"] == []  # nothing changed


async def test_aiohttp_refusals_keep_their_headers(make_gateway, admin_for):
    admin = await admin_for(await make_gateway({"shop": env()}))
    resp = await admin.delete("/admin/v1/envs/shop", headers=AUTH)
    await assert_problem(resp, 405)
    assert set(resp.headers["Allow"].split(",")) >= {"GET", "PUT"}


async def test_no_dates_before_the_store_clock_is_sampled(make_gateway, admin_for):
    from quotagate.common.clock import StoreClock
    from quotagate.limiter.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: never sampled
    gw = await make_gateway({"shop": env()}, store_url=dead, clock=StoreClock())
    admin = await admin_for(gw)
    resp = await admin.post("/admin/v1/envs/shop/packs", json={"pack": "calls-10m"},
                            headers=AUTH)
    problem = await assert_problem(resp, 503)
    assert "clock" in problem["detail"] and resp.headers["Retry-After"] == "1"
