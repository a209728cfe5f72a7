"""TLS to the store (issue 13): ``rediss://`` with a CA file and a client certificate, against
a real TLS-enabled Redis 7 (Debian's redis-server, ``tls-port``, clients must present a
certificate) with a CA this test makes. Through ``quotagate serve``: the hot path and the
control plane (``env put``, usage) both speak TLS; a store whose certificate the CA did not
sign is refused."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from quotagate.common.addresses import StoreAddress
from quotagate.limiter.embedded import free_port
from quotagate.limiter.errors import StoreUnavailable
from quotagate.limiter.store import PipelinedStore
from tests.deployed import days, serve, shipped_config, start_upstream

pytestmark = pytest.mark.deployed


def certificates(directory: Path) -> list[str]:
    """A CA this test makes, a server certificate for 127.0.0.1 and a client one, as files;
    returns the redis-server arguments that serve TLS only and ask clients for theirs."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for name, holder in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                         ("client", ca.issue_cert("quotagate"))):
        holder.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
        holder.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    return ["--port", "0", "--bind", "127.0.0.1",
            "--tls-cert-file", str(directory / "server.pem"),
            "--tls-key-file", str(directory / "server.key"),
            "--tls-ca-cert-file", str(directory / "ca.pem"), "--tls-auth-clients", "yes",
            "--save", "", "--appendonly", "no"]


def store_tls(directory: Path) -> dict[str, str]:
    """gateway.yaml's store.tls for those files."""
    return {"ca_file": str(directory / "ca.pem"), "cert_file": str(directory / "client.pem"),
            "key_file": str(directory / "client.key")}


@pytest.fixture
def tls_store(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    server = shutil.which("redis-server")
    assert server, "redis-server (Debian's, built with TLS) is needed"
    port = free_port()
    proc = subprocess.Popen(
        [server, *certificates(tmp_path), "--tls-port", str(port), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port, tmp_path
    proc.kill()
    proc.wait()


async def test_the_gateway_and_its_control_plane_speak_tls_to_the_store(tls_store, tmp_path):
    port, certs = tls_store
    upstream, origin = start_upstream()
    directory = tmp_path / "gw"
    config = shipped_config(directory, origin, store={
        "url": f"rediss://127.0.0.1:{port}", "tls": store_tls(certs)})
    deployed = await serve(directory, config)
    try:
        deployed.put_env("secure", f"plan: standard\nanchor: {days(-1)}\nexpires: {days(300)}\n")
        url = deployed.route("function") + "f"
        assert await deployed.get(url, "secure", 3) == [200] * 3
        usage = deployed.json("env", "usage", "secure")
        assert usage["meters"]["calls"]["used"] == 3
    finally:
        log = deployed.stop()
        upstream.kill()
        upstream.wait()
    assert "bypass" not in log.lower(), log  # every decision was made in the store


async def test_a_store_the_ca_did_not_sign_is_refused(tls_store):
    port, certs = tls_store
    other = trustme.CA()
    other.cert_pem.write_to_path(str(certs / "other-ca.pem"))
    address = StoreAddress.from_url(f"rediss://127.0.0.1:{port}").with_tls(
        str(certs / "other-ca.pem"), str(certs / "client.pem"), str(certs / "client.key"))
    store = PipelinedStore(address, timeout_ms=1000, connect_timeout_ms=1000)
    with pytest.raises(StoreUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        await store.execute("PING")
    await store.close()
    good = PipelinedStore(address.with_tls(str(certs / "ca.pem"), str(certs / "client.pem"),
                                           str(certs / "client.key")), timeout_ms=1000,
                          connect_timeout_ms=1000)
    assert await good.execute("PING") == b"PONG"
    await good.close()


async def test_a_tls_cluster_serves_the_gateway(tmp_path: Path):
    """Three Redis 7 cluster nodes speaking only TLS (``tls-cluster yes``, clients must
    present a certificate): every node the gateway reaches verifies, decisions and the
    control plane alike."""
    from tests.test_cluster import start_node

    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    assert server and cli
    tls_args = certificates(tmp_path)
    cli_tls = [cli, "--tls", "--cacert", str(tmp_path / "ca.pem"),
               "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key")]
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    upstream, origin = start_upstream()
    deployed = None
    try:
        for _ in range(3):
            port, proc = start_node(
                lambda port, d: [server, *tls_args, "--tls-port", str(port), "--tls-cluster",
                                 "yes", "--cluster-enabled", "yes", "--cluster-config-file",
                                 "nodes.conf", "--dir", str(d), "--logfile",
                                 str(d / "valkey.log")],
                lambda port: [*cli_tls, "-p", str(port), "PING"], tmp_path, ports)
            ports.append(port)
            procs.append(proc)
        subprocess.run([*cli_tls, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in ports:
            deadline = time.monotonic() + 20
            while "cluster_state:ok" not in subprocess.run(
                    [*cli_tls, "-p", str(port), "CLUSTER", "INFO"], capture_output=True,
                    text=True).stdout:
                assert time.monotonic() < deadline, "the TLS cluster did not form"
                time.sleep(0.1)
        directory = tmp_path / "gw"
        config = shipped_config(directory, origin, store={
            "url": f"rediss://127.0.0.1:{ports[0]}", "cluster": True,
            "tls": store_tls(tmp_path)})
        deployed = await serve(directory, config)
        envs = [f"tls-{i}" for i in range(6)]  # on more than one node
        for env_id in envs:
            deployed.put_env(env_id, f"plan: standard\nanchor: {days(-1)}\n"
                                     f"expires: {days(300)}\n")
            assert await deployed.get(deployed.route("function") + "f", env_id, 2) == [200] * 2
        for env_id in envs:
            assert deployed.json("env", "usage", env_id)["meters"]["calls"]["used"] == 2
    finally:
        if deployed is not None:
            log = deployed.stop()
            assert "bypass" not in log.lower(), log
        upstream.kill()
        upstream.wait()
        for p in procs:
            p.kill()
            p.wait()
