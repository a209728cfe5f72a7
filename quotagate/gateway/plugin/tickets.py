"""Plugin mode's tickets: what the done call needs to finish a decision (``Ticket``), signed
with HMAC-SHA256 (``Tickets``) so a done call cannot release or meter what no decision of
ours made. A decision that must be finished sends its ticket in ``DECISION_HEADER``
(decision.py); the done call brings it back (authz.py, done.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

import msgspec

from quotagate.gateway.problems import invalid_decision

#: The header that carries the ticket of a decision the proxy must finish (done call).
DECISION_HEADER = "X-Quotagate-Decision"
#: A ticket is good for its route's max_duration_ms and this long after (a done call that
#: comes later is refused); its seen key (the done call taken) is kept that long and this
#: long again, so a replay never outlives it.
TICKET_GRACE_MS = 3_600_000
#: The environment variable with the key that signs tickets. Instances that share it accept
#: each other's tickets; without it each process has its own (``serve`` gives its workers
#: one).
KEY_ENV = "QUOTAGATE_AUTHZ_KEY"


class Ticket(msgspec.Struct, array_like=True, frozen=True):
    """What the done call needs to finish a decision."""

    env: str
    #: Holds the slot (if any) and names the decision: the done call counts once per holder.
    holder: str
    slot: str
    #: The route's meter after the response ("" none) and a function's memory for GBs.
    meter: str
    memory_mb: int
    #: Calls charged up front; the stream difference to charge after a stream nobody asked
    #: for (``after``), or to give back after a response that was no stream when the intent
    #: could not be read (``back``).
    cost: int
    after: int
    back: int
    decided_at: int
    #: decide.lua charged the calls (so a call never answered may be given back).
    charged: bool
    #: A done call after this (ms since the epoch) is refused: the ticket has expired.
    expires_at: int


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Ticket)


class Tickets:
    """Tickets signed with HMAC-SHA256 (so a done call cannot release or meter what no
    decision of ours made)."""

    def __init__(self, key: bytes | None = None):
        given = os.environ.get(KEY_ENV, "")
        self.key = key or (given.encode() if given else secrets.token_bytes(32))

    def sign(self, ticket: Ticket) -> str:
        body = base64.urlsafe_b64encode(_ENCODER.encode(ticket)).rstrip(b"=")
        mac = hmac.new(self.key, body, hashlib.sha256).digest()[:16]
        return (body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()

    def open(self, text: str) -> Ticket:
        """The ticket, or a 400 Problem when it is malformed or not ours."""
        body, _, mac = text.encode(errors="replace").partition(b".")
        try:
            given = base64.urlsafe_b64decode(mac + b"=" * (-len(mac) % 4))
            want = hmac.new(self.key, body, hashlib.sha256).digest()[:16]
            if not body or not hmac.compare_digest(given, want):
                raise invalid_decision("the decision token is not one this deployment signed "
                                       f"(instances must share {KEY_ENV})")
            return _DECODER.decode(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
        except (ValueError, msgspec.DecodeError) as exc:
            raise invalid_decision(f"the decision token cannot be read ({exc})") from None
