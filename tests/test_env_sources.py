"""The environment wherever the platform's SDKs put it, and action endpoints (/web, /admin)
counted as the operation their body names (SPEC §13), through a real gateway and store."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aredis

from quotagate.limiter import keys
from tests.helpers import assert_problem, env, routes_to, script_calls

DOMAINS = ["api.example.com", "tcb-api.example.net"]


def action_routes(origin: str, **extra) -> list[dict]:
    return [{"prefix": "/web", "exact": True, "upstream": origin, "kind": "action", **extra},
            {"prefix": "/admin", "exact": True, "upstream": origin, "kind": "action"},
            {"prefix": "/", "exact": True, "upstream": origin, "kind": "realtime"},
            *routes_to(origin)]


def calls_left(resp) -> int:
    """The calls left, from the RateLimit header's "calls" item."""
    item = next(i for i in resp.headers["RateLimit"].split(",") if '"calls"' in i)
    return int(item.split(";r=")[1].split(";")[0])


async def store_calls(store: aredis.Redis) -> int:
    return script_calls(await store.info("commandstats"))


async def test_the_environment_from_host_parameter_header_and_their_agreement(
        make_gateway, store):
    gw = await make_gateway({"shop": env(), "other": env()}, domains=DOMAINS)
    ok = [({"Host": "shop.api.example.com"}, ""),
          ({"Host": "shop.ap-shanghai.tcb-api.example.net"}, ""),  # a region label
          ({"Host": "shop.tcb-api.example.net:8443"}, ""),
          ({"Host": "SHOP.Api.Example.COM"}, ""),  # host names have no case
          ({"Host": "shop.api.example.com.:80"}, ""),  # the fully qualified form, a port
          ({"Host": "shop.api.example.com.", "X-CloudBase-Env": "shop"}, ""),
          ({}, "?env=shop"),
          ({"X-CloudBase-Env": "shop"}, "?env=shop"),  # two sources that agree
          ({"Host": "shop.api.example.com", "X-CloudBase-Env": "shop"}, "")]
    for headers, query in ok:
        resp = await gw.get(f"/functions/f{query}", headers=headers)
        assert resp.status == 200, (headers, query, await resp.text())
        assert resp.headers["RateLimit-Policy"]  # decided, as shop

    before = await store_calls(store)
    bad = [({"Host": "shop.api.example.com"}, "?env=other", "names environment 'shop'"),
           # the host does not win over the header (docs/operations.md): refused too
           ({"Host": "shop.api.example.com", "X-CloudBase-Env": "other"}, "",
            "names environment 'shop'"),
           ({"X-CloudBase-Env": "other"}, "?env=shop", "but X-CloudBase-Env names"),
           ({}, "?env=shop&env=shop", "more than one env query parameter"),
           ({}, "?env=Shop", "env parameter 'Shop' is not an environment id"),
           ({"Host": "a.b.shop.tcb-api.example.net"}, "", "expected {env}.tcb-api"),
           ({"Host": "-x.api.example.com"}, "", "host label '-x'"),
           ({}, "", "no environment")]
    for headers, query, reason in bad:
        resp = await gw.get(f"/functions/f{query}", headers=headers)
        problem = await assert_problem(resp, 400)
        assert problem["code"] == "INVALID_ENVIRONMENT" and reason in problem["detail"], \
            (headers, query, problem)
    assert await store_calls(store) == before  # refused before any store call


async def test_an_action_request_is_counted_as_its_action(make_gateway, upstream, store):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env(limits={"function_concurrency": 1}), "other": env()},
                            routes=action_routes(origin))
    body = json.dumps({"action": "functions.invokeFunction", "function_name": "sum",
                       "request_data": json.dumps({"a": 1}), "env": "shop"}).encode()
    resp = await gw.post("/web?env=shop&demo=echo", data=body)
    assert resp.status == 200, await resp.text()
    echoed = await resp.json()
    assert echoed["body"] == body.decode() and echoed["body_bytes"] == len(body)  # unchanged
    assert echoed["headers"]["X-CloudBase-Env"] == "shop"

    # The function's concurrency slot, as on a path route: 1 at a time per function.
    async def invoke(name: str) -> int:
        data = json.dumps({"action": "functions.invokeFunction", "function_name": name,
                           "envName": "shop"})
        r = await gw.post("/admin?demo=slow&ms=300", data=data)
        await r.read()
        return r.status

    assert sorted(await asyncio.gather(invoke("a"), invoke("a"))) == [200, 429]
    assert await asyncio.gather(invoke("a"), invoke("b")) == [200, 200]

    before = calls_left(await gw.get("/functions/x", headers={"X-CloudBase-Env": "shop"}))
    query = json.dumps({"action": "database.queryDocument", "collectionName": "todos",
                        "env": "shop"})
    assert (await gw.post("/web", data=query)).status == 200
    after = calls_left(await gw.get("/functions/x", headers={"X-CloudBase-Env": "shop"}))
    assert before - after == 2  # the database action and this call: one each


