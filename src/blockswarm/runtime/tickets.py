"""Tickets: the coordinator's permission to open one session on one server.

In a coordinated swarm a server opens sessions only for reservations the coordinator issued, so a
client that bypasses the coordinator cannot take cache reserved for others. The coordinator and
each server share a secret (handed to the server when it registers, over the coordinator's
socket, which is encrypted in a private swarm); a ticket is an HMAC over what it allows: the
reservation, the block the route enters at, the most tokens it may reserve, and until when it
may be used to open. A ticket opens at most one live session at a time (`TicketBook`): opening
again with it (a client reopening after the server lost its session) replaces the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from blockswarm.core.errors import BadRequest

SECRET_BYTES = 32


def new_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


@dataclass(frozen=True, slots=True)
class Ticket:
    reservation: str
    start: int
    max_length: int
    expires: float  # wall-clock seconds: a ticket opens sessions until then (sessions live on)

    def mint(self, secret: str) -> str:
        body = f"{self.reservation}.{self.start}.{self.max_length}.{self.expires:.0f}"
        return f"{body}.{_mac(secret, body)}"

    @classmethod
    def check(cls, secret: str, ticket, start: int, max_length: int, now: float | None = None) -> Ticket:
        """The ticket's terms if it is genuine, unexpired and allows this open; else BadRequest."""
        if not isinstance(ticket, str) or len(ticket) > 256 or ticket.count(".") != 4:
            raise BadRequest("this server is coordinated: open needs the ticket the coordinator issued with the "
                             "route (ask the coordinator for a route)")
        body, mac = ticket.rsplit(".", 1)
        if not hmac.compare_digest(_mac(secret, body), mac):
            raise BadRequest("the ticket was not issued for this server; ask the coordinator for a route")
        reservation, first, longest, expires = body.split(".")
        terms = cls(reservation, int(first), int(longest), float(expires))
        if terms.expires < (time.time() if now is None else now):
            raise BadRequest("the ticket has expired; ask the coordinator for a new route")
        if start != terms.start or max_length > terms.max_length:
            raise BadRequest(f"the ticket allows entering at block {terms.start} for at most {terms.max_length} "
                             f"tokens, not block {start} for {max_length}")
        return terms


def _mac(secret: str, body: str) -> str:
    return hmac.new(bytes.fromhex(secret), body.encode(), hashlib.sha256).hexdigest()[:32]


class TicketBook:
    """Which session each ticket opened: one live session per ticket."""

    def __init__(self):
        self._sessions: dict[str, str] = {}  # reservation -> session token

    def __len__(self) -> int:
        return len(self._sessions)

    def previous(self, reservation: str) -> str | None:
        return self._sessions.get(reservation)

    def record(self, reservation: str, token: str) -> None:
        self._sessions[reservation] = token

    def forget_closed(self, live_tokens) -> None:
        """Drop entries whose session is gone (called now and then, so the book stays small)."""
        self._sessions = {r: t for r, t in self._sessions.items() if t in live_tokens}
