"""Gateway versions (SPEC §15) as shipped: `quotagate serve` on the real clock, the shipped
plans.yaml's versions, the CLI and the admin API, the lifecycle scheduler's events through a
webhook. Every date is laid out around today (``hold_the_day``), none is fixed."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import yaml

from quotagate.common.calendar import add_months_clamped
from tests.deployed import (
    Deployed,
    Webhook,
    days,
    hold_the_day,
    serve,
    shipped_config,
    start_upstream,
    today,
)

pytestmark = pytest.mark.deployed

SHIPPED_PLANS = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "config" / "plans.yaml").read_text())
VERSIONS = SHIPPED_PLANS["gateway_versions"]


def _env(**extra: object) -> dict[str, object]:
    return {"plan": "standard", "anchor": days(-40), "expires": days(300), **extra}


def _grant(version: str, purchased: int, months: int, **extra: object) -> dict[str, object]:
    return {"version": version, "purchased": days(purchased), "months": months, **extra}


@pytest.fixture(scope="module")
async def webhook() -> AsyncIterator[Webhook]:
    hook = await Webhook().start()
    yield hook
    assert hook.runner is not None
    await hook.runner.cleanup()


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook
             ) -> AsyncIterator[Deployed]:
    hold_the_day()
    upstream, origin = start_upstream()
    directory = tmp_path_factory.mktemp("versions")
    settings = shipped_config(directory, origin, lifecycle_interval_ms=300,
                              events={"webhook_url": f"http://127.0.0.1:{webhook.port}/events",
                                      "webhook_retry_ms": 50})
    envs = {
        # test (100 QPS) under a standard plan (500): the version's QPS applies.
        "gv-active": _env(gateway=_grant("test", -3, 1)),
        # The plan's own limit (50) is lower: it applies.
        "gv-plan-lower": _env(limits={"qps": 50}, gateway=_grant("test", -3, 1)),
        # starter for one month, bought 40 days ago, not renewed: the lowest version's caps.
        "gv-expired": _env(gateway=_grant("starter", -40, 1)),
        # bought 27 days ago for a month: ends within 7 days.
        "gv-ending": _env(gateway=_grant("basic", -27, 1)),
        # starter (1,000 QPS) bought 35 days ago for a month, renewing itself: still starter,
        # so the plan's 500 applies; renewed 4 to 7 days ago.
        "gv-auto": _env(gateway=_grant("starter", -35, 1, auto_renew=True)),
        "gv-none": _env(),
    }
    (directory / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))
    served = await serve(directory, settings)
    try:
        yield served
    finally:
        log = served.stop()
        upstream.terminate()
        assert "Traceback" not in log, log


async def _headers(gw: Deployed, env: str) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(
            gw.route("function") + "hello", headers={"X-CloudBase-Env": env}) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_the_lower_qps_applies_and_the_headers_say_which(gw: Deployed) -> None:
    expect = {
        "gv-active": '"qps";q=100;w=1;by="gateway-version"',
        "gv-plan-lower": '"qps";q=50;w=1,',
        "gv-expired": f'"qps";q={VERSIONS["test"]["qps"]};w=1;by="gateway-version"',
        "gv-auto": '"qps";q=500;w=1,',  # starter's 1,000 is above the plan's 500
        "gv-none": '"qps";q=500;w=1,',
    }
    for env, policy in expect.items():
        status, headers = await _headers(gw, env)
        assert status == 200, env
        assert headers["RateLimit-Policy"].startswith(policy), (env, headers)


async def test_the_usage_report_tells_the_qps_in_force_and_which_cap(gw: Deployed) -> None:
    """`quotagate env usage` and the admin API report the QPS the store enforces — the lower
    of plan (with promos) and version — and the cap that decides it, for each state of a
    version, and on a promo day: the same figure as the RateLimit-Policy header."""
    gw.put_env("gv-promo", yaml.safe_dump(_env(gateway=_grant("test", -3, 1))))
    gw.put_env("gv-promo-free", yaml.safe_dump(_env()))
    gw.put_env("gv-pending", yaml.safe_dump(_env(gateway=_grant("basic", 5, 1))))
    for env in ("gv-promo", "gv-promo-free"):
        gw.ok("promo", "buy", env, "db-3k", "--days", "1")
    expect = {"gv-active": (100, "gateway-version"), "gv-plan-lower": (50, "plan"),
              "gv-expired": (VERSIONS["test"]["qps"], "gateway-version"),
              "gv-auto": (500, "plan"), "gv-none": (500, "plan"),
              "gv-promo": (100, "gateway-version"),  # db-3k's 10,000 capped by test
              "gv-promo-free": (10_000, "promo"), "gv-pending": (500, "plan")}
    for env, (qps, by) in expect.items():
        usage = gw.json("env", "usage", env)
        assert (usage["qps_limit"], usage["qps_limit_by"]) == (qps, by), env
        assert f"QPS {qps} (by {by})" in gw.ok("env", "usage", env)
        status, headers = await _headers(gw, env)
        assert status == 200, env
        assert headers["RateLimit-Policy"].startswith(f'"qps";q={qps};w=1'), (env, headers)


async def test_a_refusal_by_the_version_says_so(gw: Deployed) -> None:
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, dict]:
            async with s.get(gw.route("function") + "hello",
                             headers={"X-CloudBase-Env": "gv-active"}) as r:
                return r.status, (await r.json(content_type=None)) if r.status == 429 else {}
        results = await asyncio.gather(*(one() for _ in range(60)))
    refused = [body for status, body in results if status == 429]
    assert refused, "60 at once above 100 QPS with a 100 ms burst: some are refused"
    body = refused[0]
    assert body["type"].endswith("/qps-exceeded") and body["limit"] == "gateway-version"
    assert "its gateway version's limit of 100 requests per second" in body["detail"]


def test_the_cli_shows_each_state(gw: Deployed) -> None:
    active = gw.json("gateway", "show", "gv-active")["gateway"]
    purchased = today() - dt.timedelta(days=3)
    assert active["state"] == "active" and active["in_effect"] == "test"
    assert active["expires"] == add_months_clamped(purchased, 1).isoformat()
    assert (active["qps"], active["mbps"], active["bytes_per_second"]) == (100, 1, 125_000)
    assert active["monthly_price"] == "899.00"
    expired = gw.json("gateway", "show", "gv-expired")["gateway"]
    assert expired["state"] == "expired" and expired["version"] == "starter"
    assert (expired["in_effect"], expired["qps"], expired["mbps"]) == ("test", 100, 1)
    auto = gw.json("gateway", "show", "gv-auto")["gateway"]
    bought = today() - dt.timedelta(days=35)
    assert auto["state"] == "active" and auto["auto_renew"] and auto["renew_months"] == 1
    assert auto["expires"] == add_months_clamped(bought, 2).isoformat()  # renewed once
    assert gw.json("gateway", "show", "gv-none")["gateway"] is None
    text = gw.ok("gateway", "show", "gv-expired")
    assert "gateway starter (expired)" in text and "in effect: test: 100 QPS, 1 Mbps" in text
    listed = gw.json("gateway", "versions")
    assert [v["version"] for v in listed["versions"]] == list(VERSIONS)
    assert listed["terms"] == [1, 2, 3, 4, 5, 6, 12, 24, 36, 48]
    assert {v["version"]: v["monthly_price"] for v in listed["versions"]} == {
        name: f"{Decimal(v['price']):.2f}" for name, v in VERSIONS.items()}
    for version, months in (("test", 1), ("basic", 6), ("pro", 36), ("enterprise", 48)):
        quote = gw.json("gateway", "quote", version, "--months", str(months))
        assert quote["amount"] == f"{Decimal(VERSIONS[version]['price']) * months:.2f}"
    assert gw.json("gateway", "quote", "pro", "--months", "36")["amount"] == "15479964.00"
    bad = gw.cli("gateway", "quote", "pro", "--months", "7")
    assert bad.returncode != 0 and "months must be a term sold" in bad.stderr


async def test_buy_renew_and_auto_renew_through_the_cli(gw: Deployed, webhook: Webhook
                                                        ) -> None:
    gw.put_env("gv-api", yaml.safe_dump({"plan": "standard", "anchor": days(0),
                                         "expires": days(365)}))
    bought = gw.json("gateway", "buy", "gv-api", "basic", "--months", "6")
    assert bought["amount"] == "209994.00"  # 34,999 x 6, exact
    assert bought["gateway"]["expires"] == add_months_clamped(today(), 6).isoformat()
    status, headers = await _headers(gw, "gv-api")
    assert status == 200 and headers["RateLimit-Policy"].startswith('"qps";q=500;w=1,')
    renewed = gw.json("gateway", "renew", "gv-api", "--months", "12")
    assert renewed["amount"] == "419988.00"
    assert renewed["gateway"]["expires"] == add_months_clamped(today(), 18).isoformat()
    assert renewed["gateway"]["months"] == 18
    event = await webhook.wait_for("gv-api", "gateway-renewed")
    assert (event["amount"], event["months"], event["auto"]) == ("419988.00", "12", "0")
    purchase = await webhook.wait_for("gv-api", "gateway-purchased")
    assert (purchase["version"], purchase["amount"]) == ("basic", "209994.00")

    # Refused with the reason, nothing changed.
    again = gw.cli("gateway", "buy", "gv-api", "starter", "--months", "1")
    assert again.returncode != 0 and "has gateway version basic until" in again.stderr
    odd = gw.cli("gateway", "renew", "gv-api", "--months", "7")
    assert odd.returncode != 0 and "months must be a term sold" in odd.stderr
    unknown = gw.cli("gateway", "buy", "gv-none", "platinum", "--months", "1")
    assert unknown.returncode != 0 and "unknown gateway version 'platinum'" in unknown.stderr
    file_owned = gw.cli("gateway", "buy", "gv-none", "test", "--months", "1")
    assert file_owned.returncode != 0 and "environments.yaml" in file_owned.stderr
    assert gw.json("gateway", "show", "gv-api")["gateway"]["months"] == 18

    on = gw.json("gateway", "auto-renew", "gv-api", "on", "--months", "3")["gateway"]
    assert on["auto_renew"] and on["renew_months"] == 3
    off = gw.json("gateway", "auto-renew", "gv-api", "off")["gateway"]
    assert not off["auto_renew"] and off["months"] == 18


def _money(amount: Decimal, rounding: str) -> str:
    return str(amount.quantize(Decimal("0.01"), rounding=rounding))


async def test_a_version_changed_mid_term_through_the_cli(gw: Deployed, webhook: Webhook
                                                          ) -> None:
    """Upgrade at once for the price difference over the share of the prepaid days left, the
    expiry kept; downgrade back for the same, rounded the customer's way. At list price: the
    environment's discount (its plan's) does not apply."""
    start = today() - dt.timedelta(days=10)
    gw.put_env("gv-change", yaml.safe_dump({
        "plan": "standard", "anchor": days(-10), "expires": days(365), "discount": "0.8",
        "gateway": {"version": "test", "purchased": start.isoformat(), "months": 3}}))
    bought = gw.json("gateway", "show", "gv-change")["gateway"]
    expires = add_months_clamped(start, 3)
    span, left = (expires - start).days, (expires - today()).days
    difference = Decimal(VERSIONS["starter"]["price"]) - Decimal(VERSIONS["test"]["price"])
    exact = difference * 3 * left / span
    status, headers = await _headers(gw, "gv-change")
    assert status == 200 and headers["RateLimit-Policy"].startswith(
        '"qps";q=100;w=1;by="gateway-version",')

    quoted = gw.json("gateway", "change", "gv-change", "starter", "--quote")
    assert (quoted["change"], quoted["days_left"]) == ("upgrade", left)
    assert quoted["amount"] == _money(exact, "ROUND_DOWN")  # a charge: down to the fen
    assert gw.json("gateway", "show", "gv-change")["gateway"] == bought  # a quote changes nothing

    up = gw.json("gateway", "change", "gv-change", "starter")
    assert up["amount"] == quoted["amount"]
    assert up["gateway"]["version"] == "starter" and up["gateway"]["expires"] == \
        expires.isoformat()
    status, headers = await _headers(gw, "gv-change")  # starter's 1,000: the plan's 500 now
    assert status == 200 and headers["RateLimit-Policy"].startswith('"qps";q=500;w=1,')
    told = await webhook.wait_for("gv-change", "gateway-upgraded")
    assert (told["previous"], told["version"], told["amount"]) == ("test", "starter",
                                                                    up["amount"])

    down = gw.cli("gateway", "change", "gv-change", "test")
    assert down.returncode == 0, down.stderr
    assert f"downgrade to test: {_money(exact, 'ROUND_UP')} CNY refunded" in down.stdout
    shown = gw.json("gateway", "show", "gv-change")["gateway"]
    assert (shown["version"], shown["expires"]) == ("test", expires.isoformat())
    told = await webhook.wait_for("gv-change", "gateway-downgraded")
    assert told["amount"] == _money(exact, "ROUND_UP")

    # Refused with the reason, nothing changed; the quote refuses what the change would.
    same = gw.cli("gateway", "change", "gv-change", "test")
    assert same.returncode != 0 and "has gateway version test already" in same.stderr
    unknown = gw.cli("gateway", "change", "gv-change", "platinum", "--quote")
    assert unknown.returncode != 0 and "unknown gateway version 'platinum'" in unknown.stderr
    gw.put_env("gv-change-late", yaml.safe_dump(
        {"plan": "standard", "anchor": days(-40), "expires": days(300),
         "gateway": _grant("starter", -40, 1)}))
    late = gw.cli("gateway", "change", "gv-change-late", "basic")
    assert late.returncode != 0 and "expired on" in late.stderr
    gw.put_env("gv-change-later", yaml.safe_dump(
        {"plan": "standard", "anchor": days(-3), "expires": days(300),
         "gateway": _grant("test", 5, 1)}))
    later = gw.cli("gateway", "change", "gv-change-later", "basic")
    assert later.returncode != 0 and "change it once it runs" in later.stderr
    gw.put_env("gv-change-owing", yaml.safe_dump(
        {"plan": "standard", "anchor": days(-3), "expires": days(300), "arrears": True,
         "gateway": _grant("test", -3, 1)}))
    for ask in (["--quote"], []):
        owing = gw.cli("gateway", "change", "gv-change-owing", "basic", *ask)
        assert owing.returncode != 0 and "in arrears" in owing.stderr, ask
    assert gw.json("gateway", "show", "gv-change-owing")["gateway"]["version"] == "test"
    file_owned = gw.cli("gateway", "change", "gv-active", "basic", "--quote")
    assert file_owned.returncode != 0 and "environments.yaml" in file_owned.stderr
    assert gw.json("gateway", "show", "gv-change")["gateway"] == shown


async def test_a_change_bills_the_renewal_due_at_the_old_version_and_keeps_the_term(
        gw: Deployed, webhook: Webhook) -> None:
    """starter for a month, renewing itself, renewed 4 to 7 days ago; changed to basic now:
    that renewal is told once, at starter's price; the term stays one month (the two months
    bought so far are not the term); the fee is for the two months' span."""
    start = today() - dt.timedelta(days=35)
    gw.put_env("gv-change-auto", yaml.safe_dump({
        "plan": "standard", "anchor": days(-40), "expires": days(300),
        "gateway": {"version": "starter", "purchased": start.isoformat(), "months": 1,
                    "auto_renew": True}}))
    changed = gw.json("gateway", "change", "gv-change-auto", "basic")
    grant = changed["gateway"]
    ends = add_months_clamped(start, 2)
    assert (grant["version"], grant["months"], grant["renew_months"], grant["expires"]) == \
        ("basic", 2, 1, ends.isoformat())
    difference = Decimal(VERSIONS["basic"]["price"]) - Decimal(VERSIONS["starter"]["price"])
    exact = difference * 2 * (ends - today()).days / (ends - start).days
    assert changed["amount"] == _money(exact, "ROUND_DOWN")
    await webhook.wait_for("gv-change-auto", "gateway-upgraded")
    await asyncio.sleep(1.0)  # scheduler rounds
    renewals = [e for e in webhook.events
                if e["env"] == "gv-change-auto" and e["type"] == "gateway-renewed"]
    assert [(e["version"], e["amount"], e["auto"]) for e in renewals] == \
        [("starter", "8999.00", "1")], renewals


