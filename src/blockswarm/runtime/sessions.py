"""A server's sessions and its KV-cache budget, counted in token-blocks, safe across its two threads.

A session computes from the block where its route enters this server to the end of the span
(the spec's route model), so opening one reserves `max_length × (span_end − start)` token-blocks:
exactly what its cache will hold. When that does not fit now the answer is a retriable
CacheFull, and when it can never fit it is TooLarge.

Each session is named by a token the server mints (unguessable, 128 bits): a client cannot
choose it, so nobody can pre-open another's session, and a server on a route never learns the
token another server handed out. Steps must arrive numbered 1, 2, 3, ...; anything else is
refused, so a foreign or replayed step cannot shift a session's positions. In a private swarm a
session also belongs to the key that opened it.

The control thread opens, closes and expires sessions while the compute thread steps them; one
lock guards the table, and a session the compute thread holds (`busy`) is never freed under it:
closing or expiring it marks it, and the compute thread lets it go when its step ends. No torch
here: the table only counts, so the budget logic is tested without a model.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from blockswarm.core.errors import BadRequest, CacheFull, LengthExceeded, TooLarge, UnknownSession

TOKEN_BYTES = 16  # 128 bits: guessing a live token is hopeless


@dataclass(slots=True)
class Session:
    token: str
    start: int  # the block the route enters at; it computes to the end of the span
    max_length: int  # tokens reserved
    blocks: int  # blocks it computes: span_end - start
    owner: str  # who opened it: a CURVE key in a private swarm, else the peer's address
    cache: Any  # the model's per-session cache object (it knows how many tokens it holds)
    last_used: float
    accepted_steps: int = 0  # steps accepted so far (numbered 1, 2, ...)
    accepted_tokens: int = 0  # tokens those steps carry, computed or still queued
    busy: bool = False  # the compute thread is running one of its steps
    doomed: bool = False  # closed or expired while busy: freed when the step ends

    @property
    def reserved(self) -> int:
        return self.max_length * self.blocks


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one peer from taking a server for itself."""

    max_session_tokens: int  # one session may reserve at most this many tokens (the model's context)
    max_sessions: int = 4096  # sessions open at once, from everybody
    max_peer_share: float = 1.0  # share of the cache one peer (key or address) may hold at once


