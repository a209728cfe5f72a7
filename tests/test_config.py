"""Config loading: one fixture directory per failure mode, the shipped files, the CLI.

Each ``tests/config/<case>/`` holds a gateway.yaml (plus the plans/environments file the case is
about) and an ``expect.txt``: the file the issue must name, its key path, a substring of the
reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from quotagate.settings.load import ConfigError, load_config, parse_yaml
from quotagate.settings.schema import GatewaySettings, money

ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = Path(__file__).resolve().parent / "config"
CONFIG = ROOT / "config"
CASES = sorted(d for d in CASES_DIR.iterdir() if d.is_dir())

def _case_param(case: Path) -> object:
    return pytest.param(case, id=case.name)


def _expect(case: Path) -> tuple[str, str, str]:
    lines = (case / "expect.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3, f"{case}/expect.txt: file, path, reason substring"
    file, path, reason = lines
    return file, path, reason


def test_every_case_has_gateway_and_expect() -> None:
    assert len(CASES) >= 35
    for case in CASES:
        assert (case / "gateway.yaml").is_file(), case
        assert (case / "expect.txt").is_file(), case


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_config_case(case: Path) -> None:
    file, path, reason = _expect(case)
    with pytest.raises(ConfigError) as info:
        load_config(case / "gateway.yaml")
    issues = info.value.issues
    assert issues, "ConfigError without issues"
    matching = [
        i for i in issues if i.file.endswith(file) and i.path == path and reason in i.reason
    ]
    assert matching, f"no issue ({file}, {path}, ~{reason!r}) among {[str(i) for i in issues]}"
    # A file that lives in the case directory must be named as that one, not e.g. config/'s.
    if (case / file).exists():
        assert any(Path(i.file).resolve() == (case / file).resolve() for i in matching)
    # The message form the CLI prints.
    assert str(matching[0]) == f"{matching[0].file}: {path}: {matching[0].reason}"


# ------------------------------------------------------------------------- shipped config


PLAN_TABLE = {
    # name: (price, qps, calls, realtime, gbs, capacity_gb, outbound_gb, storage_traffic_gb,
    #        cdn_origin_gb, custom_domains, packs_allowed)
    "free": ("0", 500, 200_000, 10, 150_000, 3, 4, 10, 10, 1, False),
    "personal": ("19.9", 500, 200_000, 10, 150_000, 3, 4, 10, 10, 1, True),
    "standard": ("199", 500, 8_000_000, 500, 600_000, 100, 20, 300, 120, 5, True),
    "enterprise": ("999", 1000, 50_000_000, 500, 1_500_000, 500, 50, 1200, 600, 50, True),
    "enterprise_premium": (
        None, None, 200_000_000, 500, 15_000_000, 2000, 200, 4000, 2000, 50, True,
    ),
}
PLAN_FIELDS = (
    "price", "qps", "calls", "realtime", "gbs", "capacity_gb", "outbound_gb",
    "storage_traffic_gb", "cdn_origin_gb", "custom_domains", "packs_allowed",
)


@pytest.fixture(scope="module")
def shipped():
    return load_config(CONFIG / "gateway.yaml")


def test_shipped_config_loads(shipped) -> None:
    assert shipped.base_dir == CONFIG
    assert [p.name for p in shipped.files] == ["gateway.yaml", "plans.yaml", "environments.yaml"]
    gw = shipped.gateway
    assert gw.listen != gw.admin_listen
    assert gw.enforcement == "enforce" and gw.on_store_failure == "open"
    assert gw.timezone == "Asia/Shanghai"
    # The platform SDKs' endpoints (docs/config.md, "The SDKs' endpoints").
    routes = {(r.prefix, r.exact): r.kind for r in gw.routes}
    assert {("/v1/functions/", False): "function", ("/v1/database/", False): "database",
            ("/v1/storages/", False): "storage", ("/auth/", False): "auth",
            ("/web", True): "action", ("/admin", True): "action",
            ("/", True): "realtime"}.items() <= routes.items()
    assert set(gw.domains) == {"api.tcloudbasegateway.com", "tcb-api.tencentcloudapi.com"}
    assert [r.kind for r in gw.routes].count("realtime") == 1
    assert gw.leases.ttl_ms == 15_000 and gw.leases.renew_interval_ms == 5_000
    assert "shop-1a2b" in shipped.environments.environments


def test_shipped_plans_reproduce_the_table(shipped) -> None:
    plans = shipped.plans.plans
    assert list(plans) == list(PLAN_TABLE)
    for name, row in PLAN_TABLE.items():
        actual = tuple(getattr(plans[name], f) for f in PLAN_FIELDS)
        assert actual == row, name
        # Defaults every plan shares.
        assert plans[name].ai_tokens == 100_000
        assert plans[name].function_concurrency == 1_000
    assert [n for n, p in plans.items() if not p.packs_allowed] == ["free"]
    assert [n for n, p in plans.items() if p.qps is None] == ["enterprise_premium"]
    assert money(plans["personal"].price) == Decimal("19.9")


def test_shipped_packs_and_prices(shipped) -> None:
    p = shipped.plans
    assert p.sms_call_cost == 2000
    assert {n: (r.meter, r.amount, r.days) for n, r in p.resource_packs.items()} == {
        "calls-10m": ("calls", 10_000_000, 30),
        "calls-50m": ("calls", 50_000_000, 30),
        "calls-100m": ("calls", 100_000_000, 30),
        "capacity-100g": ("capacity_bytes", 100 * 1024**3, 30),
        "capacity-300g": ("capacity_bytes", 300 * 1024**3, 30),
        "sms-1k": ("sms", 1000, 30),
        "sms-10k": ("sms", 10_000, 30),
        "sms-100k": ("sms", 100_000, 30),
    }
    assert set(p.promo_packs) == {
        "fn-500g", "fn-2.5t", "fn-5t", "fn-10t", "fn-25t",
        "db-3k", "db-5k", "db-10k", "db-15k", "db-18k",
    }
    assert all(pp.database_free == n.startswith("db-") for n, pp in p.promo_packs.items())
    assert p.payg_prices["calls"].price == "0.5" and p.payg_prices["calls"].per == 10_000


# ----------------------------------------------------------------------------- YAML 1.2-ish


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Off", "y", "n"])
def test_yaml_11_booleans_stay_strings(tmp_path: Path, word: str) -> None:
    raw = tmp_path / "g.yaml"
    raw.write_text(f"timezone: UTC\ndomain: {word}\n")
    assert parse_yaml(raw, GatewaySettings).domain == word


def test_enforcement_off_stays_the_string_off(tmp_path: Path) -> None:
    shutil.copy(CONFIG / "plans.yaml", tmp_path / "plans.yaml")
    shutil.copy(CONFIG / "environments.yaml", tmp_path / "environments.yaml")
    (tmp_path / "gateway.yaml").write_text("enforcement: off\non_store_failure: closed\n")
    cfg = load_config(tmp_path / "gateway.yaml")
    assert cfg.gateway.enforcement == "off"
    assert cfg.gateway.enforcement is not False


def test_true_false_are_still_booleans(tmp_path: Path) -> None:
    shutil.copy(CONFIG / "plans.yaml", tmp_path / "plans.yaml")
    (tmp_path / "environments.yaml").write_text(
        "environments:\n"
        "  a: {plan: standard, anchor: 2026-11-01, expires: 2027-11-01, overage: true}\n"
        "  b: {plan: standard, anchor: 2026-11-01, expires: 2027-11-01, overage: False}\n"
    )
    (tmp_path / "gateway.yaml").write_text("{}\n")
    envs = load_config(tmp_path / "gateway.yaml").environments.environments
    assert envs["a"].overage is True and envs["b"].overage is False


def test_all_issues_of_one_environments_file_are_reported(tmp_path: Path) -> None:
    shutil.copy(CONFIG / "plans.yaml", tmp_path / "plans.yaml")
    (tmp_path / "environments.yaml").write_text(MULTI_ISSUE_ENVS)
    (tmp_path / "gateway.yaml").write_text("listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "gateway.yaml")
    assert [(Path(i.file).name, i.path) for i in info.value.issues] == [
        ("gateway.yaml", "$.admin_listen"),
        *[("environments.yaml", p) for p in MULTI_ISSUE_PATHS],
    ]


# -------------------------------------------------------------------------------------- CLI

MULTI_ISSUE_ENVS = """\
environments:
  a: {plan: gold, anchor: 2026-11-01, expires: 2027-11-01}
  b: {plan: standard, anchor: 2026-11-01, expires: 2026-11-01}
  c:
    plan: free
    anchor: 2026-11-01
    expires: 2027-11-01
    packs: [{id: p1, pack: sms-1k, purchased: 2026-11-02}]
    promos: [{id: d1, pack: db-1m, start: 2026-11-26}]