async def test_only_the_sign_call_passes_while_isolated_at_no_cost(make_gateway, upstream,
                                                                   store):
    """``pass_while_isolated`` (the shipped /web: js-sdk's realtime sign call): while the
    environment is isolated that action passes, uncharged, and so do the route's preflights;
    nothing else of it passes, and a released environment's sign call gets 404."""
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway(
        {"shop": env(expires="2026-11-20"),  # isolated since 11-20
         "gone": env(anchor="2026-10-01", expires="2026-11-01")},  # released since 11-17
        routes=action_routes(origin, pass_while_isolated=["auth.wsWebSign"]))

    def action(name: str, env_id: str = "shop", **members: str) -> bytes:
        return json.dumps({"action": name, "env": env_id, **members}).encode()

    resp = await gw.post("/web?env=shop&demo=echo", data=action("auth.wsWebSign"))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["body"] == action("auth.wsWebSign").decode()  # forwarded
    refused = [action("auth.signInAnonymously"), action("auth.getJwt"),
               action("functions.invokeFunction", function_name="sum"),
               action("database.queryDocument"), action("storage.getDownloadUrl")]
    for body in refused:
        resp = await gw.post("/web?env=shop", data=body)
        assert (await assert_problem(resp, 403))["code"] == "ENVIRONMENT_ISOLATED", body
    # /admin does not list it: refused there.
    resp = await gw.post("/admin?env=shop", data=action("auth.wsWebSign"))
    assert (await assert_problem(resp, 403))["code"] == "ENVIRONMENT_ISOLATED"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "X-CloudBase-Env": "shop"}
    assert (await gw.options("/web", headers=preflight)).status == 200
    for path in ("/admin", "/functions/f"):  # routes that pass nothing while isolated
        resp = await gw.options(path, headers=preflight)
        assert (await assert_problem(resp, 403))["code"] == "ENVIRONMENT_ISOLATED", path
    assert await store.hgetall(keys.usage("shop")) == {}  # nothing charged
    resp = await gw.post("/web?env=gone", data=action("auth.wsWebSign", "gone"))
    assert (await assert_problem(resp, 404))["code"] == "ENVIRONMENT_NOT_FOUND"
    resp = await gw.options("/web", headers={**preflight, "X-CloudBase-Env": "gone"})
    assert (await assert_problem(resp, 404))["code"] == "ENVIRONMENT_NOT_FOUND"


async def test_action_requests_that_cannot_be_counted_are_refused(make_gateway, upstream,
                                                                  store):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env(), "other": env()},
                            routes=action_routes(origin, max_body_bytes=2048))
    before = await store_calls(store)
    cases = [
        (b"not json", 400, "INVALID_ACTION", "not JSON"),
        (b"[1, 2]", 400, "INVALID_ACTION", "JSON object"),
        (b'{"function_name": "f"}', 400, "INVALID_ACTION", "no action"),
        (b'{"action": "wx.getOpenData"}', 400, "INVALID_ACTION", "unknown action"),
        (b'{"action": "functions.invokeFunction"}', 400, "INVALID_FUNCTION", "function_name"),
        (b'{"action": "functions.invokeFunction", "function_name": "../x"}', 400,
         "INVALID_FUNCTION", "function_name"),
        (b'{"action": "database.x", "env": "other"}', 400, "INVALID_ENVIRONMENT",
         "the body's env names 'other'"),
        (b'{"action": "database.x", "env": 7}', 400, "INVALID_ENVIRONMENT", "not a string"),
        (b'{"action": "database.x", "pad": "' + b"x" * 3000 + b'"}', 413, "BODY_TOO_LARGE",
         "2048"),
    ]
    for body, status, code, reason in cases:
        resp = await gw.post("/web?env=shop", data=body)
        problem = await assert_problem(resp, status)
        assert problem["code"] == code and reason in problem["detail"], (body[:60], problem)
    resp = await gw.post("/web", data=b'{"action": "database.x"}')  # no env anywhere
    assert (await assert_problem(resp, 400))["code"] == "INVALID_ENVIRONMENT"
    assert await store_calls(store) == before
    # exact: /web only, not /webhooks or /web/x
    for path in ("/webhooks", "/web/x"):
        resp = await gw.post(path, data=b"{}", headers={"X-CloudBase-Env": "shop"})
        assert (await assert_problem(resp, 404))["code"] == "ROUTE_NOT_FOUND"


