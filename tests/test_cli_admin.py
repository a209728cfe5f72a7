"""The operator CLI against a real `quotagate serve` (real clock, real Valkey): every command
once, as a person (tables) and as a script (--json, csv)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import json
import os
import signal
import subprocess
import time
import zoneinfo
from pathlib import Path

import pytest
import yaml

from quotagate.limiter.embedded import free_port, free_ports
from tests.deployed import hold_the_day
from tests.helpers import PLANS, QUOTAGATE, statuses, wait_ready

TOKEN = "cli-token"


def cli(admin: int, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QUOTAGATE, *args, "--admin", f"http://127.0.0.1:{admin}",
                           "--token", token], capture_output=True, text=True, timeout=30)


def make_token(admin: int, name: str, role: str, *args: str) -> dict:
    """``quotagate token create`` (with the operator's token): the API's answer."""
    out = cli(admin, "token", "create", name, "--role", role, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stage_gateway(directory: Path, store_url: str, upstream_port: int) -> tuple[int, int]:
    """gateway.yaml for `quotagate serve` on free ports (public, admin), which it returns."""
    port, admin = free_ports(2)
    (directory / "gateway.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}",
        "store": {"url": store_url}, "plans_file": str(PLANS),
        "routes": [{"prefix": "/functions/", "kind": "function",
                    "upstream": f"http://127.0.0.1:{upstream_port}"}]}))
    return port, admin


@pytest.mark.deployed
async def test_operator_commands(tmp_path: Path, valkey_url: str, upstream):
    port, admin = stage_gateway(tmp_path, valkey_url, upstream.port)
    hold_the_day()  # anchored on the 1st: the whole test on one date
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        "filed": {"plan": "standard", "anchor": today.replace(day=1).isoformat(),
                  "expires": (today + dt.timedelta(days=300)).isoformat()}}}))
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        await wait_ready(admin, proc)
        anchor = today.replace(day=1)
        definition = tmp_path / "shop.yaml"
        definition.write_text(yaml.safe_dump({
            "plan": "personal", "anchor": anchor.isoformat(),
            "expires": (anchor + dt.timedelta(days=400)).isoformat(),
            "limits": {"calls": 2}}))
        out = cli(admin, "env", "put", "shop", str(definition))
        assert out.returncode == 0 and "shop: written (owned by api)" in out.stdout, out.stderr
        out = cli(admin, "env", "list")
        assert out.returncode == 0
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["env", "owner", "plan", "expires", "overage"]
        assert any(line.split()[:3] == ["filed", "file", "standard"] for line in lines)
        assert any(line.split()[:3] == ["shop", "api", "personal"] for line in lines)

        refused = cli(admin, "env", "overage", "filed", "on")
        assert refused.returncode == 1 and "owned by environments.yaml" in refused.stderr
        assert cli(admin, "env", "list", token="wrong").returncode == 1
        unreachable = subprocess.run([*QUOTAGATE, "env", "list", "--admin",
                                      f"http://127.0.0.1:{free_port()}", "--token", TOKEN],
                                     capture_output=True, text=True, timeout=30)
        assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
        # Output into a pipe nobody reads (`| head -0`): not the admin API's fault, and no
        # traceback either; 141 like any command killed by SIGPIPE.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            closed = subprocess.run([*QUOTAGATE, "env", "list", "--admin",
                                     f"http://127.0.0.1:{admin}", "--token", TOKEN],
                                    stdout=write_end, stderr=subprocess.PIPE, text=True,
                                    timeout=30)
        finally:
            os.close(write_end)
        assert (closed.returncode, closed.stderr) == (141, "")

        url = f"http://127.0.0.1:{port}/functions/f"
        assert await statuses(url, "shop", 3) == [200, 200, 429]
        assert "shop: overage on" in cli(admin, "env", "overage", "shop", "on").stdout
        assert await statuses(url, "shop", 2) == [200, 200]  # past the quota: pay-as-you-go
        out = cli(admin, "pack", "buy", "shop", "calls-10m", "--id", "p1")
        assert out.returncode == 0 and "pack p1 bought" in out.stdout
        packs = json.loads(cli(admin, "pack", "list", "shop", "--json").stdout)["packs"]
        assert [(p["id"], p["remaining"]) for p in packs] == [("p1", 10_000_000)]
        out = cli(admin, "promo", "buy", "shop", "db-3k", "--days", "2")
        assert out.returncode == 0 and "promo db-3k from" in out.stdout
        usage = cli(admin, "env", "usage", "shop")
        assert "QPS 10000" in usage.stdout and "calls" in usage.stdout
        quote = json.loads(cli(admin, "plan", "quote", "shop", "standard", "--json").stdout)
        assert quote["change"] == "upgrade" and quote["plan"] == "standard"
        out = cli(admin, "plan", "change", "shop", "standard")
        assert out.returncode == 0 and "upgrade to standard" in out.stdout
        out = cli(admin, "plan", "renew", "shop", "--months", "2")
        assert out.returncode == 0 and "shop: renewed, expires" in out.stdout
        out = cli(admin, "pack", "refund", "shop", "p1")
        assert out.returncode == 0 and "pack p1 refunded" in out.stdout

        day = today.isoformat()
        table = cli(admin, "bill", "--date", day)
        assert table.returncode == 0 and "total " in table.stdout
        rows = list(csv.DictReader(io.StringIO(cli(admin, "bill", "--date", day, "--format",
                                                   "csv").stdout)))
        as_json = json.loads(cli(admin, "bill", "--date", day, "--json").stdout)
        assert rows == [{k: str(v) for k, v in line.items()} for line in as_json["lines"]]
        calls = [r for r in rows if r["env"] == "shop" and r["meter"] == "calls"]
        assert [c["quantity"] for c in calls] == ["2"] and calls[0]["amount"] == "0.00"
        for args in (["env"], ["env", "usage"], ["pack", "buy"], ["bill"]):
            assert subprocess.run([*QUOTAGATE, *args], capture_output=True,
                                  timeout=30).returncode == 2  # usage errors
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def ndjson_line(env_id: str, anchor: dt.date, calls: int, plan: str = "personal") -> str:
    return json.dumps({"id": env_id, "environment": {
        "plan": plan, "anchor": anchor.isoformat(),
        "expires": (anchor + dt.timedelta(days=400)).isoformat(), "limits": {"calls": calls}}})


@pytest.mark.deployed
async def test_bulk_import_resumes_and_export_reads_back(tmp_path: Path, valkey_url: str,
                                                         upstream):
    """`env import` through `quotagate serve`: a refused batch stops the import with the
    file's line numbers and the lines before it imported; fixed, `--resume` goes on from
    there; `env export` writes what imports back unchanged."""
    port, admin = stage_gateway(tmp_path, valkey_url, upstream.port)
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        "filed": {"plan": "standard", "anchor": anchor.isoformat(),
                  "expires": (today + dt.timedelta(days=300)).isoformat()}}}))
    lines = [ndjson_line(f"imp-{i:05d}", anchor, 100 + i) for i in range(1, 2501)]
    lines[1799] = ndjson_line("imp-01800", anchor, 1, plan="gold")  # file line 1800: refused
    lines.insert(900, "")  # a blank line (file line 901) is skipped, and counted
    source = tmp_path / "envs.ndjson"
    source.write_text("\n".join(lines))  # (no newline after the last line)
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        await wait_ready(admin, proc)
        out = cli(admin, "env", "import", str(source), "--batch", "1000")
        assert out.returncode == 1, out.stderr
        assert "lines 1001-2000" in out.stderr and "line 1801 (imp-01800)" in out.stderr
        assert "gold" in out.stderr and "--resume" in out.stderr
        state = json.loads((tmp_path / "envs.ndjson.import-state").read_text())
        assert state["lines"] == 1000 and state["created"] == 999
        listed = cli(admin, "env", "list", "--owner", "api", "--json")
        assert len(listed.stdout.splitlines()) == 999  # the first batch, nothing of the second

        # Fixed after the lines imported: --resume goes on from line 1001.
        text = source.read_text().replace('"plan": "gold"', '"plan": "personal"')
        source.write_text(text)
        out = cli(admin, "env", "import", str(source), "--batch", "1000", "--resume", "--json")
        assert out.returncode == 0, out.stderr
        assert "resuming after line 1000" in out.stderr
        assert json.loads(out.stdout) == {"received": 2500, "created": 2500, "updated": 0,
                                          "unchanged": 0}
        assert not (tmp_path / "envs.ndjson.import-state").exists()
        ok = await statuses(f"http://127.0.0.1:{port}/functions/hello", "imp-02500", 1)
        assert ok == [200]

        # A change before the lines imported: --resume refuses (the progress is not this file's).
        _save = source.read_text()
        cli(admin, "env", "import", str(source), "--batch", "2000")  # (all unchanged)
        broken = tmp_path / "broken.ndjson"
        broken.write_text(_save.replace("imp-02100", "Bad_Id"))
        assert cli(admin, "env", "import", str(broken), "--batch", "2000").returncode == 1
        broken.write_text(_save.replace("imp-00001", "imp-99999"))
        out = cli(admin, "env", "import", str(broken), "--resume")
        assert out.returncode == 1 and "are not those imported" in out.stderr

        exported = tmp_path / "export.ndjson"
        out = cli(admin, "env", "export", "--owner", "api", "--output", str(exported))
        assert out.returncode == 0, out.stderr
        rows = [json.loads(x) for x in exported.read_text().splitlines()]
        assert [r["id"] for r in rows] == [f"imp-{i:05d}" for i in range(1, 2501)]
        assert rows[41]["environment"]["limits"]["calls"] == 142
        out = cli(admin, "env", "import", str(exported), "--json")
        assert json.loads(out.stdout)["unchanged"] == 2500, out.stderr
        refused = cli(admin, "env", "export", "--output", str(exported), token="wrong")
        assert refused.returncode == 1
        assert len(exported.read_text().splitlines()) == 2500  # left as it was
        everything = cli(admin, "env", "export")
        assert [json.loads(x)["id"] for x in everything.stdout.splitlines()][-1] == "imp-02500"
        assert "filed" in everything.stdout
        assert cli(admin, "env", "import", str(tmp_path / "missing.ndjson")).returncode == 1

        # Ctrl-C midway: it says which lines are in, and --resume goes on from there.
        many = tmp_path / "many.ndjson"
        many.write_text("".join(ndjson_line(f"int-{i:05d}", anchor, 1) + "\n"
                                for i in range(6000)))
        state = tmp_path / "many.ndjson.import-state"
        # (SIGINT's default restored in the child: a suite run in the background, as CI may
        # run it, has it ignored, and the child would inherit that.)
        running = subprocess.Popen(
            [*QUOTAGATE, "env", "import", str(many), "--batch", "10", "--admin",
             f"http://127.0.0.1:{admin}", "--token", TOKEN],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while not state.exists() and running.poll() is None:
            await asyncio.sleep(0.005)
        running.send_signal(signal.SIGINT)
        _, stopped = running.communicate(timeout=30)
        assert running.returncode == 130, stopped
        assert "interrupted" in stopped and "--resume" in stopped
        out = cli(admin, "env", "import", str(many), "--resume", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["received"] == 6000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.mark.deployed
async def test_scoped_tokens_through_the_cli(tmp_path: Path, valkey_url: str, upstream):
    """`quotagate token` against `quotagate serve` (real clock): a viewer reads and is
    refused a purchase (403, nothing bought), a billing token buys, an environment token
    reads its own environment only; rotated and revoked tokens stop at once; the listing
    never shows a secret, and a token's time is the store's (today's) clock."""
    _, admin = stage_gateway(tmp_path, valkey_url, upstream.port)
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        name: {"plan": "standard", "anchor": anchor.isoformat(),
               "expires": (anchor + dt.timedelta(days=400)).isoformat()}
        for name in ("mall",)}}))
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        await wait_ready(admin, proc)
        definition = tmp_path / "shop.yaml"  # owned by the API: it can buy packs
        definition.write_text(yaml.safe_dump({
            "plan": "personal", "anchor": anchor.isoformat(),
            "expires": (anchor + dt.timedelta(days=400)).isoformat()}))
        assert cli(admin, "env", "put", "shop", str(definition)).returncode == 0

        viewer = make_token(admin, "support desk", "viewer")
        billing = make_token(admin, "billing team", "billing")
        tenant = make_token(admin, "shop's owner", "env", "--env", "shop")
        now_ms = int(time.time() * 1000)  # (the machine's clock: the store's is the same)
        assert abs(viewer["created_ms"] - now_ms) < 600_000

        assert cli(admin, "env", "list", token=viewer["token"]).returncode == 0
        refused = cli(admin, "pack", "buy", "shop", "calls-10m", token=viewer["token"])
        assert refused.returncode == 1 and "refused (403)" in refused.stderr
        assert "needs money" in refused.stderr
        packs = json.loads(cli(admin, "pack", "list", "shop", "--json").stdout)["packs"]
        assert packs == []
        out = cli(admin, "pack", "buy", "shop", "calls-10m", "--id", "p1",
                  token=billing["token"])
        assert out.returncode == 0 and "pack p1 bought" in out.stdout

        out = cli(admin, "whoami", token=tenant["token"])
        assert out.returncode == 0 and "env of shop" in out.stdout
        assert cli(admin, "env", "usage", "shop", token=tenant["token"]).returncode == 0
        other = cli(admin, "env", "usage", "mall", token=tenant["token"])
        assert other.returncode == 1 and "refused (403)" in other.stderr

        listed = cli(admin, "token", "list")
        assert listed.returncode == 0
        assert {"support", "billing", "shop's"} <= {line.split()[1] for line in
                                                      listed.stdout.splitlines()[2:]}
        assert not any(t["token"] in listed.stdout for t in (viewer, billing, tenant))
        assert cli(admin, "token", "list", token=billing["token"]).returncode == 1

        pasted = cli(admin, "token", "revoke", viewer["token"])  # the token, not its id
        assert pasted.returncode == 1 and "8 hex digits" in pasted.stderr
        rotated = json.loads(cli(admin, "token", "rotate", viewer["id"], "--json").stdout)
        assert cli(admin, "env", "list", token=viewer["token"]).returncode == 1
        assert cli(admin, "env", "list", token=rotated["token"]).returncode == 0
        out = cli(admin, "token", "revoke", viewer["id"])
        assert out.returncode == 0 and f"revoked {viewer['id']}" in out.stdout
        gone = cli(admin, "env", "list", token=rotated["token"])
        assert gone.returncode == 1 and "refused (401)" in gone.stderr

        # The audit trail: who did what to shop, refused or not, on the store's clock.
        out = cli(admin, "audit", "--env", "shop", "--json")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["action"], r["actor"], r["status"]) for r in rows] == [
            ("buy_pack", billing["id"], 201), ("buy_pack", viewer["id"], 403),
            ("create_token", "admin-token", 201),  # (the tenant's: shop in its body)
            ("put_env", "admin-token", 200)]
        assert all(abs(r["at_ms"] - now_ms) < 600_000 for r in rows)
        out = cli(admin, "audit", "--by", viewer["id"])  # what the viewer's token did
        assert out.returncode == 0 and out.stdout.count("\n") == 3  # head, rule, one row
        assert "buy_pack" in out.stdout and "403" in out.stdout
        out = cli(admin, "audit", "--action", "revoke_token", "--json")
        assert [json.loads(line)["path"] for line in out.stdout.splitlines()] == [
            f"/admin/v1/tokens/{viewer['id']}"]
        assert cli(admin, "audit", token=tenant["token"]).returncode == 1  # not a tenant's

        # A reload that changes gateway.yaml only is recorded too, naming the file.
        gateway = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
        assert gateway.get("on_store_failure", "open") == "open"
        gateway["on_store_failure"] = "closed"
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(gateway))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        reloads: list[dict] = []
        while not reloads and time.monotonic() < deadline:
            out = cli(admin, "audit", "--action", "config_reload", "--json")
            reloads = [r for r in map(json.loads, out.stdout.splitlines())
                       if "gateway.yaml changed" in r["body"]]
            await asyncio.sleep(0.1)
        [reload] = reloads
        assert reload["actor"] == "config" and reload["envs_count"] == 0
        assert reload["body"].startswith("SIGHUP; gateway.yaml changed;"), reload
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@pytest.mark.deployed
async def test_tokens_declared_in_a_file(tmp_path: Path, valkey_url: str, upstream):
    """``tokens_file`` (a Kubernetes Secret's tokens.yaml) against `quotagate serve`: a
    viewer given as its token and an environment token given as id and SHA-256 both work with
    their roles; the listing shows them as the file's (never a secret); the API will not
    rotate or revoke them (409); a token taken out of the file stops at the next reload, which
    the audit names; a broken file is refused and the last good tokens stay."""
    _, admin = stage_gateway(tmp_path, valkey_url, upstream.port)
    anchor = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date().replace(day=1)
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        name: {"plan": "standard", "anchor": anchor.isoformat(),
               "expires": (anchor + dt.timedelta(days=400)).isoformat()}
        for name in ("shop", "mall")}}))
    viewer, tenant = "qg_5eed0001_" + "v" * 43, "qg_5eed0002_" + "t" * 43
    tokens = [{"name": "support desk", "role": "viewer", "token": viewer},
              {"name": "shop's owner", "role": "env", "env": "shop", "id": "5eed0002",
               "sha256": hashlib.sha256(tenant.encode()).hexdigest()}]
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump({"tokens": tokens}))
    gateway = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
    gateway["tokens_file"] = "tokens.yaml"
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(tmp_path / "gateway.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    try:
        await wait_ready(admin, proc)
        out = cli(admin, "whoami", token=viewer)
        assert out.returncode == 0 and "support desk" in out.stdout and "viewer" in out.stdout
        refused = cli(admin, "pack", "buy", "shop", "calls-10m", token=viewer)
        assert refused.returncode == 1 and "refused (403)" in refused.stderr
        assert cli(admin, "env", "usage", "shop", token=tenant).returncode == 0
        other = cli(admin, "env", "usage", "mall", token=tenant)
        assert other.returncode == 1 and "refused (403)" in other.stderr

        listed = cli(admin, "token", "list", "--json")
        got = json.loads(listed.stdout)["tokens"]
        assert [(t["id"], t["role"], t["env"], t["source"]) for t in got] == [
            ("5eed0001", "viewer", None, "file"), ("5eed0002", "env", "shop", "file")]
        assert viewer not in listed.stdout and tenant not in listed.stdout
        refused = cli(admin, "token", "revoke", "5eed0001")
        assert refused.returncode == 1 and "(409)" in refused.stderr
        assert "declared in tokens_file" in refused.stderr
        assert cli(admin, "whoami", token=viewer).returncode == 0  # still there

        tokens_file.write_text(yaml.safe_dump({"tokens": tokens[1:]}))  # the viewer out
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while cli(admin, "whoami", token=viewer).returncode == 0:
            assert time.monotonic() < deadline, "the viewer's token still works"
            await asyncio.sleep(0.1)
        out = cli(admin, "audit", "--action", "config_reload", "--json")
        assert any("tokens.yaml changed" in json.loads(line)["body"]
                   for line in out.stdout.splitlines()), out.stdout

        tokens_file.write_text("tokens:\n  - {name: x, role: boss, token: nope}\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        assert cli(admin, "env", "usage", "shop", token=tenant).returncode == 0  # kept
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "tokens.yaml: $.tokens[0].role" in err and "last good config stays" in err