async def test_a_renewal_due_is_billed_once_when_a_change_folds_it(gw: Deployed,
                                                                   webhook: Webhook) -> None:
    """An API-owned grant renewing itself, renewed 4 to 7 days ago, then renewed by hand at
    once: the automatic renewal is told once (by the change or the scheduler, whichever
    comes first), and the months count both."""
    bought = today() - dt.timedelta(days=35)
    gw.put_env("gv-fold", yaml.safe_dump({
        "plan": "standard", "anchor": days(-40), "expires": days(300),
        "gateway": {"version": "starter", "purchased": bought.isoformat(), "months": 1,
                    "auto_renew": True}}))
    renewed = gw.json("gateway", "renew", "gv-fold", "--months", "3")["gateway"]
    assert renewed["months"] == 1 + 1 + 3
    assert renewed["expires"] == add_months_clamped(bought, 5).isoformat()
    auto = await webhook.wait_for("gv-fold", "gateway-renewed")
    await asyncio.sleep(1.0)  # scheduler rounds
    told = [e for e in webhook.events if e["env"] == "gv-fold" and e["type"] == "gateway-renewed"]
    assert sorted(e["auto"] for e in told) == ["0", "1"], told
    auto = next(e for e in told if e["auto"] == "1")
    assert auto["expires"] == add_months_clamped(bought, 2).isoformat()
    assert auto["amount"] == "8999.00"


