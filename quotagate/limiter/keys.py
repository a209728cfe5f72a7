"""Every store key quotagate writes, built in this one module.

All keys of one environment carry the hash tag ``{env}``, so one script touches one Redis Cluster
slot. ``env`` must already be validated
(``common.envids.ENV_ID``) before it reaches any function here.
"""

from __future__ import annotations

PREFIX = "qg"


def entitlements(env: str) -> str:
    """String, JSON: the environment's plan limits, calendar, packs and promos (one snapshot)."""
    return f"{PREFIX}:{{{env}}}:ent"


def qps(env: str) -> str:
    """String: GCRA theoretical arrival time of the environment's next request (ms since 2020)."""
    return f"{PREFIX}:{{{env}}}:qps"


def bandwidth(env: str) -> str:
    """String: the end of the environment's last leased slot of bandwidth, µs since 2020
    (store clock): bandwidth.lua hands out slots one after another from here."""
    return f"{PREFIX}:{{{env}}}:bw"


def usage(env: str) -> str:
    """Hash: ``<cycle_start_day>:<meter>`` -> amount used from the plan quota in that cycle."""
    return f"{PREFIX}:{{{env}}}:usage"


def pack_usage(env: str) -> str:
    """Hash: ``<pack_id>`` -> amount used from that resource pack (packs have stable ids)."""
    return f"{PREFIX}:{{{env}}}:packs"


def payg(env: str) -> str:
    """Hash: ``<local_day>:<meter>`` -> pay-as-you-go amount of that day (billed the next day);
    ``…:<meter>:shadow`` and ``…:<meter>:unbilled`` -> beyond quota in shadow mode / written
    back after a store outage with overage off (recorded, never billed)."""
    return f"{PREFIX}:{{{env}}}:payg"


def slots(env: str) -> str:
    """Hash: ``<instance>|<slot>`` -> concurrency slots an instance holds (realtime watches
    ``rt:``, invocations of a function ``fn:<name>``); ``=<slot>`` -> total of live instances."""
    return f"{PREFIX}:{{{env}}}:slots"


def lease(env: str) -> str:
    """Sorted set: instance -> store-clock ms (since 2020) its slots are held until."""
    return f"{PREFIX}:{{{env}}}:lease"


def hot(env: str) -> str:
    """Hash: the leases of a hot environment's budget, instance -> its lease (JSON), and
    ``x:<instance>|<id>`` -> a lease that ended without a word from its instance (common.lua)."""
    return f"{PREFIX}:{{{env}}}:hot"


def days(env: str) -> str:
    """Hash "<local day>:<meter>" -> what that day used of a cumulative meter (plan, packs and
    beyond), the last 32 days (the usage report's ``days``); expires 40 days after its last
    day of use."""
    return f"{PREFIX}:{{{env}}}:days"


def alerts(env: str) -> str:
    """Hash: ``<cycle_day>:<meter>:<level>`` -> when that quota alert fired (once a cycle)."""
    return f"{PREFIX}:{{{env}}}:alerts"


def env_events(env: str) -> str:
    """Stream: events written by the scripts for this environment, until the gateway moves
    them to ``EVENTS`` (a script can only write its own environment's slot)."""
    return f"{PREFIX}:{{{env}}}:events"


def queue(env: str) -> str:
    """List: asynchronous invocations that arrived while the environment was isolated (JSON),
    replayed when it is renewed."""
    return f"{PREFIX}:{{{env}}}:queue"


def lifecycle_claim(env: str, what: str) -> str:
    """String: a lifecycle transition or reminder done (by whichever instance claimed it)."""
    return f"{PREFIX}:{{{env}}}:lc:{what}"


def forward_lock(env: str) -> str:
    """String: the instance moving this environment's events to ``EVENTS`` right now."""
    return f"{PREFIX}:{{{env}}}:fwd"


#: Stream: every event (alerts, lifecycle, purchases); consumers read it with a group.
EVENTS = f"{PREFIX}:events"


def moved(event_id: str) -> str:
    """String, kept a day: this environment event (``<env>/<stream id>``) is on ``EVENTS``
    already. Its hash tag is the global stream's whole name, so it lives in that stream's
    slot (a key without braces hashes whole) and one script sets it with the move."""
    return f"{PREFIX}:moved:{{{EVENTS}}}:{event_id}"


def decision_keys(env: str) -> list[str]:
    """KEYS of decide.lua, in its order."""
    tag = f"{PREFIX}:{{{env}}}:"
    return [tag + "ent", tag + "qps", tag + "usage", tag + "packs", tag + "payg",
            tag + "slots", tag + "lease", tag + "alerts", tag + "events", tag + "hot",
            tag + "days"]


def settle_keys(env: str) -> list[str]:
    """KEYS of settle.lua, in its order."""
    tag = f"{PREFIX}:{{{env}}}:"
    return [tag + "ent", tag + "usage", tag + "packs", tag + "payg", tag + "slots",
            tag + "lease", tag + "alerts", tag + "events", tag + "hot", tag + "days"]


def seen(env: str, record_id: str) -> str:
    """String: an ingested usage record's idempotency key (``record_id`` validated)."""
    return f"{PREFIX}:{{{env}}}:seen:{record_id}"


def renew_keys(env: str) -> list[str]:
    """One environment's KEYS of renew.lua, in its order."""
    tag = f"{PREFIX}:{{{env}}}:"
    return [tag + "ent", tag + "slots", tag + "lease"]


def env_keys(env: str) -> list[str]:
    """The keys of an environment's state (release deletes them, but its pay-as-you-go)."""
    return [*decision_keys(env), bandwidth(env)]


#: Set: environments whose entitlements were written from environments.yaml (not env-scoped).
FILE_OWNED_ENVS = f"{PREFIX}:envs:file"
#: String: the digest of the file's environments (and plans, time zone, snapshot format)
#: whose snapshots are all written (sync.file_digest); absent while a write is under way.
FILE_DIGEST = f"{PREFIX}:envs:file:digest"
#: Set: environments created through the admin API (their records live in the store).
API_OWNED_ENVS = f"{PREFIX}:envs:api"


def definition(env: str) -> str:
    """String, JSON: an API-owned environment's record (the Environment of the config schema)."""
    return f"{PREFIX}:{{{env}}}:def"


#: Shards of the due index: an environment's shard by ``zlib.crc32`` of its id.
DUE_SHARDS = 16


def due(shard: int) -> str:
    """Sorted set, one per shard: environment -> the store-clock epoch ms it next has
    lifecycle work (a reminder, an expiry, a renewal, a queued invocation, a day's capacity,
    events left in its stream). Its hash tag is the shard's, so shards spread over a
    cluster's nodes and one script reads and writes one of them."""
    return f"{PREFIX}:due:{{d{shard}}}"


def due_claim(shard: int) -> str:
    """String: the instance working through a shard of the due index right now."""
    return f"{PREFIX}:due:{{d{shard}}}:claim"


#: String: every API-owned environment stored before the due index existed is in it.
DUE_COMPLETE = f"{PREFIX}:due:complete"
