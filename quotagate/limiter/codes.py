"""Reply codes of decide.lua, mapped to one enum in one place."""

from __future__ import annotations

import enum


class Outcome(enum.IntEnum):
    ADMITTED = 0
    QPS_EXCEEDED = 1
    QUOTA_EXCEEDED = 2
    ISOLATED = 3
    NOT_FOUND = 4
    NOT_STARTED = 5
    #: Realtime watches or function invocations at their cap.
    CONCURRENCY_EXCEEDED = 6


class Flag:
    """Bits of decide.lua's flags. Plain ints, not an ``enum.IntFlag``: the hot path tests
    them on every request, and an IntFlag operation costs over a microsecond."""

    NONE = 0
    #: Shadow mode: the request would have been refused, it was admitted.
    SHADOW_REFUSAL = 1
    #: Part of the cost went to pay-as-you-go.
    PAYG = 2
    #: A database promo made this database request free.
    DATABASE_FREE = 4
    #: Enforcement is off for this environment (nothing counted).
    MODE_OFF = 8
    #: The script wrote events (alerts) to the environment's stream.
    EVENTS = 16
    #: Isolated or not started (the outcome says which), and let through at no cost: a
    #: request the gateway marked as passing while isolated (a route's
    #: ``pass_while_isolated``), counted in QPS only.
    WHILE_ISOLATED = 64
    #: The environment is hot: instances decide it from leased budgets (hot.py); the one
    #: that asked leases too.
    HOT = 128
    #: Decided in memory, from this instance's lease (never from the store's reply).
    LEASED = 256
