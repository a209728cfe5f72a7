"""The limiter's few error types; the gateway maps them to HTTP in one place (problems.py)."""


class LimiterError(Exception):
    """Base of everything the limiter raises on purpose."""


class StoreError(LimiterError):
    """The store answered, but not as expected."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (refused, reset, closed, or known to be down)."""


class StoreTimeout(StoreUnavailable):
    """The store did not answer within the configured timeout."""


class NoScript(StoreError):
    """The store does not have the script (restarted, or SCRIPT FLUSH): send its body."""
