"""Prometheus metrics of the gateway (served on the admin listener).

No per-environment labels here: their cardinality is unbounded. With several worker processes
prometheus_client's multiprocess mode aggregates them (PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "quotagate_decisions_total",
    "Requests decided, by result (admitted, refused, shadow_refused, bypassed, off) and reason.",
    ["result", "reason"],
)
DECISION_SECONDS = Histogram(
    "quotagate_decision_duration_seconds",
    "Time from asking the store to its answer (one EVALSHA, pipelined).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
STORE_ERRORS = Counter(
    "quotagate_store_errors_total",
    "Store calls that failed, by kind (unavailable, timeout, error).",
    ["kind"],
)
BACKLOG = Gauge(
    "quotagate_failopen_backlog_entries",
    "Usage entries admitted while the store was down and not yet written back.",
    multiprocess_mode="sum",
)
UPSTREAM_ERRORS = Counter(
    "quotagate_upstream_errors_total",
    "Proxied requests that failed at the upstream, by kind (unavailable, timeout, aborted).",
    ["kind"],
)
INVALID_REQUESTS = Counter(
    "quotagate_invalid_requests_total",
    "Requests refused before any store call, by reason (invalid-environment, route-not-found).",
    ["reason"],
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