"""
MULTI_ISSUE_PATHS = [
    "$.environments.a.plan",
    "$.environments.b.expires",
    "$.environments.c.packs",
    "$.environments.c.promos[0].pack",
]


def _check(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotagate", "config", "check", *map(str, files)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )


def test_cli_config_check_good_files() -> None:
    res = _check(CONFIG / "gateway.yaml", CONFIG / "plans.yaml", CONFIG / "environments.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.startswith("ok: ")


def test_cli_config_check_bad_gateway() -> None:
    gw = CASES_DIR / "gw_listen_equals_admin" / "gateway.yaml"
    res = _check(gw)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f"{gw}: $.admin_listen: must differ from listen (admin is never public)"
    ]


def test_cli_config_check_lists_every_issue_of_an_environments_file(tmp_path: Path) -> None:
    shutil.copy(CONFIG / "plans.yaml", tmp_path / "plans.yaml")  # read from beside the file
    envs = tmp_path / "environments.yaml"
    envs.write_text(MULTI_ISSUE_ENVS)
    res = _check(envs)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == len(MULTI_ISSUE_PATHS), res.stderr
    for line, path in zip(lines, MULTI_ISSUE_PATHS, strict=True):
        assert line.startswith(f"{envs}: {path}: "), line
    assert "unknown plan 'gold'" in lines[0]
    assert lines[1].endswith("must be after anchor")
    assert "cannot buy resource packs" in lines[2]
    assert "unknown promo pack 'db-1m'" in lines[3]


def test_cli_config_check_several_bad_files_at_once() -> None:
    a = CASES_DIR / "gw_unknown_timezone" / "gateway.yaml"
    b = CASES_DIR / "plans_negative_qps" / "plans.yaml"
    res = _check(a, CONFIG / "plans.yaml", b)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 2, res.stderr
    assert lines[0].startswith(f"{a}: $.timezone: unknown time zone")
    assert lines[1].startswith(f"{b}: ")


def test_cli_config_check_reports_every_shape_error_of_every_file(tmp_path: Path) -> None:
    """msgspec stops at a file's first error; config check goes on past each one (the key is
    taken out of a copy and the rest converted again), into the files the gateway names."""
    gw = (CONFIG / "gateway.yaml").read_text(encoding="utf-8")
    gw = gw.replace("timezone:", "timezon: UTC\ntimezone:", 1)
    gw = gw.replace("kind: function}", "kind: functions}", 1)
    gw = gw.replace("upstream: http://127.0.0.1:9001, kind: database}",
                    "upstream: 5, kind: database}", 1)
    (tmp_path / "gateway.yaml").write_text(gw)
    plans = (CONFIG / "plans.yaml").read_text(encoding="utf-8")
    assert plans.count("qps: 500") >= 1
    (tmp_path / "plans.yaml").write_text(plans.replace("qps: 500", "qps: many", 1))
    (tmp_path / "environments.yaml").write_text(
        "environments:\n"
        "  a-env:\n    plann: free\n    anchor: 2026-11-01\n    expires: 2027-11-01\n"
        "  b-env:\n    plan: free\n    anchor: 2026-11-01\n    expires: 2027-11-01\n"
        "    overage: maybe\n    packs: [{id: p1, pack: calls-1m, purchased: someday}]\n"
    )
    res = _check(tmp_path / "gateway.yaml")
    assert res.returncode == 1
    found = [line.split(": ", 2)[:2] for line in res.stderr.splitlines()]
    files = {name: str(tmp_path / name) for name in ("gateway.yaml", "plans.yaml",
                                                       "environments.yaml")}
    routes = [r["kind"] for r in yaml.safe_load(gw)["routes"]]
    function_at, database_at = routes.index("functions"), routes.index("database")
    assert found == [
        [files["gateway.yaml"], "$.timezon"],
        [files["gateway.yaml"], f"$.routes[{function_at}].kind"],
        [files["gateway.yaml"], f"$.routes[{database_at}].upstream"],  # as in the file
        [files["plans.yaml"], "$.plans.free.qps"],
        [files["environments.yaml"], "$.environments.a-env.plann"],
        [files["environments.yaml"], "$.environments.a-env"],
        [files["environments.yaml"], "$.environments.b-env.overage"],
        [files["environments.yaml"], "$.environments.b-env.packs[0].purchased"],
    ], res.stderr
    assert "did you mean 'timezone'" in res.stderr
    assert "missing required field `plan`" in res.stderr  # a-env: its own error
    assert "missing required field `upstream`" not in res.stderr  # caused by taking it out
    assert "missing required field `kind`" not in res.stderr


SHIPPED_CONFIGS = sorted([*ROOT.glob("config/**/gateway.yaml"),
                          *ROOT.glob("deploy/**/gateway.yaml")])


def test_config_check_passes_every_config_the_repository_ships() -> None:
    """Each gateway.yaml shipped (config/, deploy/compose, deploy/image) and the plans and
    environments it names, as an operator would check them: `quotagate config check` by path.
    The image's names files beside it in /etc/quotagate: staged as the Dockerfile lays out."""
    names = {str(p.relative_to(ROOT)) for p in SHIPPED_CONFIGS}
    assert {"config/gateway.yaml", "deploy/compose/gateway.yaml",
            "deploy/image/gateway.yaml"} <= names
    for path in SHIPPED_CONFIGS:
        res = _check(path)
        if res.returncode and path.parent.name == "image":
            # deploy/image/gateway.yaml is /etc/quotagate/gateway.yaml in the image, beside
            # the plans and environments of config/ (the Dockerfile's COPY lines).
            assert "no such file" in res.stderr, res.stderr
            continue
        assert res.returncode == 0, f"{path}: {res.stderr}"
        assert res.stdout.startswith("ok: "), res.stdout


