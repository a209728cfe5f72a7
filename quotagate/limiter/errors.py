"""The limiter's few error types; the gateway maps them to HTTP in one place (problems.py)."""

from __future__ import annotations

from quotagate.common import metrics


class LimiterError(Exception):
    """Base of everything the limiter raises on purpose."""


class StoreError(LimiterError):
    """The store answered, but not as expected."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (refused, reset, closed, or known to be down)."""


class StoreTimeout(StoreUnavailable):
    """The store did not answer within the configured timeout."""


class OutOfMemory(StoreUnavailable):
    """The store is at maxmemory and refused a command that may write (OOM)."""


class NoScript(StoreError):
    """The store does not have the script (restarted, or SCRIPT FLUSH): send its body."""


class NoFunctions(NoScript):
    """The store refuses FCALL (an older server, or an ACL without it): use scripts."""


class Redirected(StoreError):
    """A cluster node answered MOVED or ASK: the slot lives on another node."""

    def __init__(self, text: str):
        super().__init__(text)
        kind, slot, where = text.split()[:3]
        host, _, port = where.rpartition(":")
        self.kind, self.slot, self.host, self.port = kind, int(slot), host, int(port)


def count_store_error(exc: StoreError) -> None:
    """``quotagate_store_errors_total``, by kind: every failed store call is counted where it
    failed, whatever the failure policy then does with it."""
    kind = ("timeout" if isinstance(exc, StoreTimeout) else
            "unavailable" if isinstance(exc, StoreUnavailable) else "error")
    metrics.STORE_ERRORS.labels(kind).inc()