async def test_lifecycle_events_of_versions(gw: Deployed, webhook: Webhook) -> None:
    expired = await webhook.wait_for("gv-expired", "gateway-expired")
    ends = add_months_clamped(today() - dt.timedelta(days=40), 1)
    assert expired == {**expired, "version": "starter", "expired": ends.isoformat(),
                       "in_effect": "test"}
    ending = await webhook.wait_for("gv-ending", "gateway-expiring")
    assert ending["version"] == "basic"
    renewed = await webhook.wait_for("gv-auto", "gateway-renewed")
    bought = today() - dt.timedelta(days=35)
    assert renewed == {**renewed, "auto": "1", "months": "1", "amount": "8999.00",
                       "expires": add_months_clamped(bought, 2).isoformat()}
    await asyncio.sleep(1.0)  # more scheduler rounds: each event once
    # Once each: one event id per kind. A webhook is delivered at least once - a POST this
    # receiver answered late (its loop busy with the test's CLI calls) is sent again with the
    # same id, which a receiver drops (docs/operations.md).
    ids: dict[tuple[str, str, str | None], set[str]] = {}
    for e in webhook.events:
        if e["env"].startswith("gv-"):
            ids.setdefault((e["env"], e["type"], e.get("auto")), set()).add(e["event_id"])
    for key, seen in ids.items():
        assert len(seen) == 1, (key, seen)


