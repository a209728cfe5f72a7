"""The same scripts on a real three-node Valkey Cluster: every key of an environment hashes to
one slot ({env} tag), so the sync and the decision script run there unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from quotagate.limiter import keys
from quotagate.limiter.embedded import free_port, valkey_binary
from quotagate.limiter.limiter import Decision
from quotagate.limiter.scripts import DECIDE
from quotagate.limiter.sync import sync_environments
from quotagate.settings.schema import Environment
from tests.helpers import at, env, write_config


@contextlib.contextmanager
def valkey_cluster(directory: Path, nodes: int, replicas: int, *extra: str
                   ) -> Iterator[tuple[list[int], dict[int, subprocess.Popen[bytes]], str]]:
    """A real Valkey Cluster of ``nodes`` (``replicas`` per primary) on free ports, formed and
    ``cluster_state:ok``: (ports, process per port, valkey-cli). Killed at the end."""
    server = valkey_binary()
    cli = str(Path(server).with_name("valkey-cli"))
    procs: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for _ in range(nodes):
            port, proc = start_node(
                lambda port, d: [server, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                 str(d), "--cluster-enabled", "yes", "--cluster-config-file",
                                 "nodes.conf", "--save", "", "--appendonly", "no",
                                 "--logfile", str(d / "valkey.log"), *extra],
                lambda port: [cli, "-p", str(port), "PING"], directory, procs)
            procs[port] = proc
        ports = list(procs)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for port in ports:
            _wait(cli, port, "CLUSTER INFO", "cluster_state:ok", timeout=30)
        yield ports, procs, cli
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with valkey_cluster(tmp_path_factory.mktemp("cluster"), 3, 0) as (ports, _, _):
        yield ports


def start_node(command: Callable[[int, Path], list[str]], ping: Callable[[int], list[str]],
               directory: Path, taken: Collection[int]) -> tuple[int, subprocess.Popen[bytes]]:
    """One cluster node answering PING: ``command(port, its directory)`` starts it (logging to
    ``valkey.log`` there), ``ping(port)`` asks it. A free port can be taken before the node
    binds it (or its bus port, +10000) by any connection of a busy machine: a node that exits
    at start is started again on other ports; its log says why if it never does."""
    log = ""
    for _ in range(5):
        port = _node_port()
        if {port, port + 10000} & {*taken, *(p + 10000 for p in taken)}:
            continue
        d = directory / f"node{port}"
        d.mkdir(parents=True)
        proc = subprocess.Popen(command(port, d), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            out = subprocess.run(ping(port), capture_output=True, text=True)
            if out.stdout.strip() == "PONG":
                return port, proc
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log = (d / "valkey.log").read_text(errors="replace")[-2000:] \
            if (d / "valkey.log").exists() else ""
    raise AssertionError(f"no cluster node would start; the last one's log:\n{log}")


def _node_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _wait(cli: str, port: int, command: str, expect: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([cli, "-p", str(port), *command.split()], capture_output=True,
                             text=True)
        if expect in out.stdout:
            return
        time.sleep(0.1)
    raise AssertionError(f"node {port}: no {expect!r} after {timeout} s")


def test_environment_keys_share_one_slot():
    from redis.crc import key_slot

    for env_id in ("shop", "a", "x-1", "z" * 63):
        slots = {key_slot(k.encode()) for k in keys.env_keys(env_id)}
        assert len(slots) == 1


async def test_decide_runs_unchanged_on_a_cluster(cluster, tmp_path: Path):
    ids = [f"tenant-{i}" for i in range(12)]  # spread over the three nodes' slots
    config = write_config(tmp_path, {i: env(limits={"calls": 40, "qps": 1_000_000})
                                     for i in ids})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0], max_connections=64)
    gate = asyncio.Semaphore(48)
    try:
        await rc.initialize()
        nodes = {rc.get_node_from_key(keys.entitlements(i)).name for i in ids}
        assert len(nodes) == 3
        await sync_environments(rc, config)
        await rc.script_load(DECIDE.body)
        now = str(at("2026-11-26T12:00:00").now_ms())

        async def decide(env_id: str) -> Decision:
            async with gate:
                names = keys.decision_keys(env_id)
                reply = await rc.evalsha(DECIDE.sha, len(names), *names, now, "function", 1,
                                         "enforce", 100, "fn:f", "i1", 15000, "gbs")
            return Decision.from_reply(reply)

        results = await asyncio.gather(*(decide(i) for i in ids for _ in range(50)))
        for n, env_id in enumerate(ids):
            mine = results[n * 50:(n + 1) * 50]
            assert sum(d.admitted for d in mine) == 40, env_id
        # Each node holds exactly the keys of its environments: nothing crossed a slot.
        for env_id in ids:
            node = rc.get_node_from_key(keys.usage(env_id))
            direct = aredis.Redis(host=node.host, port=node.port)
            # ent, qps, usage, slots, lease (40 invocations still held), alerts and events
            # (80, 90 and 100 % of the 40 calls), days (today's 40)
            assert await direct.exists(*keys.decision_keys(env_id)) == 8
            assert await direct.xlen(keys.env_events(env_id)) == 3
            assert await direct.hget(keys.slots(env_id), "=fn:f") == b"40"
            await direct.aclose()
    finally:
        await rc.aclose()


async def test_limiter_on_cluster_store_follows_moved(cluster, tmp_path: Path):
    """The gateway's own client: decisions routed by slot; a stale slot map is corrected by
    MOVED replies and exactness holds."""
    from quotagate.common.addresses import StoreAddress
    from quotagate.limiter.cluster import ClusterStore
    from quotagate.limiter.limiter import Limiter

    ids = [f"moved-{i}" for i in range(12)]  # the module shares one cluster
    config = write_config(tmp_path, {i: env(limits={"calls": 25, "qps": 1_000_000})
                                     for i in ids})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    await sync_environments(rc, config)
    await rc.aclose()
    store = ClusterStore(StoreAddress(port=cluster[1]), timeout_ms=500)
    lim = Limiter(store, clock=at("2026-11-26T12:00:00"))
    try:
        await store.refresh()
        true_map = list(store.slots)
        store.slots = [("127.0.0.1", cluster[0])] * len(store.slots)  # stale: all on node 0
        results = await asyncio.gather(*(lim.decide(i, "function", 1)
                                         for i in ids for _ in range(40)))
        for n, env_id in enumerate(ids):
            mine = results[n * 40:(n + 1) * 40]
            assert sum(d.outcome.name == "ADMITTED" for d in mine) == 25, env_id
            assert not any(d.store_bypassed for d in mine)
        await asyncio.sleep(0.1)  # the background refresh after MOVED
        assert store.slots == true_map
        assert await lim.scripts_loaded()  # on every primary
    finally:
        await lim.close()


async def test_gateway_with_store_cluster(cluster, tmp_path: Path):
    from aiohttp.test_utils import TestClient, TestServer

    from quotagate.control.admin import init_admin_app
    from quotagate.demo.upstream import make_upstream_app
    from quotagate.gateway.app import STATE, init_app

    upstream = TestServer(make_upstream_app())
    await upstream.start_server()
    config = write_config(
        tmp_path, {"shop": env(limits={"calls": 2})},
        store={"url": f"redis://127.0.0.1:{cluster[2]}/0", "cluster": True},
        routes=[{"prefix": "/functions/", "upstream": f"http://127.0.0.1:{upstream.port}",
                 "kind": "function"}])
    gw = TestClient(TestServer(init_app(config, config.gateway.store.url,
                                        at("2026-11-26T12:00:00"))))
    await gw.start_server()
    admin = TestClient(TestServer(init_admin_app(gw.app[STATE].runtime)))
    await admin.start_server()
    try:
        statuses = [(await gw.get("/functions/x", headers={"X-CloudBase-Env": "shop"})).status
                    for _ in range(3)]
        assert statuses == [200, 200, 429]
        ready = await admin.get("/readyz")
        assert ready.status == 200, await ready.text()
    finally:
        await admin.close()
        await gw.close()
        await upstream.close()


async def test_admin_changes_on_a_cluster(cluster, tmp_path: Path):
    """API-owned environments on a cluster: the record and snapshot share the env's slot, so
    the optimistic transaction runs there; ownership lives in another slot."""
    from quotagate.control.envs import Environments

    config = write_config(tmp_path, {"filed": env()})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    try:
        await rc.initialize()
        await sync_environments(rc, config)
        envs = Environments(rc, lambda: config, at("2026-11-26T12:00:00"))  # type: ignore[arg-type]
        for i in range(6):  # several slots / nodes
            e = f"api-{i}"
            await envs.put(e, msgspec.convert(
                {"plan": "personal", "anchor": "2026-11-01", "expires": "2027-11-01"},
                Environment))
            await envs.set_overage(e, True)
            grant = await envs.buy_pack(e, "calls-10m")
            assert (await envs.get(e)).env.overage is True
            await envs.refund_pack(e, grant.id)
            assert (await envs.get(e)).env.packs == ()
        owners = await envs.ids()
        assert owners["filed"] == "file" and sum(o == "api" for o in owners.values()) == 6
    finally:
        await rc.aclose()


async def test_lease_renewal_is_one_write_per_node(cluster, tmp_path: Path, monkeypatch):
    """10,000 environments holding a watch each: a renewal is one script call per hash slot
    (a script touches one slot), all sent in one socket write per primary and answered in
    one round trip; each renewal keeps every slot."""
    from quotagate.common.addresses import StoreAddress
    from quotagate.limiter import cluster as cluster_module
    from quotagate.limiter.cluster import ClusterStore
    from quotagate.limiter.limiter import Limiter

    # No periodic slot-map refresh in the middle of a measured renewal on a slow machine.
    monkeypatch.setattr(cluster_module, "REFRESH_EVERY_S", 3600.0)
    ids = [f"lease-{i}" for i in range(10_000)]
    config = write_config(tmp_path, {i: env(limits={"realtime": 5}) for i in ids})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    await sync_environments(rc, config)
    await rc.aclose()
    store = ClusterStore(StoreAddress(port=cluster[0]), timeout_ms=5000,
                         connect_timeout_ms=2000)
    lim = Limiter(store, clock=at("2026-11-26T12:00:00"))
    try:
        await store.refresh()
        for start in range(0, len(ids), 1000):
            decided = await asyncio.gather(*(lim.decide(i, "realtime", 1, "rt:")
                                             for i in ids[start:start + 1000]))
            assert all(d.admitted and d.slot_held for d in decided)
        timings = []
        for _ in range(3):
            writes = {w: n.writes for w, n in store.nodes.items()}
            calls = lim.renew_commands
            started = time.perf_counter()
            statuses = await lim.renew()
            timings.append(time.perf_counter() - started)
            assert len(statuses) == len(ids) and set(statuses.values()) == {0}
            per_node = {w: n.writes - writes.get(w, 0) for w, n in store.nodes.items()}
            primaries = {w for w in store.slots if w is not None}
            assert {w: per_node.get(w, 0) for w in primaries} == dict.fromkeys(primaries, 1)
        print(f"\nrenewal of 10,000 environments on 3 primaries: "
              f"{lim.renew_commands - calls} script calls, 1 write per primary, "
              f"median {sorted(timings)[1] * 1000:.0f} ms")
    finally:
        await lim.close()


async def test_settles_are_one_call_per_node_and_follow_a_moved_slot(cluster, tmp_path: Path,
                                                                     monkeypatch):
    """What finished in one loop iteration over 30 environments spread over the 3 primaries:
    one settle_many call per primary. With a stale slot map (every slot on one node), that
    node settles the environments it serves and answers "not here" for the others, which
    are then sent on their own (MOVED followed): each counted exactly once."""
    from quotagate.common.addresses import StoreAddress
    from quotagate.common.calendar import day_number
    from quotagate.limiter import cluster as cluster_module
    from quotagate.limiter.cluster import ClusterStore
    from tests.helpers import local, until
    from tests.parts import build

    monkeypatch.setattr(cluster_module, "REFRESH_EVERY_S", 3600.0)
    ids = [f"settle-{i}" for i in range(30)]
    config = write_config(tmp_path, {i: env() for i in ids})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    await sync_environments(rc, config)
    nodes = [aredis.Redis(port=p) for p in cluster]
    store = ClusterStore(StoreAddress(port=cluster[0]), timeout_ms=2000)
    clock = at("2026-11-26T12:00:00")
    parts = await build("", None, clock, store=store)
    cycle = day_number(local("2026-11-26T12:00:00").date().replace(day=1))  # (as env() buys)
    try:
        await store.refresh()
        await parts.calls.load_scripts()
        true_map = list(store.slots)
        serving = {store.node_of(parts.calls.key_slot(i)) for i in ids}
        assert len(serving) == 3
        for n in nodes:
            await n.config_resetstat()
        for n, env_id in enumerate(ids):
            parts.settler.queue(env_id, None, "gbs", n + 1)

        async def all_settled() -> bool:
            return all([await rc.hexists(keys.usage(i), f"{cycle}:gbs") for i in ids])

        await until(all_settled)

        async def fcalls() -> list[int]:
            stats = [await n.info("commandstats") for n in nodes]
            return [int(s.get("cmdstat_fcall", {}).get("calls", 0)) for s in stats]

        assert await fcalls() == [1, 1, 1]
        for n, env_id in enumerate(ids):
            assert int(await rc.hget(keys.usage(env_id), f"{cycle}:gbs")) == n + 1, env_id

        store.slots = [("127.0.0.1", cluster[0])] * len(store.slots)  # stale: all on node 0
        for env_id in ids:
            parts.settler.queue(env_id, None, "gbs", 100)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if all([int(await rc.hget(keys.usage(i), f"{cycle}:gbs")) > n + 1
                    for n, i in enumerate(ids)]):
                break
        await asyncio.sleep(0.3)  # and nothing twice after that
        for n, env_id in enumerate(ids):
            assert int(await rc.hget(keys.usage(env_id), f"{cycle}:gbs")) == n + 101, env_id
        assert not parts.writeback.backlog.pending
        assert store.slots == true_map  # MOVED: the map read again
    finally:
        await parts.close()
        await rc.aclose()
        for n in nodes:
            await n.aclose()
