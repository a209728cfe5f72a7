"""Prometheus metrics of quotagate (served on the admin listener at /metrics).

Named by Prometheus conventions (``_total`` counters, base units, ``quotagate_`` prefix). No
per-environment labels: their cardinality is unbounded (per-environment figures are in the
admin API's usage report). With several worker processes prometheus_client's multiprocess mode
aggregates them (PROMETHEUS_MULTIPROC_DIR). docs/grafana-dashboard.json is built on these.
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram, Info

from quotagate import __version__

DECISIONS = Counter(
    "quotagate_decisions_total",
    "Requests decided, by result (admitted, refused, shadow_refused, passed — let through at "
    "no cost while isolated —, bypassed, off) and reason.",
    ["result", "reason"],
)
DECISION_SECONDS = Histogram(
    "quotagate_decision_duration_seconds",
    "Time from asking the store to its answer (one EVALSHA, pipelined); decisions made in "
    "memory from a hot environment's lease ask the store nothing and are not observed.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
REQUESTS = Counter(
    "quotagate_requests_total",
    "Requests on the public listener, by route kind, status class and decision (admitted, "
    "bypassed, shadow-refused, off, queued, or the refusal's problem type).",
    ["kind", "status", "decision"],
)
#: Seconds, for a proxy in front of functions and AI streams: 1 ms to 2 minutes.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60, 120)
REQUEST_SECONDS = Histogram(
    "quotagate_request_duration_seconds",
    "From the request's arrival to the end of its response, on the public listener (a "
    "WebSocket: its whole life).",
    ["kind"], buckets=_LATENCY_BUCKETS,
)
UPSTREAM_SECONDS = Histogram(
    "quotagate_upstream_duration_seconds",
    "From sending a request upstream to the end of its response, for answered requests.",
    ["kind"], buckets=_LATENCY_BUCKETS,
)
BUILD_INFO = Info("quotagate_build", "The running quotagate: its version and Python's.")
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})
STORE_ERRORS = Counter(
    "quotagate_store_errors_total",
    "Store calls that failed, by kind (unavailable, timeout, error).",
    ["kind"],
)
LOOP_STALL_SECONDS = Counter(
    "quotagate_loop_stall_seconds_total",
    "Time the event loop was found blocked (the store watchdog ran late: a reload, a GC "
    "pause, a slow disk); not counted against store deadlines.",
)
LOOP_LAG_SECONDS = Histogram(
    "quotagate_event_loop_lag_seconds",
    "How late the event loop ran a callback due every 100 ms: the time no request of this "
    "process was served (a reload, a GC pause, a slow disk, CPU starvation).",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKLOG = Gauge(
    "quotagate_failopen_backlog_entries",
    "Usage entries admitted while the store was down and not yet written back.",
    multiprocess_mode="sum",
)
JOURNAL_LINES_SKIPPED = Counter(
    "quotagate_journal_lines_skipped_total",
    "Lines of stopped gateways' fail-open journals skipped when written back: not a line the "
    "journal writes (cut by a crash, or damaged); each is logged with its file and line.",
)
CLOCK_SKEW = Gauge(
    "quotagate_clock_skew_seconds",
    "This host's wall clock minus the store's TIME at the last sample (dates follow the "
    "store's clock; a large value means the host's NTP is off).",
    multiprocess_mode="max",
)
UPSTREAM_ERRORS = Counter(
    "quotagate_upstream_errors_total",
    "Proxied requests that failed at the upstream, by kind (unavailable, timeout, aborted).",
    ["kind"],
)
REFUNDS = Counter(
    "quotagate_refunds_total",
    "Calls given back because the upstream never answered them (the gateway's 502 or 504).",
)
STREAMS_CHARGED_AFTER = Counter(
    "quotagate_streams_charged_after_total",
    "Responses that were streams although the request did not ask for one: the stream's "
    "extra cost was charged after them.",
)
DONE_CALLS = Counter(
    "quotagate_done_calls_total",
    "Plugin mode: proxies' done calls, by result (done; invalid: a ticket not ours or a bad "
    "figure; unavailable: the store could not take it).",
    ["result"],
)
CLIENT_CONNECTIONS = Gauge(
    "quotagate_client_connections", "Open client connections on the public listener.")
CONNECTIONS_REFUSED = Counter(
    "quotagate_connections_refused_total",
    "Client connections answered 503 and closed at clients.max_connections.",
)
LISTENER_CONNECTIONS = Gauge(
    "quotagate_listener_connections",
    "Open connections per listener (public, authz, grpc, admin).",
    ["listener"],
    multiprocess_mode="livesum",
)
LISTENER_REFUSED = Counter(
    "quotagate_listener_connections_refused_total",
    "Connections refused at a listener's connection cap (HTTP: 503; gRPC: GOAWAY), per "
    "listener (public, authz, grpc, admin).",
    ["listener"],
)
INVALID_REQUESTS = Counter(
    "quotagate_invalid_requests_total",
    "Requests refused before any store call, by reason (invalid-environment, route-not-found).",
    ["reason"],
)
BANDWIDTH_LEASES = Counter(
    "quotagate_bandwidth_leases_total",
    "Bandwidth slots by result: leased from the store, given back to it, or local (the store "
    "away, fail-open).",
    ["result"],
)
HOT_LEASE_CALLS = Counter(
    "quotagate_hot_lease_calls_total",
    "Store calls for hot environments' leases (hot.py), by what they answered: leased, "
    "spent (plan and packs used up), ended (not leasable now: per request), error.",
    ["result"],
)
HOT_ENVIRONMENTS = Gauge(
    "quotagate_hot_environments",
    "Environments this instance decides in memory from leased budgets now.",
)
BANDWIDTH_BYTES = Counter(
    "quotagate_bandwidth_shaped_bytes_total",
    "Response bytes sent through a bandwidth pacer (environments with a gateway version).",
)
SCRIPT_RELOADS = Counter(
    "quotagate_script_reloads_total", "Scripts re-sent after NOSCRIPT (store restart or flush)."
)
REALTIME_SOCKETS = Gauge(
    "quotagate_realtime_sockets",
    "Realtime WebSockets open through this instance.",
    multiprocess_mode="livesum",
)
REALTIME_WATCHES = Gauge(
    "quotagate_realtime_watches",
    "Realtime watches holding a slot through this instance.",
    multiprocess_mode="livesum",
)
REALTIME_REFUSED = Counter(
    "quotagate_realtime_frames_refused_total",
    "Client frames answered by the gateway with an ERROR frame, by code.",
    ["code"],
)
RELOADS = Counter(
    "quotagate_config_reloads_total",
    "Config reloads (SIGHUP or a changed file), by result (success, failure: the last good "
    "config stays).",
    ["result"],
)
FUNCTION_SLOTS = Gauge(
    "quotagate_function_slots",
    "Function invocations holding a concurrency slot through this instance.",
    multiprocess_mode="livesum",
)
LEASE_RENEWALS = Counter(
    "quotagate_lease_renewals_total",
    "Lease renewal rounds of this instance's slots, by result (ok, failed).",
    ["result"],
)
LEASE_RENEW_CALLS = Counter(
    "quotagate_lease_renew_calls_total",
    "Store calls spent on lease renewal (one per 256 environments per round).",
)
EVENTS_FORWARDED = Counter(
    "quotagate_events_forwarded_total",
    "Events moved from environments' streams to the global stream qg:events.",
)
EVENTS_EMITTED = Counter(
    "quotagate_events_emitted_total",
    "Events written by the control plane (purchases, plan changes, lifecycle), by type.",
    ["type"],
)
WEBHOOK_DELIVERIES = Counter(
    "quotagate_webhook_deliveries_total",
    "Webhook POSTs of events, by result (delivered, failed: retried later).",
    ["result"],
)
INGESTED_RECORDS = Counter(
    "quotagate_ingested_records_total",
    "Usage records received by the ingestion API, by result (counted, duplicate, invalid).",
    ["result"],
)
QUEUED_INVOCATIONS = Counter(
    "quotagate_queued_invocations_total",
    "Asynchronous invocations of isolated environments, by what happened (queued, refused, "
    "replayed, dropped).",
    ["result"],
)
ENV_DECISIONS = Counter(
    "quotagate_env_decisions_total",
    "Decisions of the environments listed in gateway.yaml's metrics_envs (opt-in, at most 100: "
    "bounded cardinality), by environment and result.",
    ["env", "result"],
)
#: The environments ENV_DECISIONS is kept for (set from the config, also on reload).
labelled_envs: frozenset[str] = frozenset()


def label_envs(envs: tuple[str, ...] | list[str]) -> None:
    global labelled_envs
    labelled_envs = frozenset(envs)