def test_config_check_refuses_a_bad_grant(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "config"
    for name in ("gateway.yaml", "plans.yaml"):
        shutil.copy(root / name, tmp_path / name)

    def check(envs: dict[str, object]) -> set[tuple[str, str]]:
        (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))
        res = subprocess.run([sys.executable, "-m", "quotagate", "config", "check", "--json",
                              str(tmp_path / "gateway.yaml")], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 1, res.stdout
        return {(i["path"], i["reason"]) for i in json.loads(res.stdout)["issues"]}

    issues = check({"bad-one": _env(gateway={"version": "platinum", "purchased": days(0),
                                             "months": 1, "renew_months": 7})})
    assert issues == {
        ("$.environments.bad-one.gateway.version",
         f"unknown gateway version 'platinum' ({', '.join(VERSIONS)})"),
        ("$.environments.bad-one.gateway.renew_months",
         "7 is not a term sold (1, 2, 3, 4, 5, 6, 12, 24, 36, 48)")}
    issues = check({"bad-two": _env(gateway={"version": "test", "purchased": days(0),
                                             "months": 0})})
    assert issues == {("$.environments.bad-two.gateway.months", "Expected `int` >= 1")}


async def test_declared_rates_are_worked_out_again_only_when_a_version_starts_or_ends(
        make_gateway, monkeypatch):
    """The rates the file's versions declare are worked out once and hold until the next
    midnight a version starts or ends: the clock's follower (every 30 s in every process)
    does not walk the versioned environments again before that (10^5: ~2 s on the loop)."""
    from quotagate.billing import versions
    from quotagate.gateway.app import STATE
    from quotagate.settings.schema import BYTES_PER_MBPS
    from tests.helpers import at, env, local

    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({
        "ends": {**env(), "gateway": {"version": "starter", "purchased": "2026-10-05",
                                      "months": 2}},  # to 2026-12-05
        "later": {**env(), "gateway": {"version": "basic", "purchased": "2026-12-10",
                                       "months": 1}},
        "renews": {**env(), "gateway": {"version": "basic", "purchased": "2026-10-01",
                                        "months": 1, "auto_renew": True}}}, clock=clock)
    rt = gw.app[STATE].runtime
    rates = rt.limiter.bandwidth.rates
    lowest = 1 * BYTES_PER_MBPS  # ("test", the lowest version's 1 Mbps, once one ends)
    assert (rates["ends"], rates["renews"], "later" in rates) == (
        20 * BYTES_PER_MBPS, 100 * BYTES_PER_MBPS, False)
    assert rt._rates_between[1] == int(local("2026-12-05T00:00:00").timestamp() * 1000)
    calls = 0
    status = versions.status

    def counted(*args, **kw):
        nonlocal calls
        calls += 1
        return status(*args, **kw)

    monkeypatch.setattr(versions, "status", counted)
    clock.set(local("2026-12-04T23:59:00"))
    assert not rt._rates_changed()  # (the follower asks this, and stops there)
    clock.set(local("2026-12-05T00:00:00"))
    assert rt._rates_changed()
    await rt._declared_bandwidth(rt.config)
    assert calls == 3 and rates["ends"] == lowest and "later" not in rates
    assert rt._rates_between[1] == int(local("2026-12-10T00:00:00").timestamp() * 1000)
    clock.set(local("2026-12-10T00:00:00"))
    await rt._declared_bandwidth(rt.config)
    assert rates["later"] == 100 * BYTES_PER_MBPS and rates["renews"] == 100 * BYTES_PER_MBPS
    assert rt._rates_between[1] == int(local("2027-01-10T00:00:00").timestamp() * 1000)
    clock.set(local("2026-12-01T00:00:00"))  # the store's clock stepped back
    assert rt._rates_changed()
