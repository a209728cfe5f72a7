"""Metrics and logs: the names the dashboard uses exist; every refusal is logged with its
fields; JSON lines parse."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import pytest

from quotagate.common.logs import JsonFormatter
from quotagate.gateway.app import STATE
from tests.helpers import env

ROOT = Path(__file__).resolve().parents[1]
H = {"X-CloudBase-Env": "shop"}


async def test_refusals_are_logged_with_their_fields(make_gateway, caplog):
    """Without the access log, the decisions log says each refusal at INFO (with it, the
    access log does: test_the_access_log_has_every_request_once)."""
    gw = await make_gateway({"shop": env(limits={"calls": 1})}, access_log=False)
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
    realtime = "".join(p.read_text() for p in sorted(
        (ROOT / "quotagate/gateway/realtime").glob("*.py")))
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


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_store_errors_are_counted_in_fail_open_mode_too(make_gateway):
    """Fail-open admits through an outage: the outage still shows in the store-error count."""
    from quotagate.limiter.embedded import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = await make_gateway({"shop": env()}, store_url=dead, on_store_failure="open",
                            store={"timeout_ms": 100})
    before = _sample("quotagate_store_errors_total", {"kind": "unavailable"})
    for _ in range(3):
        resp = await gw.get("/functions/a", headers=H)
        assert resp.status == 200 and resp.headers["X-Quotagate-Bypass"] == "store-unavailable"
    assert _sample("quotagate_store_errors_total", {"kind": "unavailable"}) >= before + 3


async def test_a_flushed_store_counts_a_script_reload(make_gateway, store):
    gw = await make_gateway({"shop": env()})
    assert (await gw.get("/functions/a", headers=H)).status == 200
    before = _sample("quotagate_script_reloads_total")
    await store.execute_command("FUNCTION", "FLUSH")
    await store.execute_command("SCRIPT", "FLUSH")
    assert (await gw.get("/functions/a", headers=H)).status == 200
    assert _sample("quotagate_script_reloads_total") == before + 1


async def test_version_is_told_and_the_server_header_names_no_python(make_gateway, admin_for):
    import subprocess
    import sys

    from quotagate import __version__

    out = subprocess.run([sys.executable, "-m", "quotagate", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"quotagate {__version__}"
    gw = await make_gateway({"shop": env()})
    admin = await admin_for(gw)
    health = await admin.get("/healthz")
    assert (await health.json())["version"] == __version__
    refused = await gw.get("/nowhere", headers=H)  # the gateway's own answer, not proxied
    for resp in (health, refused):
        assert resp.headers["Server"] == "quotagate", resp.headers
    metrics_text = await (await admin.get("/metrics")).text()
    assert 'quotagate_build_info{python="' in metrics_text
    assert f'version="{__version__}"' in metrics_text


async def test_the_access_log_has_every_request_once(make_gateway, capfd):
    gw = await make_gateway({"shop": env(limits={"calls": 1})})
    capfd.readouterr()
    assert (await gw.get("/functions/f?token=secret", headers={**H, "X-Request-Id": "a1"})
            ).status == 200
    assert (await gw.get("/functions/f", headers=H)).status == 429  # quota used
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "Bad!"})).status == 400
    assert (await gw.get("/nowhere", headers=H)).status == 404
    await asyncio.sleep(0.2)  # written every 50 ms
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    assert [(e["status"], e["decision"]) for e in lines] == [
        (200, "admitted"), (429, "quota-exceeded"), (400, "invalid-environment"),
        (404, "route-not-found")]
    first = lines[0]
    assert first["request_id"] == "a1" and first["env"] == "shop"
    assert first["route"] == "/functions/" and first["kind"] == "function"
    assert first["method"] == "GET" and first["path"] == "/functions/f"  # no query
    assert first["upstream_status"] == 200 and first["upstream_ms"] >= 0
    assert first["bytes"] > 0 and first["duration_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert lines[1]["upstream_status"] is None and lines[1]["bytes"] > 0  # the gateway's
    assert lines[2]["env"] is None  # refused before it was known
    assert all((e["level"], e["logger"]) == ("info", "quotagate.access") for e in lines)


async def test_the_access_log_can_be_off(make_gateway, capfd):
    gw = await make_gateway({"shop": env()}, access_log=False)
    capfd.readouterr()
    assert (await gw.get("/functions/f", headers=H)).status == 200
    await asyncio.sleep(0.2)
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("{")]


async def test_requests_are_counted_by_kind_status_and_decision(make_gateway):
    gw = await make_gateway({"shop": env(limits={"calls": 1})})
    admitted = ("function", "2xx", "admitted")
    refused = ("function", "4xx", "quota-exceeded")
    invalid = ("none", "4xx", "invalid-environment")
    names = ("kind", "status", "decision")
    before = {k: _sample("quotagate_requests_total", dict(zip(names, k, strict=True)))
              for k in (admitted, refused, invalid)}
    latency_before = _sample("quotagate_request_duration_seconds_count", {"kind": "function"})
    upstream_before = _sample("quotagate_upstream_duration_seconds_count", {"kind": "function"})
    assert (await gw.get("/functions/f", headers=H)).status == 200
    assert (await gw.get("/functions/f", headers=H)).status == 429
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "Bad!"})).status == 400
    for key, want in ((admitted, 1), (refused, 1), (invalid, 1)):
        got = _sample("quotagate_requests_total", dict(zip(names, key, strict=True)))
        assert got == before[key] + want, key
    assert _sample("quotagate_request_duration_seconds_count", {"kind": "function"}) \
        == latency_before + 2
    assert _sample("quotagate_upstream_duration_seconds_count", {"kind": "function"}) \
        == upstream_before + 1  # only the answered one went upstream


async def test_with_the_access_log_a_refusal_is_logged_once(make_gateway, caplog, capfd):
    gw = await make_gateway({"shop": env(limits={"calls": 0})})
    capfd.readouterr()
    with caplog.at_level(logging.INFO, "quotagate.decisions"):
        assert (await gw.get("/functions/f", headers=H)).status == 429
    await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.name == "quotagate.decisions"]
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    assert [e["decision"] for e in lines] == ["quota-exceeded"]


@pytest.mark.deployed
async def test_the_access_log_goes_to_a_file_reopened_at_each_reload(tmp_path: Path):
    """`quotagate serve` with access_log_file: the lines go to the file, not stderr; after
    the file is moved away (a rotation) and the gateway is sent SIGHUP, new lines go to a new
    file at the same path and none is lost. A path that cannot be written (a directory) is
    said in the log and the lines go to stderr; requests are answered all the same."""
    import signal

    from tests.deployed import live_env, served

    envs = {"logged": live_env()}
    async with served(tmp_path, envs, access_log_file="access.log") as (gw, _):
        url = gw.route("function") + "f"
        log_path = tmp_path / "access.log"

        async def logged(path: Path, n: int) -> list[dict]:
            for _ in range(100):  # lines are written every 50 ms
                lines = path.read_text().splitlines() if path.exists() else []
                if len(lines) >= n:
                    break
                await asyncio.sleep(0.05)
            return [json.loads(line) for line in lines]

        assert await gw.get(url, "logged", 3) == [200] * 3
        before = await logged(log_path, 3)
        assert [(e["env"], e["status"]) for e in before] == [("logged", 200)] * 3
        log_path.rename(tmp_path / "access.log.1")
        reloads = gw.log_text().count("config reloaded")
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            if gw.log_text().count("config reloaded") > reloads:
                break
            await asyncio.sleep(0.05)
        assert await gw.get(url, "logged", 2) == [200] * 2
        assert len(await logged(log_path, 2)) == 2  # the new file
        assert len(await logged(tmp_path / "access.log.1", 3)) == 3  # the rotated one, whole
        assert '"logger":"quotagate.access"' not in gw.log_text()

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "access.log").mkdir()  # a directory where the file should be
    async with served(blocked, envs, access_log_file="access.log") as (gw, _):
        assert await gw.get(gw.route("function") + "f", "logged") == [200]
        for _ in range(100):
            if '"logger":"quotagate.access"' in gw.log_text():
                break
            await asyncio.sleep(0.05)
        text = gw.log_text()
        assert "access_log_file" in text and "cannot be written" in text, text[-2000:]
        assert '"logger":"quotagate.access"' in text  # to stderr instead