def test_the_image_config_checks_where_the_dockerfile_puts_it(tmp_path: Path) -> None:
    for name in ("plans.yaml", "environments.yaml"):
        shutil.copy(CONFIG / name, tmp_path / name)
    shutil.copy(ROOT / "deploy" / "image" / "gateway.yaml", tmp_path / "gateway.yaml")
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY config/plans.yaml config/environments.yaml /etc/quotagate/" in dockerfile
    assert "COPY deploy/image/gateway.yaml /etc/quotagate/gateway.yaml" in dockerfile
    res = _check(tmp_path / "gateway.yaml")
    assert res.returncode == 0, res.stderr


def test_config_reference_documents_every_key() -> None:
    """docs/config.md names every key of the schema (the reference cannot drift silently)."""
    import msgspec

    from quotagate.settings import schema

    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    structs = [schema.GatewaySettings, schema.StoreSettings, schema.UpstreamSettings,
               schema.ClientSettings, schema.StoreTls,
               schema.Route, schema.Plan, schema.ResourcePack, schema.PromoPack,
               schema.PaygPrice, schema.PlansFile, schema.Limits, schema.PackGrant,
               schema.PromoGrant, schema.Environment, schema.GatewayVersion,
               schema.GatewayGrant]
    import re

    missing = [f"{s.__name__}.{f.name}" for s in structs for f in msgspec.structs.fields(s)
               if not re.search(rf"`(?:[\w.]*\.)?{f.name}[`.]", doc)]
    assert missing == []


