"""Every feature with a date in it, through ``quotagate serve`` as shipped on the real clock
(tests/deployed.py): packs, promos, plan prices, ingestion, usage reports, bills, lifecycle
events and renewal. Run this tier alone with ``scripts/test -m deployed``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import pytest
import yaml

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

#: Two plans priced as SPEC §11's seed examples (100 and 1,000 CNY a month).
SEED_PLANS = {"p100": "100", "p1000": "1000"}


@pytest.fixture(scope="module")
async def webhook() -> AsyncIterator[Webhook]:
    hook = await Webhook().start()
    yield hook
    assert hook.runner is not None
    await hook.runner.cleanup()


@pytest.fixture(scope="module")
async def deployed(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook
                   ) -> AsyncIterator[Deployed]:
    hold_the_day()  # every date of this module is laid out from one today
    upstream, origin = start_upstream()
    directory = tmp_path_factory.mktemp("deployed")
    gateway = shipped_config(directory, origin, lifecycle_interval_ms=300,
                             events={"webhook_url": f"http://127.0.0.1:{webhook.port}/events",
                                     "webhook_retry_ms": 50})
    plans = yaml.safe_load((directory / "plans.yaml").read_text())
    for name, price in SEED_PLANS.items():
        plans["plans"][name] = {**plans["plans"]["standard"], "price": price}
    (directory / "plans.yaml").write_text(yaml.safe_dump(plans, sort_keys=False))
    # The shipped environments.yaml has dates of its own: the file-owned ones here are laid
    # around today (the rest are created through the CLI and the admin API).
    (directory / "environments.yaml").write_text(f"""environments:
  lapsed:        # its plan expired yesterday
    plan: standard
    anchor: {days(-60)}
    expires: {days(-1)}
  gone:          # expired 16 days ago: released today
    plan: standard
    anchor: {days(-90)}
    expires: {days(-16)}
  ending:        # expires in 5 days: reminded
    plan: standard
    anchor: {days(-60)}
    expires: {days(5)}
