"""Scoped tokens of the admin API (control/tokens.py) over a real listener and a real Valkey:
every route called with every role — 403 problem+json where the role may not, and nothing
in the store changed — and a token's life: created, used, rotated, revoked, seen by another
instance at once, its secret never stored."""

from __future__ import annotations

import pytest

from quotagate.control import audit
from quotagate.control.api import ENV_TOKEN_ROUTES, PREFIX, ROUTES
from quotagate.control.tokens import GRANTS, READ, ROLES
from tests.helpers import ADMIN_TOKEN, assert_problem, env

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_token(admin, role: str, env_id: str | None = None, name: str | None = None
                     ) -> dict:
    body = {"name": name or f"{role} of the tests", "role": role}
    if env_id is not None:
        body["env"] = env_id
    resp = await admin.post("/admin/v1/tokens", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def everything(store) -> dict[bytes, bytes]:
    """Every key and value but the audit trail's (a refusal is recorded there)."""
    return {k: await store.dump(k) for k in sorted(await store.keys("*"))
            if not k.startswith(b"qg:{audit}:")}


def request_for(method: str, path: str, env_id: str) -> tuple[str, str, dict | None]:
    """A request of the route (its body may be refused as invalid: what is tested is
    whether the role may call it at all)."""
    url = (PREFIX + path).replace("{env}", env_id).replace("{pack_id}", "p-none").replace(
        "{token}", "00000000")
    if path == "/bills":
        url += f"?date=2026-11-25&env={env_id}"
    return method, url, ({} if method in ("POST", "PUT") else None)


async def test_every_route_with_every_role(make_gateway, admin_for, store):
    gw = await make_gateway({"shop": env(overage=True), "mall": env()})
    admin = await admin_for(gw)
    tokens = {role: (await make_token(admin, role, "shop" if role == "env" else None))["token"]
              for role in ROLES}
    refused = allowed = 0
    for method, path, _, need in ROUTES:
        for role in ROLES:
            for env_id in (("shop", "mall") if role == "env" else ("shop",)):
                m, url, body = request_for(method, path, env_id)
                may = (need in GRANTS[role] if role != "env" else
                       (m, PREFIX + path) in ENV_TOKEN_ROUTES and (
                           env_id == "shop" or ("{env}" not in path and path != "/bills")))
                before = None if may else await everything(store)
                recorded = await store.xlen(audit.STREAM)
                resp = await admin.request(m, url, json=body, headers=bearer(tokens[role]))
                if may:
                    allowed += 1
                    assert resp.status not in (401, 403), (role, m, url, await resp.text())
                    continue
                refused += 1
                assert resp.status == 403, (role, m, url, await resp.text())
                problem = await assert_problem(resp, 403)
                assert problem["role"] == role and "admin/forbidden" in problem["type"]
                assert await everything(store) == before, (role, m, url)
                if need != READ:  # a change refused: recorded once, as refused
                    assert await store.xlen(audit.STREAM) == recorded + 1
                    last = (await store.xrevrange(audit.STREAM, count=1))[0][1]
                    assert (last[b"status"], last[b"role"]) == (b"403", role.encode())
                else:
                    assert await store.xlen(audit.STREAM) == recorded
    assert refused > 50 and allowed > 50  # (both sides walked)


async def test_an_env_token_reads_its_own_environment_only(make_gateway, admin_for):
    gw = await make_gateway({"shop": env(), "mall": env()})
    admin = await admin_for(gw)
    shop = (await make_token(admin, "env", "shop"))["token"]
    me = await admin.get("/admin/v1/me", headers=bearer(shop))
    assert (await me.json())["role"] == "env" and (await me.json())["env"] == "shop"
    assert (await admin.get("/admin/v1/envs/shop/usage", headers=bearer(shop))).status == 200
    for url in ("/admin/v1/envs/mall/usage", "/admin/v1/envs", "/admin/v1/envs:export",
                "/admin/v1/bills?date=2026-11-25", "/admin/v1/bills?date=2026-11-25&env=mall"):
        resp = await admin.get(url, headers=bearer(shop))
        assert resp.status == 403, url
    own = await admin.get("/admin/v1/bills?date=2026-11-25&env=shop", headers=bearer(shop))
    assert own.status == 200
    # An env token for an environment that does not exist is refused; a bad role too.
    for body, status in [({"name": "x", "role": "env", "env": "nobody"}, 404),
                         ({"name": "x", "role": "env"}, 422),
                         ({"name": "x", "role": "viewer", "env": "shop"}, 422),
                         ({"name": "x", "role": "root"}, 422),
                         ({"name": "", "role": "viewer"}, 422),
                         ({"name": "x", "role": "viewer", "colour": 1}, 422)]:
        resp = await admin.post("/admin/v1/tokens", json=body, headers=AUTH)
        assert resp.status == status, (body, await resp.text())
        await assert_problem(resp, status)


async def test_a_tokens_life_on_two_instances(make_gateway, admin_for, store):
    """Made on one instance, taken by another at once; listed without its secret; the store
    holds its digest only; rotated (the old secret refused at once), revoked (refused)."""
    one = await admin_for(await make_gateway({"shop": env()}))
    other = await admin_for(await make_gateway({"shop": env()}))
    made = await make_token(one, "viewer", name="support desk")
    secret = made["token"]
    assert secret.startswith(f"qg_{made['id']}_")
    assert (await other.get("/admin/v1/envs", headers=bearer(secret))).status == 200
    listed = await (await other.get("/admin/v1/tokens", headers=AUTH)).json()
    assert [t["name"] for t in listed["tokens"]] == ["support desk"]
    assert "token" not in listed["tokens"][0]
    stored = await everything(store)
    assert not any(secret.encode() in v for v in stored.values())
    assert not any(secret.encode() in k for k in stored)
    # A viewer cannot make tokens, nor an admin's token from a viewer's.
    resp = await other.post("/admin/v1/tokens", json={"name": "me too", "role": "admin"},
                            headers=bearer(secret))
    assert resp.status == 403

    # A token pasted where its id goes: refused, and its secret never recorded.
    pasted = await one.delete(f"/admin/v1/tokens/{secret}", headers=AUTH)
    assert pasted.status == 404
    assert (await other.get("/admin/v1/envs", headers=bearer(secret))).status == 200
    recorded = await store.xrange(audit.STREAM)
    assert recorded and not any(secret.encode() in value for _, fields in recorded
                                for value in fields.values())
    assert recorded[-1][1][b"path"] == f"/admin/v1/tokens/qg_{made['id']}_…".encode()
    rotated = await (await one.post(f"/admin/v1/tokens/{made['id']}/rotate",
                                    headers=AUTH)).json()
    assert rotated["id"] == made["id"] and rotated["token"] != secret
    assert rotated["rotated_ms"] >= rotated["created_ms"] > 0
    assert (await other.get("/admin/v1/envs", headers=bearer(secret))).status == 401
    assert (await other.get("/admin/v1/envs", headers=bearer(rotated["token"]))).status == 200

    gone = await one.delete(f"/admin/v1/tokens/{made['id']}", headers=AUTH)
    assert gone.status == 200 and (await gone.json())["revoked"] is True
    assert (await other.get("/admin/v1/envs",
                            headers=bearer(rotated["token"]))).status == 401
    for method, url in (("DELETE", f"/admin/v1/tokens/{made['id']}"),
                        ("POST", f"/admin/v1/tokens/{made['id']}/rotate"),
                        ("DELETE", "/admin/v1/tokens/not-an-id")):
        resp = await one.request(method, url, headers=AUTH)
        assert resp.status == 404, url
        await assert_problem(resp, 404)
    assert (await (await one.get("/admin/v1/tokens", headers=AUTH)).json())["tokens"] == []


@pytest.mark.parametrize("header", ["Bearer qg_00000000_" + "A" * 43, "Bearer ", "Basic x",
                                    "Bearer " + "x" * 5000])
async def test_a_token_nobody_made_is_401(make_gateway, admin_for, header):
    admin = await admin_for(await make_gateway({"shop": env()}))
    resp = await admin.get("/admin/v1/envs", headers={"Authorization": header})
    assert resp.status == 401
    await assert_problem(resp, 401)


async def test_scoped_tokens_work_without_the_operator_token(make_gateway, admin_for):
    """QUOTAGATE_ADMIN_TOKEN unset: scoped tokens made earlier still work; no other."""
    gw = await make_gateway({"shop": env()})
    made = await make_token(await admin_for(gw), "billing")
    off = await admin_for(gw, token="")
    assert (await off.get("/admin/v1/envs", headers=bearer(made["token"]))).status == 200
    resp = await off.get("/admin/v1/envs", headers=AUTH)
    assert resp.status == 401 and "QUOTAGATE_ADMIN_TOKEN" in (await resp.json())["detail"]
