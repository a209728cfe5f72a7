"""deploy/kubernetes/ checked without a cluster (none runs here): every manifest against the
Kubernetes API schemas (kubernetes-validate, strict: no unknown field), and the quotagate
configs its ConfigMaps carry, loaded as `quotagate serve` loads them (with the repository's
plans.yaml, which the quotagate-plans ConfigMap is made from); the probes, ports and mounts
agree with those configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from quotagate.settings.load import load_config
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes the manifests are for (policy/v1 PDBs, seccompProfile).
VERSION = "1.29"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
#: The image's ENTRYPOINT (the repository's Dockerfile), what a container without a command
#: runs.
ENTRYPOINT = json.loads(next(
    line for line in (ROOT / "Dockerfile").read_text().splitlines()
    if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def everything() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in documents(path)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_a_manifest_with_a_mistake_is_refused() -> None:
    """(The check can fail: an unknown field, a wrong type.)"""
    deployment = next(d for d in everything() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def quotagate_containers() -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, its quotagate container, the ConfigMap its config comes from)."""
    docs = everything()
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    found = []
    for workload in (d for d in docs if d["kind"] == "Deployment"):
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            if "quotagate" not in container["image"]:
                continue
            config = next(v for v in spec["volumes"] if v["name"] == "config")
            sources = [s["configMap"]["name"] for s in config["projected"]["sources"]]
            assert "quotagate-plans" in sources  # made from config/plans.yaml
            found.append((workload, container,
                          next(maps[n] for n in sources if n != "quotagate-plans")))
    return found


def test_the_configs_load_as_serve_loads_them(tmp_path: Path) -> None:
    found = quotagate_containers()
    assert {w["metadata"]["name"] for w, _, _ in found} == {"quotagate", "reports"}
    for workload, container, config_map in found:
        etc = tmp_path / workload["metadata"]["name"]
        etc.mkdir()
        for name, text in config_map["data"].items():
            (etc / name).write_text(text)
        (etc / "plans.yaml").write_text((ROOT / "config" / "plans.yaml").read_text())
        # The Secrets it mounts, written out too; the config's paths into them follow.
        secrets = {d["metadata"]["name"]: d for d in everything() if d["kind"] == "Secret"}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        mounted: dict[str, Path] = {}
        for mount in container["volumeMounts"]:
            secret = volumes[mount["name"]].get("secret")
            if secret is not None:
                there = etc.parent / f"{etc.name}-{secret['secretName']}"
                there.mkdir()
                for name, text in secrets[secret["secretName"]]["stringData"].items():
                    (there / name).write_text(text)
                mounted[mount["mountPath"]] = there
        for name, text in config_map["data"].items():
            for inside, there in mounted.items():
                text = text.replace(inside + "/", f"{there}/")
            (etc / name).write_text(text)
        # What the container runs: its command, else the image's ENTRYPOINT, then its args
        # (Kubernetes appends args to the ENTRYPOINT).
        argv = [*(container.get("command") or ENTRYPOINT), *container.get("args", [])]
        assert argv[:3] == ["quotagate", "serve", "--config"] and len(argv) == 4, argv
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert Path(argv[3]).parent == Path(mount["mountPath"])
        config = load_config(str(etc / Path(argv[3]).name))
        gw = config.gateway
        if gw.tokens_file:  # declared tokens: from a Secret mounted where it says
            assert any(gw.tokens_file.startswith(f"{there}/") for there in mounted.values())
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert int(gw.listen.rsplit(":", 1)[1]) == ports["http"]
        admin_port = int(gw.admin_listen.rsplit(":", 1)[1])
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]
            if "httpGet" in check:  # on the pod's IP: the admin listener must listen there
                assert check["httpGet"]["port"] == "admin" and ports["admin"] == admin_port
                assert not gw.admin_listen.startswith("127.")
            else:  # from inside the pod: its loopback
                assert f"127.0.0.1:{admin_port}" in " ".join(check["exec"]["command"])
        assert container["readinessProbe"].get("httpGet", {}).get("path", "/readyz") \
            == "/readyz" or "/readyz" in " ".join(container["readinessProbe"]["exec"]["command"])
        token = next(e for e in container["env"] if e["name"] == "QUOTAGATE_ADMIN_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "quotagate-admin"
        data = next(m for m in container["volumeMounts"] if m["name"] == "data")
        assert gw.store.data_dir == data["mountPath"]  # the journal on a writable volume
        # The grace period outlasts preStop's wait and both drains (admin and plugin
        # listeners, then the public one), with 5 s for the write-back: never killed
        # mid-drain.
        pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        waits = float(re.findall(r"\d+(?:\.\d+)?", pre_stop)[-1])
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= waits + 2 * gw.drain_timeout_ms / 1000 + 5, workload["metadata"]


def test_a_disruption_budget_and_a_store() -> None:
    docs = everything()
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    gateway = next(d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "quotagate")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < gateway["spec"]["replicas"]
    valkey = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "--appendonly" in valkey["spec"]["template"]["spec"]["containers"][0]["args"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["stringData"]["QUOTAGATE_ADMIN_TOKEN"] == ""  # no usable default token


async def test_a_configmap_update_is_reloaded(make_gateway) -> None:
    """The kubelet updates a mounted ConfigMap as its atomic writer does: the files are
    symlinks through ``..data`` to a timestamped directory, and an update writes a new
    directory and swaps ``..data`` in one rename. quotagate's poll sees it and reloads."""
    import asyncio
    import os

    from quotagate.gateway.app import STATE
    from tests.helpers import env

    gw = await make_gateway({"shop": env()}, reload_poll_ms=100)
    runtime = gw.app[STATE].runtime
    etc = runtime.config.files[0].parent
    names = [p.name for p in etc.iterdir() if p.suffix == ".yaml"]

    def publish(version: str, overage: bool) -> None:
        d = etc / f"..2026_12_07_{version}"
        d.mkdir()
        for name in names:
            text = (etc / name).read_text()
            if name == "environments.yaml":
                data = yaml.safe_load(text)
                data["environments"]["shop"]["overage"] = overage
                text = yaml.safe_dump(data)
            (d / name).write_text(text)
        os.symlink(d.name, etc / "..data_tmp")
        os.replace(etc / "..data_tmp", etc / "..data")  # the swap, atomic

    publish("1", False)
    for name in names:  # the mount's layout: each file a symlink through ..data
        (etc / name).unlink()
        os.symlink(f"..data/{name}", etc / name)
    for _ in range(100):  # (the first poll sees new files with the same content)
        await asyncio.sleep(0.05)
        if not await runtime.files_changed():
            break
    assert runtime.config.environments.environments["shop"].overage is False
    publish("2", True)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if runtime.config.environments.environments["shop"].overage:
            break
    assert runtime.config.environments.environments["shop"].overage is True