""")
    served = await serve(directory, gateway)
    try:
        yield served
    finally:
        served.stop()
        upstream.terminate()
        upstream.wait(10)


def env_yaml(plan: str = "personal", anchor: int = 0, expires: int = 365, **extra: str) -> str:
    """An environment as an operator writes it: unquoted dates, block style."""
    lines = [f"plan: {plan}", f"anchor: {days(anchor)}", f"expires: {days(expires)}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


async def test_a_pack_bought_today_is_dated_today_and_used_first(deployed: Deployed):
    deployed.put_env("packs", env_yaml(limits="{calls: 3}"))
    assert "pack p1 bought" in deployed.ok("pack", "buy", "packs", "calls-10m", "--id", "p1")
    [pack] = deployed.json("pack", "list", "packs")["packs"]
    assert pack["purchased"] == today().isoformat() and pack["valid"]
    assert pack["expires"] == days(30)

    functions = deployed.route("function")
    assert await deployed.get(functions + "hello", "packs", 7) == [200] * 7
    usage = deployed.json("env", "usage", "packs")
    assert usage["today"] == today().isoformat()
    assert usage["cycle"]["start"] == today().isoformat()  # bought today: the anchor
    calls = usage["meters"]["calls"]
    assert calls["used"] == 3 and calls["payg"] == 0  # the plan's 3, then the pack
    assert [(p["id"], p["used"], p["remaining"]) for p in calls["packs"]] == [
        ("p1", 4, 10_000_000 - 4)]
    bill = deployed.json("bill", "--date", today().isoformat())
    assert not [line for line in bill["lines"] if line["env"] == "packs"]  # nothing to pay

    refused = deployed.cli("pack", "refund", "packs", "p1")
    assert refused.returncode == 1 and "has been used" in refused.stderr
    deployed.ok("pack", "buy", "packs", "calls-10m", "--id", "p2")
    assert "pack p2 refunded" in deployed.ok("pack", "refund", "packs", "p2")


async def test_the_usage_report_counts_each_day_of_the_cycle(deployed: Deployed):
    """Bought three days ago, used today only: the report's days are the cycle's four so far
    on the real clock, today's holding today's calls (plan, then pay-as-you-go beyond it) and
    ingested tokens, the others none."""
    deployed.put_env("daily", env_yaml(anchor=-3, overage="true", limits="{calls: 3}"))
    assert await deployed.get(deployed.route("function") + "hello", "daily", 5) == [200] * 5
    status, body = await deployed.admin_api("POST", "/usage", {"records": [
        {"id": "tok-1", "env": "daily", "meter": "ai_tokens", "amount": 777,
         "at": dt.datetime.now(dt.UTC).isoformat()}]})
    assert status == 200 and body["counted"] == 1, body
    meters = deployed.json("env", "usage", "daily")["meters"]
    expected = [{"date": days(n), "used": 0} for n in (-3, -2, -1)]
    assert meters["calls"]["days"] == [*expected, {"date": days(0), "used": 5}]
    assert (meters["calls"]["used"], meters["calls"]["payg"]) == (3, 2)
    assert meters["ai_tokens"]["days"] == [*expected, {"date": days(0), "used": 777}]
    assert "days" not in meters["capacity_bytes"]


async def test_a_pack_bought_20_days_ago_cannot_be_refunded(deployed: Deployed):
    deployed.put_env("oldpack", env_yaml(
        anchor=-40, packs=f"[{{id: old, pack: calls-10m, purchased: {days(-20)}}}]"))
    refused = deployed.cli("pack", "refund", "oldpack", "old")
    assert refused.returncode == 1 and "within 7 days" in refused.stderr


async def test_a_promo_bought_today_raises_qps_today(deployed: Deployed):
    deployed.put_env("sale", env_yaml(plan="standard", limits="{qps: 5}"))
    url = deployed.route("function") + "f"
    before = await deployed.get(url, "sale", 40, concurrent=True)
    assert before.count(429) >= 30, before  # 5 per second (and a 100 ms burst)

    out = deployed.ok("promo", "buy", "sale", "db-3k", "--days", "1")
    assert f"from {today().isoformat()}" in out, out
    assert "QPS 10000" in deployed.ok("env", "usage", "sale")
    after = await deployed.get(url, "sale", 40, concurrent=True)
    assert after == [200] * 40

    past = deployed.cli("promo", "buy", "sale", "db-3k", "--start", days(-1))
    assert past.returncode == 1 and "before today" in past.stderr


async def test_plan_prices_reproduce_the_seed_examples(deployed: Deployed):
    # SPEC §11: 48 days until expiry; the downgrade's period started 44 days ago (day 45 of
    # 93 counting both ends) and 3,000 were paid for it.
    deployed.put_env("upg", env_yaml(plan="p100", anchor=-10, expires=48))
    quote = deployed.json("plan", "quote", "upg", "p1000")
    assert (quote["change"], quote["amount"], quote["days_left"]) == ("upgrade", "1420.27", 48)
    deployed.put_env("dwn", env_yaml(plan="p1000", anchor=-44, expires=48, paid='"3000"',
                                     period_start=days(-44)))
    quote = deployed.json("plan", "quote", "dwn", "p100")
    assert (quote["change"], quote["amount"]) == ("downgrade", "1390.59")
    assert (quote["parts"]["used_days"], quote["parts"]["total_days"]) == ("45", "93")

    changed = deployed.json("plan", "change", "upg", "p1000")
    assert changed["amount"] == "1420.27"
    definition = deployed.json("env", "show", "upg")["definition"]
    assert definition["plan"] == "p1000"
    assert Decimal(definition["paid"]) == Decimal(100) * 2 + Decimal("1420.27")


async def test_ingestion_at_a_time_is_counted_once_and_billed_that_day(deployed: Deployed):
    deployed.put_env("ingest", env_yaml(overage="true", limits="{outbound_gb: 0, ai_tokens: 0}"))
    an_hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    if dt.datetime.fromisoformat(an_hour_ago).astimezone(
            dt.timezone(dt.timedelta(hours=8))).date() != today():
        an_hour_ago = dt.datetime.now(dt.UTC).isoformat()  # today began less than an hour ago
    batch = {"records": [
        {"id": "out-1", "env": "ingest", "meter": "outbound_bytes", "amount": 2 * 2**30,
         "at": an_hour_ago},
        {"id": "ai-1", "env": "ingest", "meter": "ai_tokens", "amount": 5_000,
         "at": an_hour_ago}]}
    status, body = await deployed.admin_api("POST", "/usage", batch)
    assert status == 200 and body["counted"] == 2, body
    status, body = await deployed.admin_api("POST", "/usage", batch)  # a retried batch
    assert status == 200 and (body["counted"], body["duplicates"]) == (0, 2), body

    meters = deployed.json("env", "usage", "ingest")["meters"]
    assert meters["outbound_bytes"]["payg"] == 2 * 2**30
    assert meters["ai_tokens"]["payg"] == 5_000
    lines = {line["meter"]: line for line in
             deployed.json("bill", "--date", today().isoformat())["lines"]
             if line["env"] == "ingest"}
    assert lines["outbound_bytes"]["amount"] == "1.60"  # 2 GB x 0.8
    assert lines["ai_tokens"]["amount"] == "0.04"  # 5,000 tokens x 0.008 / 1,000

    for at, reason in ((days(1) + "T12:00:00+08:00", "in the future"),
                       (days(-31) + "T12:00:00+08:00", "older than 30 days")):
        record = {"id": f"late-{len(reason)}", "env": "ingest", "meter": "outbound_bytes",
                  "amount": 1, "at": at}
        status, body = await deployed.admin_api("POST", "/usage", {"records": [record]})
        assert status == 422 and reason in body["issues"][0]["reason"], body


async def test_lifecycle_events_and_refusals_on_the_real_clock(deployed: Deployed,
                                                               webhook: Webhook):
    url = deployed.route("function") + "f"
    isolated = await webhook.wait_for("lapsed", "environment-isolated")
    assert isolated["expired"] == days(-1)
    assert await deployed.get(url, "lapsed") == [403]
    released = await webhook.wait_for("gone", "environment-released")
    assert released["released"] == days(-1)
    assert await deployed.get(url, "gone") == [404]
    reminder = await webhook.wait_for("ending", "plan-expiring")
    assert reminder["days_left"] == "5"
    assert await deployed.get(url, "ending") == [200]


async def test_renewal_counts_from_the_original_expiry_and_not_once_released(
        deployed: Deployed, webhook: Webhook):
    deployed.put_env("renew", env_yaml(plan="standard", anchor=-40, expires=-3))
    url = deployed.route("function") + "f"
    assert await deployed.get(url, "renew") == [403]  # isolated since 3 days ago
    deployed.ok("plan", "renew", "renew", "--months", "1")
    expires = dt.date.fromisoformat(deployed.json("env", "show", "renew")["definition"]
                                    ["expires"])
    lapsed = today() - dt.timedelta(days=3)
    assert expires > lapsed and 28 <= (expires - lapsed).days <= 31  # a month from then
    assert await deployed.get(url, "renew") == [200]

    deployed.put_env("late", env_yaml(plan="standard", anchor=-90, expires=-16))
    # Released at 00:00 today (day 16): refused however far the scheduler has got — before
    # its round as released (409), after it as gone (404: the state is deleted).
    refused = deployed.cli("plan", "renew", "late", "--months", "1")
    assert refused.returncode == 1, refused
    assert "was released" in refused.stderr or "no environment late" in refused.stderr
    await webhook.wait_for("late", "environment-released")
    refused = deployed.cli("plan", "renew", "late", "--months", "1")
    assert refused.returncode == 1 and "(404)" in refused.stderr, refused.stderr
    assert await deployed.get(url, "late") == [404]


async def test_a_released_environments_tenant_token_stops_working(deployed: Deployed,
                                                                 webhook: Webhook):
    """An environment token made with the CLI reads its environment until the environment
    is released on the real clock; then it is refused, also once the same id is made again
    (another tenant's), and the token listing shows no token of it."""
    deployed.put_env("tenancy", env_yaml(plan="standard"))
    made = deployed.json("token", "create", "tenancy owner", "--role", "env",
                         "--env", "tenancy")
    assert made["role"] == "env" and made["env"] == "tenancy"

    async def reads(path: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{deployed.admin}/admin/v1{path}",
                headers={"Authorization": f"Bearer {made['token']}"}) as r:
            await r.read()
            return r.status

    assert await reads("/envs/tenancy/usage") == 200
    assert await reads("/me") == 200
    # Lapsed 16 days ago: the next lifecycle round releases it and revokes its token.
    deployed.put_env("tenancy", env_yaml(plan="standard", anchor=-90, expires=-16))
    await webhook.wait_for("tenancy", "environment-released")
    assert await reads("/me") == 401
    deployed.put_env("tenancy", env_yaml(plan="standard"))  # the id, made again
    assert await reads("/envs/tenancy/usage") == 401
    listed = deployed.json("token", "list")["tokens"]
    assert made["id"] not in [t["id"] for t in listed]
    assert f"environment tokens {made['id']} are revoked" in deployed.log_text()
    # The audit trail has the token's creation and its revocation, found by the environment.
    trail = deployed.cli("audit", "--env", "tenancy", "--json")
    rows = [json.loads(line) for line in trail.stdout.splitlines()]
    assert [(r["action"], r["actor"]) for r in rows if "token" in r["action"]] == [
        ("revoke_token", "lifecycle"), ("create_token", "admin-token")]
    [revoked] = [r for r in rows if r["action"] == "revoke_token"]
    assert f"token {made['id']} (tenancy owner) revoked" in revoked["body"]


async def test_rate_limit_headers_count_to_the_real_reset(deployed: Deployed):
    deployed.put_env("hdr", env_yaml(plan="standard"))
    async with aiohttp.ClientSession() as s, s.get(
            deployed.route("function") + "f", headers={"X-CloudBase-Env": "hdr"}) as r:
        assert r.status == 200
        header = r.headers["RateLimit"]
    calls = next(part for part in header.split(",") if '"calls"' in part)
    reset_s = int(calls.split(";t=")[1].split(";")[0])
    # Anchored today: the cycle resets at 00:00 on this day next month (+08:00).
    first = today()
    year, month = (first.year + (first.month == 12), first.month % 12 + 1)
    day = min(first.day, (dt.date(year + (month == 12), month % 12 + 1, 1)
                          - dt.timedelta(days=1)).day)
    reset = dt.datetime.combine(dt.date(year, month, day), dt.time(),
                                dt.timezone(dt.timedelta(hours=8)))
    expected = (reset - dt.datetime.now(dt.UTC)).total_seconds()
    assert abs(reset_s - expected) < 5, (header, expected)



async def test_alerts_and_pack_reminders_on_the_real_clock(deployed: Deployed,
                                                           webhook: Webhook):
    deployed.put_env("alerts", env_yaml(anchor=-3, limits="{calls: 10}"))
    url = deployed.route("function") + "f"
    assert await deployed.get(url, "alerts", 8) == [200] * 8
    alert = await webhook.wait_for("alerts", "quota-alert")
    cycle_start = today() - dt.timedelta(days=3)  # anchored 3 days ago: this cycle's start
    assert (alert["meter"], alert["level"], alert["used"]) == ("calls", "80", "8")
    assert int(alert["cycle_day"]) == (cycle_start - dt.date(1970, 1, 1)).days

    deployed.put_env("packdue", env_yaml(
        anchor=-40, limits="{calls: 1}",
        packs=f"[{{id: due, pack: calls-10m, purchased: {days(-25)}}}, "
              f"{{id: tiny, meter: calls, amount: 2, purchased: {days(0)}}}]"))
    expiring = await webhook.wait_for("packdue", "pack-expiring")
    assert expiring["pack_id"] == "due"
    # The plan's one call, then the pack that expires first ("due", in 5 days), not "tiny".
    assert await deployed.get(url, "packdue", 3) == [200] * 3
    packs = {p["id"]: p["used"] for p in
             deployed.json("env", "usage", "packdue")["meters"]["calls"]["packs"]}
    assert packs == {"due": 2, "tiny": 0}

    # The request whose take spends a pack writes pack-used-up (the scripts', not a round).
    deployed.put_env("spent", env_yaml(
        anchor=-3, limits="{calls: 1}",
        packs=f"[{{id: small, meter: calls, amount: 2, purchased: {days(0)}}}]"))
    assert await deployed.get(url, "spent", 3) == [200] * 3
    spent = await webhook.wait_for("spent", "pack-used-up")
    assert spent["pack_id"] == "small"


async def test_an_invocation_queued_while_isolated_runs_once_renewed(deployed: Deployed):
    deployed.put_env("asleep", env_yaml(plan="standard", anchor=-40, expires=-2))
    async with aiohttp.ClientSession() as s, s.post(
            deployed.route("function") + "job", data=b'{"n": 1}',
            headers={"X-CloudBase-Env": "asleep", "X-Invocation-Type": "Event"}) as r:
        assert r.status == 202 and (await r.json())["queued"] is True
    assert deployed.json("env", "usage", "asleep")["meters"]["calls"]["used"] == 0
    deployed.ok("plan", "renew", "asleep", "--months", "1")
    deadline = asyncio.get_running_loop().time() + 15
    while deployed.json("env", "usage", "asleep")["meters"]["calls"]["used"] != 1:
        assert asyncio.get_running_loop().time() < deadline, "the queued invocation never ran"
        await asyncio.sleep(0.2)
