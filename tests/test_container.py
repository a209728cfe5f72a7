"""The container files, checked as files (no Docker build here): pinned bases, not root,
ports, health checks and mounts consistent with the config."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from quotagate.settings import load_config
from quotagate.settings.schema import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        buf += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            lines.append((op.upper(), rest))
            buf = ""
    return lines


def test_dockerfile_multistage_pinned_not_root_healthy() -> None:
    lines = dockerfile()
    bases = [rest.split()[0] for op, rest in lines if op == "FROM"]
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), f"unpinned base {base}"
        assert "slim" in base
    users = [rest for op, rest in lines if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {int(p) for op, rest in lines if op == "EXPOSE" for p in rest.split()}
    defaults = GatewaySettings()
    ports = {int(defaults.listen.rsplit(":", 1)[1]), int(defaults.admin_listen.rsplit(":", 1)[1])}
    assert exposed == ports
    [health] = [rest for op, rest in lines if op == "HEALTHCHECK"]
    assert f":{defaults.admin_listen.rsplit(':', 1)[1]}/healthz" in health
    [entry] = [rest for op, rest in lines if op == "ENTRYPOINT"]
    assert "/etc/quotagate/gateway.yaml" in entry
    volumes = " ".join(rest for op, rest in lines if op == "VOLUME")
    assert "/etc/quotagate" in volumes


def test_compose_stack_consistent_with_its_config(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"valkey", "gateway", "upstream"}
    valkey = services["valkey"]
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+[\w.-]*", valkey["image"])
    command = " ".join(valkey["command"])
    assert "--appendonly yes" in command
    gateway = services["gateway"]
    assert "./deploy/compose:/etc/quotagate:ro" in gateway["volumes"]
    assert gateway["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert "QUOTAGATE_ADMIN_TOKEN" in gateway["environment"]

    # The mounted config loads (the plans file is the image's copy of config/plans.yaml).
    staged = tmp_path / "etc"
    shutil.copytree(ROOT / "deploy" / "compose", staged)
    text = (staged / "gateway.yaml").read_text().replace(
        "/usr/share/quotagate/config/plans.yaml", str(ROOT / "config" / "plans.yaml"))
    (staged / "gateway.yaml").write_text(text)
    config = load_config(staged / "gateway.yaml")
    gw = config.gateway
    assert gw.store.url == "redis://valkey:6379/0"
    listen, admin = int(gw.listen.rsplit(":", 1)[1]), int(gw.admin_listen.rsplit(":", 1)[1])
    published = {p.rsplit(":", 1)[-1]: p for p in gateway["ports"]}
    assert str(listen) in published and str(admin) in published
    assert published[str(admin)].startswith("127.0.0.1:"), "admin never public"
    assert f":{admin}/healthz" in " ".join(gateway["healthcheck"]["test"])
    upstreams = {r.upstream for r in gw.routes}
    assert upstreams == {"http://upstream:9001"}
    assert "9001" in " ".join(services["upstream"]["entrypoint"])
    # The Dockerfile ships config/ where the compose config expects the plans.
    assert any(op == "COPY" and rest == "config /usr/share/quotagate/config"
               for op, rest in dockerfile())
