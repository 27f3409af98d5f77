"""A server's sessions and its KV-cache budget, counted in token-blocks.

Opening a session reserves `max_length × blocks` token-blocks; when that does not fit now the
answer is a retriable CacheFull, and when it can never fit it is TooLarge. No torch here: the
table only counts, so the budget logic is tested without a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from blockswarm.core.errors import BadRequest, CacheFull, LengthExceeded, TooLarge, UnknownSession

MAX_SESSION_ID = 128


@dataclass(slots=True)
class Session:
    session_id: str
    start: int
    end: int
    max_length: int
    cache: Any  # the model's per-session cache object (it knows how many tokens it holds)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def reserved(self) -> int:
        return self.max_length * (self.end - self.start)


class SessionTable:
    def __init__(self, span_start: int, span_end: int, cache_tokens: int, clock=time.monotonic):
        self.span_start, self.span_end = span_start, span_end
        self.capacity = cache_tokens * (span_end - span_start)  # token-blocks
        self.sessions: dict[str, Session] = {}
        self.clock = clock

    @property
    def used(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    @property
    def free_cache_tokens(self) -> int:
        return (self.capacity - self.used) // (self.span_end - self.span_start)

    def open(self, session_id, start, end, max_length, make_cache) -> Session:
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID:
            raise BadRequest(f"session id must be a string of 1..{MAX_SESSION_ID} characters")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, max_length)):
            raise BadRequest("start, end and max_length must be integers")
        if not self.span_start <= start < end <= self.span_end:
            raise BadRequest(f"this server holds blocks {self.span_start}:{self.span_end}; "
                             f"it cannot compute {start}:{end}")
        if max_length <= 0:
            raise BadRequest(f"max_length must be positive, got {max_length}")
        if session_id in self.sessions:
            raise BadRequest(f"session {session_id!r} is already open here")
        need = max_length * (end - start)
        if need > self.capacity:
            raise TooLarge(f"{max_length} tokens over blocks {start}:{end} need {need} token-blocks of cache; "
                           f"this server has {self.capacity} in total. Use a shorter request or another server.")
        if self.used + need > self.capacity:
            raise CacheFull(f"cache full: {self.capacity - self.used} token-blocks free, {need} needed; "
                            "retry later or use another server")
        session = Session(session_id, start, end, max_length, make_cache(), last_used=self.clock())
        self.sessions[session_id] = session
        return session

    def get(self, session_id) -> Session:
        session = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise UnknownSession(f"no open session {session_id!r:.80} here (expired or never opened); open it again")
        session.last_used = self.clock()
        return session

    def check_step(self, session: Session, held_tokens: int, new_tokens: int) -> None:
        if held_tokens + new_tokens > session.max_length:
            raise LengthExceeded(f"session {session.session_id!r} reserved {session.max_length} tokens and holds "
                                 f"{held_tokens}; {new_tokens} more do not fit. Open a longer session.")

    def close(self, session_id) -> None:
        self.sessions.pop(session_id, None)

    def expire(self, idle_s: float) -> list[str]:
        now = self.clock()
        gone = [sid for sid, s in self.sessions.items() if now - s.last_used > idle_s]
        for sid in gone:
            del self.sessions[sid]
        return gone
