"""Typed shape of the three config files (gateway.yaml, plans.yaml, environments.yaml).

Data only: msgspec Structs that refuse unknown keys. Cross-field rules live in
``quotagate.settings.load``, which reports every failure with the file, the key path and the
reason.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

EnforcementMode = Literal["enforce", "shadow", "off"]
StorePolicy = Literal["open", "closed"]
RouteKind = Literal["function", "database", "storage", "static", "ai", "sms", "realtime", "auth",
                    "action"]
#: What an action endpoint's request is counted as, by its body's ``action`` (the part before
#: the first dot): the platform SDKs' ``/web`` and ``/admin`` endpoints (docs/config.md).
ACTION_KINDS = {"functions": "function", "database": "database", "storage": "storage",
                "auth": "auth"}

#: Cumulative meters, counted per billing cycle (SPEC §3).
CUMULATIVE_METERS = (
    "calls",
    "gbs",
    "outbound_bytes",
    "storage_traffic_bytes",
    "cdn_origin_bytes",
    "ai_tokens",
    "sms",
)
#: Meters whose use beyond plan + packs goes to pay-as-you-go (overage on): each needs a list
#: price in plans.yaml (SMS beyond its packs is charged as calls, SPEC §5).
PAYG_METERS = (
    "calls",
    "gbs",
    "storage_traffic_bytes",
    "outbound_bytes",
    "cdn_origin_bytes",
    "ai_tokens",
    "capacity_bytes",
)
#: Meters a resource pack may top up (SPEC §5).
PACK_METERS = ("calls", "capacity_bytes", "sms")
PackMeter = Literal["calls", "capacity_bytes", "sms"]
Meter = Literal[
    "calls",
    "gbs",
    "outbound_bytes",
    "storage_traffic_bytes",
    "cdn_origin_bytes",
    "ai_tokens",
    "sms",
    "capacity_bytes",
]

#: Every amount and limit: the store's Lua counts in doubles, exact up to 2^53 - 1.
MAX_EXACT = 2**53 - 1
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXACT)]
PosInt = Annotated[int, msgspec.Meta(gt=0, le=MAX_EXACT)]
#: Quotas given in GB or GBs are counted in bytes and MB·ms: bounded so that stays exact too.
GbInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXACT // 1024**3)]
GbsInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_EXACT // (1024 * 1000))]
#: A function's memory (MB, at most 1 TiB): memory x run ms is counted exactly for years.
MemoryMb = Annotated[int, msgspec.Meta(gt=0, le=1024 * 1024)]
Money = Annotated[str, msgspec.Meta(pattern=r"^\d+(\.\d+)?$")]
HostPort = Annotated[str, msgspec.Meta(pattern=r"^[^:\s]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")]
#: A listener that may be off ("").
OptionalHostPort = Annotated[
    str, msgspec.Meta(pattern=r"^$|^[^:\s]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True,
              gc=False):
    """Config data: frozen, and untracked by the cyclic garbage collector (``gc=False``: a
    tree of values never forms a cycle), so that 10^5 environments are not walked by every
    full collection of a running gateway (~0.1 s each, with every request waiting)."""


# ---------------------------------------------------------------------------- gateway.yaml


class StoreTls(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """TLS to the store (``rediss://``): the server is always verified, against ``ca_file``
    (else the system's CAs), and its certificate must name the URL's host."""

    #: PEM file of the CA(s) that signed the store's certificate (relative to gateway.yaml).
    ca_file: str = ""
    #: PEM client certificate and its key, for stores that ask for one (tls-auth-clients).
    cert_file: str = ""
    key_file: str = ""


class StoreSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: redis://, rediss:// or unix:// URL of Redis >= 6.2 / Valkey. Empty: embedded Valkey.
    url: str = ""
    #: Longest a request waits on the store before the failure policy applies.
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200
    #: Longest a (re)connection attempt may take.
    connect_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=30_000)] = 500
    #: After a failed connection, requests fail fast this long before the next attempt.
    retry_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 250
    #: The URL names one node of a Redis / Valkey Cluster; the others are discovered.
    cluster: bool = False
    #: Embedded Valkey only: where its append-only files live (relative to gateway.yaml).
    data_dir: str = "data"
    #: ``rediss://`` only: the CA and client certificate files.
    tls: StoreTls = msgspec.field(default_factory=StoreTls)
    #: Keep the fail-open backlog in a local journal too, so a gateway killed during an
    #: outage writes it back at its next start (in ``journal_dir``; "": ``data_dir``/journal).
    journal: bool = True
    journal_dir: str = ""


class UpstreamSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    connect_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 2_000
    #: Longest silence while reading the upstream's response (SSE streams keep it alive).
    read_timeout_ms: Annotated[int, msgspec.Meta(ge=1)] = 60_000
    #: Pooled keep-alive connections per upstream host.
    pool_size: PosInt = 256


class ClientSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What each listener allows a client connection (slow and idle clients): the public
    listener, and the private ones (``authz_listen``, ``authz.grpc_listen``,
    ``admin_listen``)."""

    #: A connection must send a complete request head within this long of opening or of the
    #: end of its previous response, else it is closed: this bounds idle keep-alive sockets and
    #: slow (slowloris) header senders alike, on every listener. On ``authz.grpc_listen``: the
    #: HTTP/2 preface and the first call's headers, and each call's request message.
    header_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 15_000
    #: A body the gateway reads before deciding (action endpoints, stream probes, queued
    #: invocations) must arrive within this long, else 408.
    body_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 30_000
    #: Open client connections per instance (each worker); one more is answered 503 and
    #: closed. 0: derived from the descriptor limit (half of it, less 64 in reserve: each
    #: client may need an upstream socket too).
    max_connections: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    #: Open connections on ``authz_listen`` per instance (each worker); one more is answered
    #: 503 and closed. 0: an eighth of the descriptor budget (the limit less 64), at least 16.
    authz_max_connections: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    #: Open connections on ``authz.grpc_listen`` per instance (each worker); one more is sent
    #: GOAWAY and closed. 0: an eighth of the descriptor budget, at least 16.
    grpc_max_connections: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    #: Open connections on ``admin_listen`` (worker 0); one more is answered 503 and closed.
    #: 0: a thirty-second of the descriptor budget, at least 16.
    admin_max_connections: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    #: ``authz.grpc_listen``: a connection with no call open for this long is sent GOAWAY and
    #: closed (gRPC's max-connection-idle); one with a call open is pinged at this pace and
    #: closed when a ping goes unanswered for 20 s. 0: ``header_timeout_ms``.
    grpc_idle_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 0


#: Meters the gateway counts itself after a response (SPEC §3): a route's ``meter``.
RouteMeter = Literal["gbs", "storage_traffic_bytes", "outbound_bytes", "cdn_origin_bytes", "none"]
#: The function name from the path: the segment after the route's prefix.
FUNCTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
#: An action that may pass while the environment is isolated: a sign call of the ``auth``
#: group (nothing that runs, reads or writes the environment's resources).
IsolatedAction = Annotated[str, msgspec.Meta(pattern=r"^auth\.[A-Za-z][A-Za-z0-9_]{0,63}$")]


class Route(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    prefix: Annotated[str, msgspec.Meta(pattern=r"^/")]
    upstream: str
    kind: RouteKind
    #: Units one request costs: calls for most kinds, SMS messages for ``sms``. For realtime
    #: routes: what each watch (or socket, with ``realtime_unit: socket``) costs when opened.
    cost: NonNegInt = 1
    name: str = ""
    #: Only these methods match (empty: all).
    methods: tuple[str, ...] = ()
    #: Only requests whose Accept header contains this media type match (e.g. text/event-stream).
    accept: str = ""
    #: What the gateway meters after the response. Default by kind: ``function`` -> ``gbs``
    #: (memory x run time), ``storage`` and ``static`` -> ``storage_traffic_bytes`` (response
    #: bytes), others none.
    meter: RouteMeter | None = None
    #: Function routes: memory of a function in MB, for GBs (environments may set it per
    #: function).
    memory_mb: MemoryMb = 256
    #: Function routes: hold one concurrency slot per invocation (SPEC §9).
    concurrency: bool = True
    #: Realtime routes: what takes a slot, each watch of the multiplexed protocol (SPEC §8) or
    #: each WebSocket.
    realtime_unit: Literal["watch", "socket"] = "watch"
    #: Realtime routes: refuse client frames that are not the watch protocol (else passed on).
    strict: bool = False
    #: Realtime routes: a socket whose upgrade named no environment must send LOGIN within
    #: this long; until then nothing goes upstream (no upstream socket is even opened).
    login_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=300_000)] = 10_000
    #: Realtime routes: largest WebSocket message accepted from either side.
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    #: The path must be the prefix itself (``/web``, realtime at ``/``), not merely start with it.
    exact: bool = False
    #: Action routes: the largest body read to find its ``action`` (a larger one is refused
    #: with 413 rather than guessed).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 6 * 1024 * 1024
    #: Action routes: ``auth.*`` actions that pass while the environment is isolated (or its
    #: plan has not started), at no cost and counted in QPS only — the store decides it
    #: (decide.lua) — and the route's free CORS preflights with them. Shipped:
    #: ``[auth.wsWebSign]``, js-sdk's realtime sign call: it opens nothing, and without it the
    #: SDK never opens the socket on which the gateway tells it the state (3050). Everything
    #: else of the environment stays refused (403); a released one too (404).
    pass_while_isolated: Annotated[tuple[IsolatedAction, ...], msgspec.Meta(max_length=16)] = ()
    #: What a request costs when it is a stream (SSE): decided on the request's intent
    #: (``Accept: text/event-stream``, ``"stream": true`` in its JSON body, ``?stream=true``),
    #: and if the response is a stream anyway the difference is charged after it. Default:
    #: 50 on ``ai`` routes (SPEC §3), else ``cost`` (no stream pricing).
    stream_cost: NonNegInt | None = None
    #: Routes with stream pricing: how much of the body is read to find ``"stream": true``
    #: (a longer body is forwarded as it comes and costs ``cost``, plus the difference after
    #: a streamed response). 0: the body is not read.
    stream_probe_bytes: Annotated[int, msgspec.Meta(ge=0, le=64 * 1024 * 1024)] = 1024 * 1024
    #: CORS preflights (OPTIONS with Origin and Access-Control-Request-Method, no body):
    #: ``free`` passes them on uncounted, ``charged`` counts them as requests of the route.
    preflight: Literal["free", "charged"] = "free"
    #: Plugin mode (``authz_listen``): a concurrency slot taken for a request of this route is
    #: leased for this long; the proxy's done call gives it back sooner. Without a done call
    #: (Envoy's rate limit service, a proxy that sends none) it ends here, and nothing is
    #: metered after the response.
    max_duration_ms: Annotated[int, msgspec.Meta(ge=1_000, le=86_400_000)] = 60_000


class LeaseSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: Slots (watches, invocations) of an instance that stops renewing come back after this.
    ttl_ms: Annotated[int, msgspec.Meta(ge=500, le=600_000)] = 15_000
    #: Each instance renews all its slots in one batched call this often (< ttl_ms / 2).
    renew_interval_ms: Annotated[int, msgspec.Meta(ge=100, le=300_000)] = 5_000


class EventSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: POST every event of the qg:events stream here as JSON ("" : no webhook).
    webhook_url: str = ""
    webhook_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=120_000)] = 5_000
    #: Attempts per event before it is left pending (claimed again ten minutes later).
    webhook_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    #: First retry delay, doubled each attempt (at most 30 s).
    webhook_retry_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 500
    #: The environment variable holding the signing secret (Standard Webhooks, ``whsec_…``):
    #: when it is set, every delivery carries webhook-id, webhook-timestamp and
    #: webhook-signature (HMAC-SHA256). "" : never signed.
    webhook_secret_env: str = "QUOTAGATE_WEBHOOK_SECRET"


