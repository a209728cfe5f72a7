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
    served = {(method, PREFIX + path) for method, path, _ in ROUTES}
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
    assert served == {(m, PREFIX + p) for m, p, _ in ROUTES}
