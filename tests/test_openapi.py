"""docs/openapi.yaml describes exactly the admin API's routes."""

from __future__ import annotations

from pathlib import Path

import yaml

from quotagate.control.api import PREFIX, ROUTES

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "patch"}


def test_openapi_matches_the_routes() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item if method in METHODS}
    served = {(method, PREFIX + path) for method, path, _, _ in ROUTES}
    assert documented == served
    for path, item in spec["paths"].items():
        params = {p["name"] for p in item.get("parameters", []) if "name" in p} | {
            p["$ref"].rsplit("/", 1)[1] for p in item.get("parameters", []) if "$ref" in p}
        for name in [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]:
            assert name in params, (path, name)


async def test_the_admin_app_serves_what_the_routes_list(make_gateway) -> None:
    from quotagate.control.admin import init_admin_app
    from quotagate.gateway.app import STATE

    gw = await make_gateway({})
    app = init_admin_app(gw.app[STATE].runtime, token="t")
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(PREFIX)
              and r.method != "HEAD"}
    assert served == {(m, PREFIX + p) for m, p, _, _ in ROUTES}


def test_every_operation_states_the_role_the_code_enforces() -> None:
    """x-quotagate-role is the least role of the permission the route needs, and
    x-quotagate-env-token marks exactly what an environment token may call."""
    from quotagate.control.api import ENV_TOKEN_ROUTES
    from quotagate.control.tokens import LEAST_ROLE

    spec = yaml.safe_load(SPEC.read_text())
    needs = {(m, PREFIX + p): need for m, p, _, need in ROUTES}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            key = (method.upper(), path)
            assert op.get("x-quotagate-role") == LEAST_ROLE[needs[key]], key
            assert bool(op.get("x-quotagate-env-token")) is (key in ENV_TOKEN_ROUTES), key
