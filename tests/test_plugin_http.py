"""Plugin mode's HTTP front doors as Traefik ForwardAuth and Envoy ext_authz (HTTP service)
call them, and the done endpoint under hostile input: ``quotagate serve`` (shipped config,
``authz_listen`` on, real clock), driven over HTTP the way those proxies do."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from quotagate.limiter.embedded import free_port
from tests.deployed import Deployed, days, live_env, served

pytestmark = pytest.mark.deployed


class Authz:
    def __init__(self, deployed: Deployed, port: int):
        self.deployed = deployed
        self.base = f"http://127.0.0.1:{port}"

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path,
                                                           **kw) as r:
            return r.status, dict(r.headers), await r.read()

    async def forward(self, method: str, uri: str, env: str = "shop", **kw: Any
                      ) -> tuple[int, dict[str, str], bytes]:
        """As Traefik's ForwardAuth middleware asks (it sends a GET, or the method with
        forwardBody)."""
        headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri,
                   "X-Forwarded-Host": "api.example.com", "X-Forwarded-Proto": "https",
                   "X-CloudBase-Env": env, **kw.pop("headers", {})}
        return await self.call(kw.pop("as_method", "GET"), "/authz/forward", headers=headers,
                               **kw)

    async def envoy(self, method: str, path: str, env: str = "shop", **kw: Any
                    ) -> tuple[int, dict[str, str], bytes]:
        """As Envoy's ext_authz HTTP service asks (path_prefix /authz/envoy, the original
        method and headers)."""
        headers = {"X-CloudBase-Env": env, **kw.pop("headers", {})}
        return await self.call(method, "/authz/envoy" + path, headers=headers, **kw)

    async def done(self, **params: Any) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.post(
                self.base + "/authz/v1/done", params=params) as r:
            return r.status, await r.read()


@pytest.fixture
async def authz(tmp_path: Path) -> AsyncIterator[Authz]:
    port = free_port()
    async with served(tmp_path / "config", {
            "shop": live_env(calls=3, qps=1000),
            "fn": live_env(function_concurrency=1, qps=1000),
            "lapsed": {"plan": "standard", "anchor": days(-40), "expires": days(-1)}},
            authz_listen=f"127.0.0.1:{port}") as (deployed, _):
        yield Authz(deployed, port)


async def test_forward_auth_admits_then_answers_the_refusal_itself(authz: Authz):
    for _ in range(3):
        status, headers, _ = await authz.forward("GET", "/database/q?x=1")
        assert status == 200 and '"calls";q=3' in headers["RateLimit-Policy"]
        assert headers["Server"] == "quotagate"
    status, headers, body = await authz.forward("GET", "/database/q?x=1")
    assert status == 429 and headers["Content-Type"] == "application/problem+json"
    assert json.loads(body)["code"] == "QUOTA_EXCEEDED" and int(headers["Retry-After"]) >= 1
    status, _, body = await authz.forward("GET", "/database/q", env="nobody")
    assert status == 404 and json.loads(body)["code"] == "ENVIRONMENT_NOT_FOUND"
    status, _, body = await authz.forward("GET", "/database/%2e%2e/ai/chat")
    assert status == 400 and json.loads(body)["code"] == "INVALID_PATH"
    # A leading // is a path, not a host: nothing routes it (as on the proxy), never a
    # cheaper route than the one the upstream will serve.
    status, _, body = await authz.forward("GET", "//functions/database/f%41")
    assert status == 404 and json.loads(body)["code"] == "ROUTE_NOT_FOUND"
    status, _, body = await authz.forward("GET", "/", env="shop")  # the realtime route
    assert status == 501 and json.loads(body)["code"] == "PROXY_REQUIRED"
    status, _, body = await authz.forward("POST", "/web")  # an action route, no body
    assert status == 501 and json.loads(body)["code"] == "PROXY_REQUIRED"


async def test_envoy_ext_authz_with_the_body_counts_an_action(authz: Authz):
    body = json.dumps({"action": "functions.invokeFunction", "function_name": "report"})
    status, headers, _ = await authz.envoy("POST", "/web", env="fn", data=body,
                                           headers={"Content-Type": "application/json"})
    assert status == 200
    ticket = headers["X-Quotagate-Decision"]  # an invocation: its slot, to give back
    status, _, refused = await authz.envoy("POST", "/web", env="fn", data=body)
    assert status == 429 and json.loads(refused)["code"] == "CONCURRENCY_LIMIT_EXCEEDED"
    assert (await authz.done(decision=ticket, duration_ms=1200))[0] == 204
    once = gbs_used(authz.deployed)
    assert once > 0
    assert (await authz.done(decision=ticket, duration_ms=1200))[0] == 204  # again: no-op
    assert gbs_used(authz.deployed) == once
    status, _, _ = await authz.envoy("POST", "/web", env="fn", data=body)
    assert status == 200


async def test_an_isolated_environments_sign_call_passes_as_on_the_proxy(authz: Authz):
    """The shipped /web's pass_while_isolated: the same decision in plugin mode."""
    json_body = {"Content-Type": "application/json"}
    sign = json.dumps({"action": "auth.wsWebSign", "env": "lapsed"})
    status, _, _ = await authz.envoy("POST", "/web", env="lapsed", data=sign, headers=json_body)
    assert status == 200
    invoke = json.dumps({"action": "functions.invokeFunction", "function_name": "f"})
    status, _, body = await authz.envoy("POST", "/web", env="lapsed", data=invoke,
                                        headers=json_body)
    assert status == 403 and json.loads(body)["code"] == "ENVIRONMENT_ISOLATED"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "x-envoy-auth-partial-body": "false"}
    status, _, _ = await authz.envoy("OPTIONS", "/web", env="lapsed", headers=preflight)
    assert status == 200
    status, _, body = await authz.envoy("OPTIONS", "/functions/f", env="lapsed",
                                        headers=preflight)
    assert status == 403 and json.loads(body)["code"] == "ENVIRONMENT_ISOLATED"
    assert authz.deployed.json("env", "usage", "lapsed")["meters"]["calls"]["used"] == 0


def gbs_used(deployed: Deployed) -> float:
    """The fn environment's GBs used this cycle (``quotagate env usage``)."""
    return float(deployed.json("env", "usage", "fn")["meters"]["gbs"]["used"])


async def test_done_refuses_forged_and_malformed_calls(authz: Authz):
    status, headers, _ = await authz.forward("POST", "/functions/report", env="fn")
    assert status == 200
    ticket = headers["X-Quotagate-Decision"]
    body, _, mac = ticket.partition(".")
    forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
    for params, needle in (
            ({}, "no decision"),
            ({"decision": "garbage"}, "not one this deployment signed"),
            ({"decision": forged}, "not one this deployment signed"),
            ({"decision": ticket, "duration_ms": "-5"}, "duration_ms"),
            ({"decision": ticket, "bytes": "1e9"}, "bytes"),
            ({"decision": ticket, "answered": "maybe"}, "answered")):
        status, text = await authz.done(**params)
        assert status == 400, (params, text)
        problem = json.loads(text)
        assert problem["code"] == "INVALID_DECISION" and needle in problem["detail"], problem
    # None of them gave the slot back.
    status, _, _ = await authz.forward("POST", "/functions/report", env="fn")
    assert status == 429
    assert (await authz.done(decision=ticket))[0] == 204
    status, _, _ = await authz.forward("POST", "/functions/report", env="fn")
    assert status == 200
