"""Hostile input (issue 12), the small ones: look-alike environment headers, credentials at
rest in the invocation queue, deep admin JSON, /metrics behind the admin token."""

from __future__ import annotations

from quotagate.limiter import keys
from tests.helpers import ADMIN_TOKEN, assert_problem, env

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_look_alike_environment_headers_never_reach_the_upstream(make_gateway):
    gw = await make_gateway({"shop": env(), "other": env()})
    resp = await gw.get("/functions/f/echo", headers={
        "X-CloudBase-Env": "shop", "X_CloudBase_Env": "other", "x_cloudbase-env": "other"})
    assert resp.status == 200
    seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
    assert seen["x-cloudbase-env"] == "shop"
    assert not [k for k in seen if "_" in k and "cloudbase" in k]


async def test_queued_invocations_keep_no_credentials(make_gateway, store):
    gw = await make_gateway({"asleep": env(anchor="2025-01-01", expires="2026-11-20")})
    resp = await gw.post("/functions/job", data=b'{"n": 1}', headers={
        "X-CloudBase-Env": "asleep", "X-Invocation-Type": "Event",
        "Authorization": "Bearer s3cret-user-token", "Cookie": "session=s3cret",
        "Content-Type": "application/json"})
    assert resp.status == 202, await resp.text()
    [entry] = await store.lrange(keys.queue("asleep"), 0, -1)
    assert b"s3cret" not in entry and b"application/json" in entry


async def test_deep_admin_json_is_a_400(make_gateway, admin_for):
    admin = await admin_for(await make_gateway({"shop": env()}))
    deep = b'{"plan": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await admin.put("/admin/v1/envs/fresh", data=deep, headers=AUTH)
    assert "deep" in (await assert_problem(resp, 400))["detail"]


async def test_metrics_can_ask_for_the_admin_token(make_gateway, admin_for):
    admin = await admin_for(await make_gateway({"shop": env()}, metrics_auth=True))
    await assert_problem(await admin.get("/metrics"), 401)
    resp = await admin.get("/metrics", headers=AUTH)
    assert resp.status == 200 and "quotagate_decisions_total" in await resp.text()
    assert (await admin.get("/healthz")).status == 200  # probes stay open


async def test_amounts_beyond_exact_counting_are_refused_by_the_api(make_gateway, admin_for,
                                                                    store):
    """The store's Lua counts in doubles: every amount and limit is at most 2^53 - 1, and
    limits in GB or GBs at most what stays exact once counted in bytes or MB·ms."""
    admin = await admin_for(await make_gateway({"shop": env()}))
    for limits, path in (({"calls": 2**53}, "$.limits.calls"),
                         ({"capacity_gb": 2**53 // 2**30}, "$.limits.capacity_gb"),
                         ({"gbs": 2**53 // 1_024_000 + 1}, "$.limits.gbs")):
        resp = await admin.put("/admin/v1/envs/fresh", headers=AUTH, json={
            "plan": "standard", "anchor": "2026-11-01", "expires": "2027-11-01",
            "limits": limits})
        assert path in (await assert_problem(resp, 422))["detail"], limits
    assert not await store.exists(keys.definition("fresh"))
    resp = await admin.post("/admin/v1/envs/shop/packs", headers=AUTH,
                            json={"meter": "calls", "amount": 2**53})
    assert "2^53-1" in (await assert_problem(resp, 422))["detail"]
    resp = await admin.post("/admin/v1/usage", headers=AUTH, json={"records": [
        {"id": "big", "env": "shop", "meter": "ai_tokens", "amount": 2**53}]})
    await assert_problem(resp, 422)
    assert await store.hgetall(keys.usage("shop")) == {}
    resp = await admin.get("/admin/v1/envs/shop/packs", headers=AUTH)
    assert (await resp.json())["packs"] == []
