"""The limiter's parts built one by one, as limiter.Limiter wires them, for the tests of each
part on its own (test_calls, test_decision, test_settling, test_writeback, test_forwarding)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aredis

from quotagate.common.addresses import StoreAddress
from quotagate.common.clock import Clock
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.cluster import ClusterStore
from quotagate.limiter.decision import Decider
from quotagate.limiter.forwarding import EventForwarder
from quotagate.limiter.leases import Leases
from quotagate.limiter.settling import Settler
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import sync_environments
from quotagate.limiter.writeback import WriteBack
from quotagate.settings import Config

INSTANCE = "parts-1"


@dataclass
class Parts:
    calls: ScriptCalls
    decider: Decider
    writeback: WriteBack
    settler: Settler
    leases: Leases
    events: EventForwarder
    #: What the parts reported: envs found missing, envs with events to forward.
    missing: list[str] = field(default_factory=list)
    with_events: list[str] = field(default_factory=list)

    async def close(self) -> None:
        await self.writeback.stop()
        await self.leases.stop()
        await self.settler.stop()
        await self.calls.store.close()


async def build(store_url: str, config: Config | None, clock: Clock,
                instance: str = INSTANCE,
                store: PipelinedStore | ClusterStore | None = None) -> Parts:
    """The parts on the store at ``store_url`` (``config`` synced there first), or on the
    cluster ``store`` given (its environments synced by the caller)."""
    if config is not None and store is None:
        client = aredis.Redis.from_url(store_url)
        try:
            await sync_environments(client, config)
        finally:
            await client.aclose()
    if store is None:
        store = PipelinedStore(StoreAddress.from_url(store_url), timeout_ms=200,
                               connect_timeout_ms=200, retry_interval_ms=100)
    calls = ScriptCalls(store)
    missing: list[str] = []
    with_events: list[str] = []
    events = EventForwarder(calls, instance, clock)
    decider = Decider(calls, instance, 15_000, 100, missing.append, with_events.append)
    writeback = WriteBack(calls, decider, missing.append)
    settler = Settler(calls, clock, instance, "enforce", writeback, with_events.append)
    leases = Leases(calls, clock, instance, 15_000, 5_000, settler)
    return Parts(calls, decider, writeback, settler, leases, events, missing, with_events)


async def command_calls(client: aredis.Redis, command: str) -> int:
    """How many times the server ran ``command`` since its last ``CONFIG RESETSTAT``."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