class SessionTable:
    def __init__(self, span_start: int, span_end: int, cache_tokens: int, limits: Limits,
                 clock=time.monotonic):
        self.span_start, self.span_end = span_start, span_end
        self.capacity = cache_tokens * (span_end - span_start)  # token-blocks
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self.clock = clock
        self.used = 0  # token-blocks reserved; kept as a running sum so open stays O(1)
        self._by_owner: dict[str, int] = {}  # token-blocks reserved per owner
        self._lock = threading.Lock()

    @property
    def free_cache_tokens(self) -> int:
        return (self.capacity - self.used) // (self.span_end - self.span_start)

    def open(self, start: int, max_length: int, owner: str, make_cache) -> Session:
        """Reserve cache for a session entering at block `start`; returns it with its new token."""
        if not self.span_start <= start < self.span_end:
            raise BadRequest(f"this server holds blocks {self.span_start}:{self.span_end}; "
                             f"a route cannot enter it at block {start}")
        if max_length <= 0:
            raise BadRequest(f"max_length must be positive, got {max_length}")
        if max_length > self.limits.max_session_tokens:
            raise TooLarge(f"max_length {max_length} is longer than this server allows for one session "
                           f"({self.limits.max_session_tokens} tokens, the model's context)")
        blocks = self.span_end - start
        need = max_length * blocks
        if need > self.capacity:
            raise TooLarge(f"{max_length} tokens over blocks {start}:{self.span_end} need {need} token-blocks of "
                           f"cache; this server has {self.capacity} in total. Use a shorter request or another server.")
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise CacheFull(f"this server has {len(self.sessions)} sessions open, its limit; "
                                "retry later or use another server")
            if self.used + need > self.capacity:
                raise CacheFull(f"cache full: {self.capacity - self.used} token-blocks free, {need} needed; "
                                "retry later or use another server")
            mine = self._by_owner.get(owner, 0)
            if mine + need > self.limits.max_peer_share * self.capacity:
                raise CacheFull(f"you hold {mine} of this server's {self.capacity} token-blocks; one peer may hold "
                                f"{self.limits.max_peer_share:.0%}. Close sessions or retry later.")
            token = secrets.token_hex(TOKEN_BYTES)
            session = Session(token, start, max_length, blocks, owner, make_cache(), last_used=self.clock())
            self.sessions[token] = session
            self.used += need
            self._by_owner[owner] = mine + need
        return session

    def find(self, token, owner: str) -> Session:
        """The session `token` names, if `owner` opened it. Leaves its idle clock alone: only a
        step that is accepted counts as use, so rejected requests cannot keep a session alive."""
        session = self.sessions.get(token) if isinstance(token, str) else None
        if session is None or session.doomed or not _same(session.owner, owner):
            # the same answer for "never existed" and "not yours": a stranger learns nothing
            raise UnknownSession("no open session with that token here (expired, closed or never opened); "
                                 "open it again")
        return session

    def accept_step(self, session: Session, number, new_tokens: int) -> None:
        """Admit step `number` carrying `new_tokens` tokens, or refuse it (the session is unchanged)."""
        if number != session.accepted_steps + 1:
            raise BadRequest(f"step {number!r:.20} is out of order: this session expects step "
                             f"{session.accepted_steps + 1}")
        if session.accepted_tokens + new_tokens > session.max_length:
            raise LengthExceeded(f"the session reserved {session.max_length} tokens and holds "
                                 f"{session.accepted_tokens}; {new_tokens} more do not fit. Open a longer session.")
        session.accepted_steps += 1
        session.accepted_tokens += new_tokens
        session.last_used = self.clock()

    def acquire(self, session: Session) -> bool:
        """The compute thread takes the session for one slice of work; False if it is gone."""
        with self._lock:
            if session.doomed or self.sessions.get(session.token) is not session:
                return False
            session.busy = True
            return True

    def release(self, session: Session) -> None:
        """The compute thread is done with a slice; a session closed meanwhile is freed now."""
        with self._lock:
            session.busy = False
            session.last_used = self.clock()
            if session.doomed:
                self._free(session)

    def close(self, token, owner: str) -> None:
        with self._lock:
            session = self.sessions.get(token) if isinstance(token, str) else None
            if session is not None and _same(session.owner, owner):
                self._end(session)

    def drop(self, session: Session) -> None:
        """Forget a session whose cache can no longer be trusted (its step failed half-way)."""
        with self._lock:
            self._end(session)

    def expire(self, idle_s: float) -> list[str]:
        now = self.clock()
        with self._lock:
            gone = [s for s in self.sessions.values() if not s.busy and not s.doomed and now - s.last_used > idle_s]
            for session in gone:
                self._end(session)
        return [s.token for s in gone]

    def _end(self, session: Session) -> None:
        if session.busy:
            session.doomed = True  # the compute thread frees it when its slice ends
        else:
            self._free(session)

    def _free(self, session: Session) -> None:
        if self.sessions.pop(session.token, None) is None:
            return
        session.doomed = True
        session.cache = None  # let the memory go now, even if a queued step still refers to the session
        self.used -= session.reserved
        left = self._by_owner.get(session.owner, 0) - session.reserved
        if left > 0:
            self._by_owner[session.owner] = left
        else:
            self._by_owner.pop(session.owner, None)


def _same(a: str, b: str) -> bool:
    """Owner comparison in constant time (bytes: compare_digest refuses non-ASCII text)."""
    return secrets.compare_digest(a.encode(), b.encode())
