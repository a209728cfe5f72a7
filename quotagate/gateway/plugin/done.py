"""Plugin mode's done call, after the response: the ticket's function slot given back and
what the response decides charged — the route's meter (GBs, bytes) from the call's figures,
a stream's difference, a call the upstream never answered given back — once, whatever the
retries and replays (the store marks the ticket seen in the same settle call). The endpoint
that takes it is ``POST /authz/v1/done`` (authz.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from quotagate.common import metrics
from quotagate.gateway.plugin.tickets import TICKET_GRACE_MS, Ticket
from quotagate.gateway.problems import invalid_decision
from quotagate.gateway.state import GatewayState

#: The most a done call may meter of anything — ``bytes``, and a function's memory x
#: ``duration_ms`` (GBs, in MB·ms) — as the admin API's and ingestion's amounts: exact in the
#: store's Lua (doubles) and far from its 64-bit counters. (``duration_ms`` is also bounded by
#: the ticket's life.)
MAX_AMOUNT = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Done:
    """What the proxy reports after the response."""

    #: The upstream answered (nginx: ``$upstream_bytes_received`` > 0); False: the proxy's
    #: own 502/504, and a charged call is given back.
    answered: bool = True
    #: Milliseconds the request was with the upstream (GBs of a function).
    duration_ms: int = 0
    #: Response body bytes (a bytes meter).
    bytes: int = 0
    #: The response was a stream (``text/event-stream``).
    stream: bool = False


def settlement(ticket: Ticket, done: Done) -> tuple[dict[str, int], str]:
    """What a done call changes: the meters to charge (a refund as "-calls@<ms>") and what
    to count it as ("refund", "after" or ""). Its figures are checked first, the amounts they
    make included: a 400 Problem naming the figure when one is out of bounds, and then nothing
    is sent to the store (the ticket stays good for a done call that is right)."""
    life = ticket.expires_at - ticket.decided_at
    if done.duration_ms > life:
        raise invalid_decision(
            f"duration_ms {done.duration_ms} is longer than the decision's ticket lives "
            f"({life} ms: the route's max_duration_ms and an hour), so no request it admitted "
            "ran that long")
    if done.bytes > MAX_AMOUNT:
        raise invalid_decision(f"bytes must be a whole number from 0 to {MAX_AMOUNT}")
    meters: dict[str, int] = {}
    if ticket.meter == "gbs":
        gbs = ticket.memory_mb * done.duration_ms
        if gbs > MAX_AMOUNT:
            raise invalid_decision(
                f"duration_ms {done.duration_ms} x the function's {ticket.memory_mb} MB is "
                f"beyond {MAX_AMOUNT} MB·ms of GBs")
        if gbs > 0:
            meters["gbs"] = gbs
    elif ticket.meter and done.bytes > 0:
        meters[ticket.meter] = done.bytes
    counted = ""
    if not done.answered:
        if ticket.charged and ticket.cost:
            meters[f"-calls@{ticket.decided_at}"] = ticket.cost
            counted = "refund"
    elif ticket.after and done.stream:
        meters["calls"] = ticket.after
        counted = "after"
    elif ticket.back and not done.stream and ticket.charged:
        meters[f"-calls@{ticket.decided_at}"] = ticket.back
    return meters, counted


async def finish(state: GatewayState, ticket: Ticket, done: Done) -> bool:
    """Give the ticket's slot back and charge what the response decides, once: the first done
    call the store takes for a ticket decides everything — whatever it carries, nothing to
    meter included — and marks the ticket seen in the same settle call; every later one (a
    retry, a replay, another instance's) changes nothing (False). Raises a 400 Problem when
    a figure is out of bounds (``settlement``: nothing sent)."""
    meters, counted = settlement(ticket, done)
    # Seen for as long as the ticket is good, and an hour more (instances' clocks differ).
    once_ms = max(0, ticket.expires_at - state.limiter.clock.now_ms()) + TICKET_GRACE_MS
    applied = await state.limiter.finish(ticket.env, ticket.holder, ticket.slot, meters,
                                         once_ms)
    if applied and counted == "refund":
        metrics.REFUNDS.inc()
    elif applied and counted == "after":
        metrics.STREAMS_CHARGED_AFTER.inc()
    return applied