async def test_plain_http_on_a_realtime_route_is_426_and_never_counted(make_gateway, upstream,
                                                                       store):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, routes=action_routes(origin))
    before = await store_calls(store)
    resp = await gw.get("/", headers={"X-CloudBase-Env": "shop"})
    problem = await assert_problem(resp, 426)
    assert problem["code"] == "WEBSOCKET_REQUIRED"
    assert resp.headers["Upgrade"] == "websocket"
    assert await store_calls(store) == before


async def test_refusals_carry_the_members_the_sdks_read(make_gateway):
    gw = await make_gateway({"shop": env(limits={"calls": 1})})
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 200
    resp = await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop",
                                                 "X-Request-Id": "client-7"})
    problem = await assert_problem(resp, 429)
    assert problem["code"] == "QUOTA_EXCEEDED" and problem["message"] == problem["detail"]
    assert problem["requestId"] == "client-7" == resp.headers["X-Request-Id"]
    resp = await gw.get("/functions/f")  # no environment: refused before the store
    problem = await assert_problem(resp, 400)
    assert problem["requestId"] == resp.headers["X-Request-Id"] and problem["requestId"]


async def test_action_bodies_are_read_whole_however_they_arrive(make_gateway, upstream):
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, routes=action_routes(origin))
    big = json.dumps({"action": "database.addDocument", "env": "shop",
                      "data": "x" * 300_000}).encode()
    resp = await gw.post("/web?demo=echo", data=big)  # arrives in many reads
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["body_bytes"] == len(big)

    async def in_pieces():  # chunked, with a pause between the pieces
        yield big[:1000]
        await asyncio.sleep(0.2)
        yield big[1000:]

    resp = await gw.post("/web?demo=echo", data=in_pieces())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["body_bytes"] == len(big)


async def test_ambiguous_action_bodies_are_refused(make_gateway, upstream, store):
    """Parsers disagree on which of two equal keys wins, and some match keys without case:
    the upstream could run another action, or as another environment, than was counted."""
    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env(), "other": env()}, routes=action_routes(origin))
    before = await store_calls(store)
    for body in (
        b'{"action": "database.queryDocument", "action": "functions.invokeFunction", '
        b'"function_name": "f"}',
        b'{"action": "database.queryDocument", "Action": "functions.invokeFunction", '
        b'"function_name": "f"}',
        b'{"action": "database.x", "env": "shop", "env": "other"}',
        b'{"action": "database.x", "envName": "shop", "ENVNAME": "other"}',
        b'{"action": "functions.invokeFunction", "function_name": "a", "function_name": "b"}',
        b'{"\\u0061ction": "database.x", "action": "functions.invokeFunction"}',
    ):
        resp = await gw.post("/web?env=shop", data=body)
        problem = await assert_problem(resp, 400)
        assert problem["code"] == "INVALID_ACTION" and "ambiguous" in problem["detail"], body
    for query in ("?ENV=other", "?env=shop&envName=other", "?Env=shop"):
        resp = await gw.get(f"/functions/f{query}", headers={"X-CloudBase-Env": "shop"})
        assert (await assert_problem(resp, 400))["code"] == "INVALID_ENVIRONMENT", query
    assert await store_calls(store) == before


async def test_compressed_bodies_go_as_sent_or_are_refused(make_gateway, upstream):
    import gzip

    origin = f"http://127.0.0.1:{upstream.port}"
    gw = await make_gateway({"shop": env()}, routes=action_routes(origin))
    plain = json.dumps({"action": "database.x", "env": "shop", "pad": "y" * 2000}).encode()
    packed = gzip.compress(plain)
    resp = await gw.post("/web", data=packed, headers={"Content-Encoding": "gzip"})
    problem = await assert_problem(resp, 400)  # cannot be read to be counted
    assert problem["code"] == "INVALID_ACTION" and "Content-Encoding" in problem["detail"]
    # A path route streams it on as it came: the upstream gets the client's bytes and headers.
    resp = await gw.post("/functions/f/echo", data=packed,
                         headers={"Content-Encoding": "gzip", "X-CloudBase-Env": "shop"})
    assert resp.status == 200, await resp.text()
    echoed = await resp.json()
    assert echoed["headers"]["Content-Encoding"] == "gzip"
    assert echoed["body_bytes"] == len(plain)  # the upstream's aiohttp decompressed it
    assert int(echoed["headers"]["Content-Length"]) == len(packed)