class RateLimitDescriptors(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Plugin mode, Envoy's rate limit service: which descriptor entries name what."""

    #: Decide only requests of this domain ("" : any); others are answered OK, untouched.
    domain: str = ""
    #: The entry whose value is the environment id (Envoy: ``x-cloudbase-env``).
    env_key: str = "env"
    #: The entry holding the request's host (``:authority``): ``{env}.<domain>`` names the
    #: environment there, as on the HTTP front doors.
    host_key: str = "host"
    #: The entry holding the request's path (Envoy: a ``request_headers`` action on
    #: ``:path``): routed as the HTTP front doors route it (kind, cost, function, slot).
    path_key: str = "path"
    #: The entry holding the request's method (``:method``), for routes limited by method.
    method_key: str = "method"
    #: Without a path entry: the entry naming the route kind (the first route of that kind
    #: is used), and the function of a ``function`` kind.
    kind_key: str = "kind"
    function_key: str = "function"


class AuthzSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Plugin mode beyond the HTTP decision listener (``authz_listen``)."""

    #: Envoy's rate limit service (gRPC, ``envoy.service.ratelimit.v3``) listens here ("" :
    #: off).
    grpc_listen: OptionalHostPort = ""
    ratelimit: RateLimitDescriptors = msgspec.field(default_factory=RateLimitDescriptors)


class GatewaySettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    listen: HostPort = "127.0.0.1:8080"
    admin_listen: HostPort = "127.0.0.1:9090"
    #: Plugin mode: the decision service of nginx ``auth_request``, Traefik ForwardAuth and
    #: Envoy ``ext_authz`` (HTTP) listens here, with the done endpoint the proxy calls after
    #: each response ("" : off). Keep it private, as the admin listener.
    authz_listen: OptionalHostPort = ""
    authz: AuthzSettings = msgspec.field(default_factory=AuthzSettings)
    #: Environment id from the host ``{env}.<domain>`` or ``{env}.{region}.<domain>``, for each
    #: of these domains (as the platform SDKs address it); also from the ``env`` query
    #: parameter, the X-CloudBase-Env header and, on action routes, the body's env/envName.
    domains: tuple[str, ...] = ()
    #: One more domain (the single-domain form of earlier versions).
    domain: str = ""
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    on_store_failure: StorePolicy = "open"
    enforcement: EnforcementMode = "enforce"
    timezone: str = "Asia/Shanghai"
    #: GCRA burst tolerance: an env may send limit x burst/1000 + 1 requests at once.
    qps_burst_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 100
    #: Requests per second, on one instance, from which an environment is decided in memory
    #: from budgets leased from the store (hot environments; two periods of 100 ms in a row);
    #: 0: every request is decided by the store.
    hot_rate: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 2_000
    plans_file: str = "plans.yaml"
    environments_file: str = "environments.yaml"
    #: A directory of more environments files (``*.yaml``, ``*.yml``, ``*.json``), each of
    #: the environments file's shape; a reload parses again only the files that changed.
    environments_dir: str | None = None
    upstream: UpstreamSettings = msgspec.field(default_factory=UpstreamSettings)
    clients: ClientSettings = msgspec.field(default_factory=ClientSettings)
    leases: LeaseSettings = msgspec.field(default_factory=LeaseSettings)
    events: EventSettings = msgspec.field(default_factory=EventSettings)
    #: Environments whose decisions are counted per environment in /metrics (opt-in: the
    #: label's cardinality stays bounded).
    metrics_envs: Annotated[tuple[str, ...], msgspec.Meta(max_length=100)] = ()
    #: /metrics asks for the admin API's bearer token too (scrapers send it).
    metrics_auth: bool = False
    #: One JSON line per request on the public listener, to stderr (gateway/accesslog.py).
    access_log: bool = True
    #: Where those lines go instead of stderr: a file, appended to (relative to gateway.yaml),
    #: opened again at every reload (SIGHUP after a rotation). "": stderr.
    access_log_file: str = ""
    #: The lifecycle scheduler's round (reminders, isolation and release events, replay of
    #: queued invocations); 0: off on this instance.
    lifecycle_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 60_000
    #: Reload when a config file changes, checked this often; 0: only on SIGHUP.
    reload_poll_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 2_000
    #: Admin API tokens declared in a file (a Kubernetes Secret, say): ``tokens.yaml``,
    #: relative to gateway.yaml; "": none (docs/config.md, "tokens_file").
    tokens_file: str = ""
    #: At SIGTERM, requests in flight get this long to finish (the listeners stop accepting
    #: at once); then their connections are closed. Per listener group: the admin and
    #: plugin listeners drain together, then the public one.
    drain_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 15_000
    #: Audit entries (admin changes, reloads) are kept this many days in the store.
    audit_retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 90
    routes: tuple[Route, ...] = ()


# ------------------------------------------------------------------------------ plans.yaml


class Plan(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    price: Money | None = None  # CNY / month; None: per contract
    qps: PosInt | None = None  # None: per contract, each env must set limits.qps
    calls: NonNegInt
    realtime: NonNegInt
    gbs: GbsInt
    capacity_gb: GbInt
    outbound_gb: GbInt
    storage_traffic_gb: GbInt
    cdn_origin_gb: GbInt
    custom_domains: NonNegInt
    ai_tokens: NonNegInt = 100_000
    function_concurrency: PosInt = 1_000
    packs_allowed: bool = True


class ResourcePack(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    meter: Literal["calls", "capacity_bytes", "sms"]
    amount: PosInt  # calls / bytes / messages
    price: Money
    days: PosInt = 30


class PromoPack(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    price_per_day: Money
    qps: PosInt | None = None
    function_concurrency: PosInt | None = None
    realtime: PosInt | None = None
    #: While active, database reads and writes cost no calls (SPEC §10).
    database_free: bool = False


class PaygPrice(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    price: Money  # CNY per ``per`` units
    per: PosInt = 1


#: What a gateway version can be bought for at a time, in months (SPEC §15): 1-5 months, half a
#: year, 1-4 years.
GATEWAY_TERMS = (1, 2, 3, 4, 5, 6, 12, 24, 36, 48)
#: Bytes per second in one Mbps (decimal megabits, as bandwidth is sold).
BYTES_PER_MBPS = 125_000


class GatewayVersion(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A version of the gateway itself, sold prepaid by the month: it caps the environment's
    QPS and the bandwidth of its responses."""

    qps: PosInt
    mbps: Annotated[int, msgspec.Meta(gt=0, le=10_000_000)]
    #: CNY / month, to the fen (a price of more decimals would be rounded when charged).
    price: Annotated[str, msgspec.Meta(pattern=r"^\d+(\.\d{1,2})?$")]


class PlansFile(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    plans: dict[str, Plan]
    resource_packs: dict[str, ResourcePack] = msgspec.field(default_factory=dict)
    promo_packs: dict[str, PromoPack] = msgspec.field(default_factory=dict)
    payg_prices: dict[str, PaygPrice] = msgspec.field(default_factory=dict)
    #: Calls one SMS costs when no SMS pack is left (SPEC §3).
    sms_call_cost: PosInt = 2_000
    #: Gateway versions (SPEC §15); an expired version falls back to the lowest.
    gateway_versions: dict[str, GatewayVersion] = msgspec.field(default_factory=dict)


# ------------------------------------------------------------------------ environments.yaml


class Limits(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Per-environment overrides of the plan (contract plans, tests)."""

    qps: PosInt | None = None
    calls: NonNegInt | None = None
    realtime: NonNegInt | None = None
    gbs: GbsInt | None = None
    capacity_gb: GbInt | None = None
    outbound_gb: GbInt | None = None
    storage_traffic_gb: GbInt | None = None
    cdn_origin_gb: GbInt | None = None
    ai_tokens: NonNegInt | None = None
    function_concurrency: PosInt | None = None


class PackGrant(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    purchased: dt.date
    #: A catalog pack name from plans.yaml, or ``meter`` + ``amount`` directly.
    pack: str = ""
    meter: Literal["calls", "capacity_bytes", "sms"] | None = None
    amount: PosInt | None = None


class PromoGrant(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    pack: str
    start: dt.date
    days: PosInt = 1


class GatewayGrant(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The environment's gateway version: bought on ``purchased`` for ``months`` in all (the
    first term and every renewal), so it runs to ``purchased`` + ``months`` (calendar months,
    clamped to the month's last day)."""

    version: str
    purchased: dt.date
    months: Annotated[int, msgspec.Meta(gt=0, le=1200)]
    #: Renewed on the expiry day by ``renew_months``: the last term bought through the API, or
    #: set; when not set, ``months`` if that is a term sold, else 1.
    auto_renew: bool = False
    renew_months: int | None = None


class FunctionSettings(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: Memory configured for the function, in MB: GBs = memory_mb / 1024 x run seconds.
    memory_mb: MemoryMb


class Environment(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    plan: str
    anchor: dt.date
    expires: dt.date
    overage: bool = False
    mode: EnforcementMode | None = None  # None: the gateway's enforcement
    timezone: str | None = None  # None: the gateway's timezone
    limits: Limits = msgspec.field(default_factory=Limits)
    packs: tuple[PackGrant, ...] = ()
    promos: tuple[PromoGrant, ...] = ()
    #: Per function (name from the path), overriding the route's memory_mb.
    functions: dict[str, FunctionSettings] = msgspec.field(default_factory=dict)
    #: What was paid for the current period (downgrade refunds); None: the plan's price x the
    #: period's months.
    paid: Money | None = None
    #: Where the paid period began; None: the anchor.
    period_start: dt.date | None = None
    #: Multiplier of upgrade fees (contract discounts), e.g. "0.8".
    discount: Money = "1"
    #: The account is in arrears: it keeps working but cannot renew or change plan (SPEC §11).
    arrears: bool = False
    #: The gateway version bought for this environment (SPEC §15); None: none (the plan's
    #: QPS, no bandwidth cap).
    gateway: GatewayGrant | None = None


class DeclaredToken(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A token of ``tokens_file``: the token itself (``qg_<id>_<secret>``, hashed at load and
    not kept), or its ``id`` and the SHA-256 of it (``sha256``, hex)."""

    name: str
    role: Literal["viewer", "support", "billing", "admin", "env"]
    #: The environment an ``env`` token reads.
    env: str | None = None
    token: str | None = None
    id: str | None = None
    sha256: str | None = None


class TokensFile(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    tokens: tuple[DeclaredToken, ...] = ()


class EnvironmentsFile(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    #: Keys are environment ids, checked in load.py so the error names the bad id.
    environments: dict[str, Environment] = msgspec.field(default_factory=dict)


def money(text: str) -> Decimal:
    """A price from config, exact."""
    return Decimal(text)