def test_cli_config_check_json() -> None:
    good = subprocess.run(
        [sys.executable, "-m", "quotagate", "config", "check", "--json",
         str(CONFIG / "gateway.yaml")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"] is True
    bad = CASES_DIR / "gw_misspelt_key" / "gateway.yaml"
    out = subprocess.run([sys.executable, "-m", "quotagate", "config", "check", "--json",
                          str(bad)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["files"] == [str(bad)]
    assert report["issues"] == [{"file": str(bad), "path": "$.store.timout_ms",
                                 "reason": "unknown key (did you mean 'timeout_ms'?)"}]


#: YAML whose value PyYAML's constructors decide in ways a fast path could get wrong: YAML 1.1
#: octal, explicit tags, tags on the wrong kind of node, aliases, keys that are not scalars.
YAML_EDGES = ["a: 0100", "a: !!int '0100'", "a: 0", "a: -5", "a: 1_000", "a: 0x1f", "a: 1.5",
              "a: !!bool yes", "a: !!bool on", "a: true", "a: off", "a: ~", "a: !!null x",
              "a: 2026-01-31", "a: !!str 5", "a: &x [1, {b: 2}]\nc: *x", "a: !!int [1]",
              "a: !!bool [1]", "a: !!seq {b: 1}", "a: !!null [1]", "a: !!str [1]",
              "? [1]\n: 2", "a: 1\na: 2", "", "a:\n  - 1\n  - b: [x, {c: d}]"]


@pytest.mark.parametrize("text", YAML_EDGES)
def test_the_fast_yaml_build_is_pyyamls(text):
    """settings.load._load builds what yaml.load with the same loader builds, or fails as it
    does (issue 24: the fast path of a big environments file)."""
    from quotagate.settings.load import _load, _Loader

    def outcome(load):
        try:
            return "value", load(text)
        except yaml.YAMLError as exc:
            return "error", type(exc).__name__
    assert outcome(_load) == outcome(lambda t: yaml.load(t, Loader=_Loader))


def test_a_tag_pyyaml_cannot_build_is_an_issue_not_a_crash(tmp_path):
    """``!!bool maybe`` raised KeyError out of PyYAML (not a YAMLError): a reload would have
    died with it. It is a config issue like any other."""
    bad = tmp_path / "environments.yaml"
    bad.write_text("environments:\n  e1: {plan: !!bool maybe}\n")
    out = subprocess.run([sys.executable, "-m", "quotagate", "config", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "cannot build a value" in out.stdout + out.stderr, out
    assert "Traceback" not in out.stderr, out.stderr


def test_a_tokens_file_with_mistakes_is_refused_naming_each(tmp_path: Path) -> None:
    """tokens_file: every mistake named by its entry, nothing taken; a good file yields the
    tokens by id, role and digest, never keeping a token itself."""
    import hashlib

    from tests.helpers import write_config

    good = "qg_0a0b0c0d_" + "x" * 43
    (tmp_path / "tokens.yaml").write_text("tokens: []\n")
    write_config(tmp_path, {}, tokens_file="tokens.yaml")
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"name": "ok", "role": "viewer", "token": good},
        {"name": "both", "role": "viewer", "token": good, "sha256": "0" * 64},
        {"name": "neither", "role": "billing"},
        {"name": "tenant", "role": "env", "id": "0000bbbb", "sha256": "c" * 64},
        {"name": "admin with env", "role": "admin", "env": "shop", "id": "0000aaaa",
         "sha256": "a" * 64},
        {"name": "bad digest", "role": "support", "id": "XYZ", "sha256": "abc"},
        {"name": "again", "role": "support", "id": "0a0b0c0d", "sha256": "b" * 64},
        {"name": "not a token", "role": "viewer", "token": "hunter2"}]}))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "gateway.yaml")
    assert [(i.path, i.reason.split(" (")[0].split(":")[0]) for i in info.value.issues] == [
        ("$.tokens[1]", "give token, or id and sha256, not both"),
        ("$.tokens[2]", "needs token, or id and sha256"),
        ("$.tokens[3].env", "an env token needs env, an environment id"),
        ("$.tokens[4].env", "only an env token has an env"),
        ("$.tokens[5].id", "8 hex digits"),
        ("$.tokens[5].sha256", "64 lowercase hex digits"),
        ("$.tokens[6]", "the same id as $.tokens[0]"),
        ("$.tokens[7].token", "not a token")]
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"name": "ok", "role": "viewer", "token": good},
        {"name": "tenant", "role": "env", "env": "shop", "id": "0000aaaa",
         "sha256": "a" * 64}]}))
    config = load_config(tmp_path / "gateway.yaml")
    assert [(t.id, t.role, t.env, t.digest) for t in config.tokens] == [
        ("0a0b0c0d", "viewer", None, hashlib.sha256(good.encode()).hexdigest()),
        ("0000aaaa", "env", "shop", "a" * 64)]
    assert good not in repr(config.tokens)
    assert tmp_path / "tokens.yaml" in config.files  # watched: a change is reloaded
