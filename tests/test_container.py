"""The container files: checked as files (pinned bases, not root, ports, health checks and
mounts consistent with the config), and the image's entrypoint run as the image runs it — no
container engine runs here, so a private mount and network namespace holds a root laid out
like the image (its COPY lines, its user, its work directory) and the entrypoint runs there
as that unprivileged user (test_the_image_entrypoint_serves_with_its_own_defaults)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest
import yaml

from quotagate.limiter.embedded import valkey_binary
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
    image = yaml.safe_load((ROOT / "deploy" / "image" / "gateway.yaml").read_text())
    assert image["listen"].startswith("0.0.0.0:")  # reachable in the container's network
    assert image["admin_listen"].startswith("127.0.0.1:")  # the admin API never is, by default
    assert exposed == {int(image["listen"].rsplit(":", 1)[1])}
    defaults = GatewaySettings()
    [health] = [rest for op, rest in lines if op == "HEALTHCHECK"]
    assert f":{defaults.admin_listen.rsplit(':', 1)[1]}/healthz" in health
    [entry] = [rest for op, rest in lines if op == "ENTRYPOINT"]
    assert "/etc/quotagate/gateway.yaml" in entry
    volumes = " ".join(rest for op, rest in lines if op == "VOLUME")
    assert "/etc/quotagate" in volumes


def test_compose_stack_consistent_with_its_config() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"valkey", "gateway", "upstream"}
    valkey = services["valkey"]
    assert re.fullmatch(r"valkey/valkey:\d+\.\d+\.\d+[\w.-]*", valkey["image"])
    command = " ".join(valkey["command"])
    assert "--appendonly yes" in command
    gateway = services["gateway"]
    # The config is mounted where it sits in the repository, so the relative plans_file
    # resolves alike in the container and on the host (where `config check` reads it).
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in gateway["volumes"])
    assert all(v.endswith(":ro") for v in gateway["volumes"])
    assert mounts == {"./deploy/compose": "/srv/quotagate/deploy/compose",
                      "./config": "/srv/quotagate/config"}
    entry = gateway["entrypoint"]
    assert entry[:3] == ["quotagate", "serve", "--config"]
    inside = PurePosixPath(entry[3])
    host = next(ROOT / src / inside.relative_to(dst) for src, dst in mounts.items()
                if inside.is_relative_to(dst))
    assert gateway["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert "QUOTAGATE_ADMIN_TOKEN" in gateway["environment"]

    config = load_config(host)
    for used in config.files:  # every file it reads is inside a mount
        rel = used.resolve().relative_to(ROOT)
        assert any(rel.is_relative_to(src.removeprefix("./")) for src in mounts), used
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
    # Built once: one service builds the image, the other runs it and never pulls it.
    built = [name for name, svc in services.items() if "build" in svc]
    assert built == ["gateway"] and services["gateway"]["pull_policy"] == "build"
    assert services["upstream"]["image"] == gateway["image"]
    assert services["upstream"]["pull_policy"] == "never"
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name


def test_compose_runs_the_valkey_the_tests_run() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    tag = compose["services"]["valkey"]["image"].split(":", 1)[1]
    version = subprocess.run([valkey_binary(), "--version"], capture_output=True, text=True,
                             check=True).stdout
    embedded = re.search(r"v=(\d+\.\d+\.\d+)", version)
    assert embedded and tag.split("-")[0] == embedded.group(1), (tag, version)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "data", "**/__pycache__", ".pytest_cache", ".mypy_cache",
            "**/appendonlydir"} <= ignored
    copied = {rest.split()[0] for op, rest in dockerfile() if op == "COPY"
              and not rest.startswith("--from")}
    assert not copied & ignored, "the build copies something it ignores"


# ------------------------------------------------------------- the entrypoint, as the image


def final_stage() -> list[tuple[str, str]]:
    lines = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(lines) if op == "FROM")
    return lines[last_from + 1:]


def lay_out_image(rootfs: Path, env_text: str) -> dict[str, object]:
    """``rootfs`` as the image's final stage leaves it: /etc copied from this machine plus the
    image's user, each COPY (root-owned, as Docker copies), the home/work directory owned by
    the user. Returns what the image runs: user id, work directory, entrypoint."""
    stage = final_stage()
    subprocess.run(["cp", "-a", "/etc", str(rootfs / "etc")], check=True)
    [useradd] = [rest for op, rest in stage if op == "RUN" and "useradd" in rest]
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))  # type: ignore[union-attr]
    home = re.search(r"--home-dir (\S+)", useradd).group(1)  # type: ignore[union-attr]
    user = useradd.split("&&")[0].split()[-1]
    with open(rootfs / "etc" / "passwd", "a") as passwd:
        passwd.write(f"{user}:x:{uid}:{uid}::{home}:/usr/sbin/nologin\n")
    with open(rootfs / "etc" / "group", "a") as group:
        group.write(f"{user}:x:{uid}:\n")
    with open(rootfs / "etc" / "hosts", "a") as hosts:
        hosts.write("127.0.0.1 upstream\n")  # the image config's upstream placeholder
    for op, rest in stage:
        if op != "COPY" or rest.startswith("--from"):
            continue
        *sources, dest = rest.split()
        for source in sources:
            src = ROOT / source
            target = rootfs / dest.lstrip("/")
            if dest.endswith("/"):
                target = target / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
    # RUN useradd --create-home and install -d: the home and its data directory, the user's.
    for made in [*re.findall(r"install -d .*?(/\S+)", useradd), home]:
        (rootfs / made.lstrip("/")).mkdir(parents=True, exist_ok=True)
        shutil.chown(rootfs / made.lstrip("/"), uid, uid)
    # The config volume as an operator's: environments dated around today (the shipped example
    # has fixed dates), the image's gateway.yaml and plans.yaml untouched.
    (rootfs / "etc" / "quotagate" / "environments.yaml").write_text(env_text)
    [workdir] = [rest for op, rest in stage if op == "WORKDIR"]
    [entry] = [rest for op, rest in stage if op == "ENTRYPOINT"]
    [health] = [rest for op, rest in stage if op == "HEALTHCHECK"]
    return {"uid": uid, "workdir": workdir, "entrypoint": json.loads(entry),
            "health": re.search(r"(http://[^']+)'", health).group(1)}  # type: ignore[union-attr]


#: Runs inside `unshare --mount --net --pid --fork` (all in it ends with it): binds what the
#: image would have (/usr, this Python, the project with its .venv standing in for the image's
#: site-packages) into the root, starts the upstream and the entrypoint as the image's user,
#: and reports as JSON.
IN_NAMESPACE = textwrap.dedent(r"""
    set -eu
    R=$1; UID_=$2; WORKDIR=$3; shift 3
    mount --make-rprivate /
    for d in /usr "$PY_PREFIX" "$PROJECT"; do
      mkdir -p "$R$d"; mount --rbind "$d" "$R$d"
    done
    for l in bin lib lib64 sbin; do [ -L "/$l" ] && ln -sfn "$(readlink /$l)" "$R/$l"; done
    mkdir -p "$R/dev" "$R/proc" "$R/tmp"; chmod 1777 "$R/tmp"
    mount --rbind /dev "$R/dev"; mount -t proc proc "$R/proc"
    ip link set lo up
    as_user() { chroot --userspec="$UID_:$UID_" "$R" env -i HOME="$WORKDIR" \
                PATH="$PROJECT/.venv/bin:/usr/local/bin:/usr/bin:/bin" \
                QUOTAGATE_ADMIN_TOKEN=t sh -c "cd $WORKDIR && exec \"\$@\"" sh "$@"; }
    as_user python -m quotagate.demo.upstream --port 9001 >/dev/null 2>&1 &
    UPSTREAM=$!
    as_user "$@" >/dev/null 2>"$R/tmp/gateway.log" &
    GATEWAY=$!
    status=0
    chroot "$R" "$PROJECT/.venv/bin/python" -c "$CHECK" || status=$?
    ss -ltnH > "$R/tmp/listening"
    kill -TERM $GATEWAY $UPSTREAM; wait $GATEWAY || true
    exit $status
    """)

CHECK = textwrap.dedent("""
    import json, time, urllib.request
    def get(url, headers=None):
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    deadline = time.monotonic() + 60
    while True:
        try:
            health = get(HEALTH)
            if get(HEALTH.replace("/healthz", "/readyz"))[0] == 200:  # environments written
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.2)
    proxied = get("http://127.0.0.1:8080/functions/hello", {"X-CloudBase-Env": "shop"})
    print(json.dumps({"health": health, "proxied": proxied}))
    """)


@pytest.mark.deployed
def test_the_image_entrypoint_serves_with_its_own_defaults(tmp_path: Path) -> None:
    from tests.deployed import days

    assert os.geteuid() == 0, ("this test lays out the image's root with mount and network "
                               "namespaces (unshare, chroot): run the suite as root, as CI does")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    image = lay_out_image(rootfs, textwrap.dedent(f"""\
        environments:
          shop: {{plan: standard, anchor: {days(-10)}, expires: {days(300)}}}
        """))
    check = f"HEALTH = {image['health']!r}\n" + CHECK
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PROJECT": str(ROOT),
           "PY_PREFIX": str(Path(sys.base_prefix).resolve()), "CHECK": check}
    out = subprocess.run(
        ["unshare", "--mount", "--net", "--pid", "--fork", "bash", "-c", IN_NAMESPACE, "ns",
         str(rootfs), str(image["uid"]), str(image["workdir"]), *image["entrypoint"]],
        capture_output=True, text=True, timeout=120, env=env)
    log = (rootfs / "tmp" / "gateway.log").read_text() if (rootfs / "tmp" /
                                                          "gateway.log").exists() else ""
    assert out.returncode == 0, (out.stdout, out.stderr, log)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["health"][0] == 200, report
    assert json.loads(report["health"][1])["status"] == "ok", report
    status, body = report["proxied"]
    assert status == 200 and json.loads(body)["ok"] is True, (report, log)
    listening = (rootfs / "tmp" / "listening").read_text()
    assert "0.0.0.0:8080" in listening, listening  # every interface of the container
    # The store's append-only files were written as the user, in the image's volume.
    data = rootfs / "var" / "lib" / "quotagate" / "data"
    assert (data / "appendonlydir").is_dir() and (data / "appendonlydir").stat().st_uid == \
        image["uid"], log
    assert "embedded Valkey started" in log
