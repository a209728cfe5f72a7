"""Metrics and logs: the names the dashboard uses exist; every refusal is logged with its
fields; JSON lines parse."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from quotagate.common.logs import JsonFormatter
from quotagate.gateway.app import STATE
from tests.helpers import env

ROOT = Path(__file__).resolve().parents[1]
H = {"X-CloudBase-Env": "shop"}


async def test_refusals_are_logged_with_their_fields(make_gateway, caplog):
    gw = await make_gateway({"shop": env(limits={"calls": 1})})
    with caplog.at_level(logging.DEBUG, "quotagate.decisions"):
        assert (await gw.get("/functions/f", headers={**H, "X-Request-Id": "req-1"})).status \
            == 200
        assert (await gw.get("/functions/f", headers={**H, "X-Request-Id": "req-2"})).status \
            == 429
    records = [r for r in caplog.records if r.name == "quotagate.decisions"]
    admitted, refused = records
    assert admitted.levelno == logging.DEBUG and admitted.reason == "admitted"
    assert refused.levelno == logging.INFO
    assert (refused.env, refused.route, refused.meter, refused.reason, refused.request_id) == (
        "shop", "/functions/", "calls", "quota-exceeded", "req-2")
    line = json.loads(JsonFormatter().format(refused))
    assert line["level"] == "info" and line["logger"] == "quotagate.decisions"
    assert line["reason"] == "quota-exceeded" and line["request_id"] == "req-2"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


async def test_dashboard_uses_only_exported_metrics(make_gateway, admin_for):
    gw = await make_gateway({"shop": env()})
    for _ in range(3):
        await gw.get("/functions/f", headers=H)
    await gw.app[STATE].limiter.renew()
    text = await (await (await admin_for(gw)).get("/metrics")).text()
    exported = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {m for e in exprs for m in re.findall(r"quotagate_\w+", e)}

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum|created)$", "", name)

    missing = {m for m in used if base(m) not in {base(e) for e in exported}}
    assert missing == set()
    for name in ("quotagate_decisions", "quotagate_lease_renewals", "quotagate_realtime_watches",
                 "quotagate_function_slots", "quotagate_config_reloads",
                 "quotagate_webhook_deliveries", "quotagate_events_forwarded"):
        assert name in {base(e) for e in exported}, name


def test_troubleshooting_covers_every_problem_and_error_code() -> None:
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    problems = set(re.findall(r'Problem\(\d+, "([a-z-]+)"',
                              (ROOT / "quotagate/gateway/problems.py").read_text()))
    assert len(problems) >= 14
    from quotagate.gateway.problems import CODES

    assert problems == set(CODES), "every problem type has its code"
    for suffix in problems:
        assert f"### `{suffix}` (" in page and f"— `{CODES[suffix]}`" in page, suffix
    realtime = (ROOT / "quotagate/gateway/realtime.py").read_text()
    codes = set(re.findall(r'"([A-Z][A-Z_]{5,})"', realtime)) - {
        "INIT_WATCH", "REBUILD_WATCH", "CLOSE_WATCH", "CHECK_LAST", "INIT_EVENT", "NEXT_EVENT",
        "CHECK_EVENT", "LOGIN", "ERROR", "WATCH", "REFUSED"}
    assert "REALTIME_CONNECTION_LIMIT_EXCEEDED" in codes and len(codes) >= 9
    for code in codes:
        assert f"`{code}`" in page, code


async def test_per_environment_metrics_only_for_listed_envs(make_gateway, admin_for):
    gw = await make_gateway({"shop": env(), "other": env()}, metrics_envs=["shop"])
    for e in ("shop", "other"):
        await gw.get("/functions/f", headers={"X-CloudBase-Env": e})
    text = await (await (await admin_for(gw)).get("/metrics")).text()
    assert re.search(r'quotagate_env_decisions_total\{env="shop",result="admitted"\} [1-9]', text)
    assert 'env="other"' not in text
