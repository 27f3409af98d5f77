"""The simulator's events: small data, each with one handler that returns follow-up events.

Priorities order same-time events: completions free cache before arrivals and retries look
for it, and failures/joins change the swarm before anybody routes at that instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.specs import Request, Span


@dataclass(slots=True)
class ServerFailure:
    time: float
    server: int
    priority: int = 0

    def handle(self, world) -> list:
        return world.fail_server(self.server, self.time)


@dataclass(slots=True)
class ServerJoin:
    time: float
    span: Span
    priority: int = 0

    def handle(self, world) -> list:
        return world.join_server(self.span, self.time)


@dataclass(slots=True)
class Completion:
    time: float
    request_id: int
    generation: int
    priority: int = 1

    def handle(self, world) -> list:
        return world.complete(self.request_id, self.generation, self.time)


@dataclass(slots=True)
class Arrival:
    """A request arrives (or comes back after a failure) and is routed at once."""

    time: float
    request: Request
    priority: int = 2

    def handle(self, world) -> list:
        return world.arrive(self.request, self.time, attempt=0)


@dataclass(slots=True)
class Retry:
    """PETALS' client retries after backing off from a full server."""

    time: float
    request: Request
    attempt: int
    priority: int = 2

    def handle(self, world) -> list:
        return world.arrive(self.request, self.time, self.attempt)


@dataclass(slots=True)
class Start:
    """The route's cache is free: prefill begins."""

    time: float
    request_id: int
    generation: int
    priority: int = 3

    def handle(self, world) -> list:
        return world.start(self.request_id, self.generation, self.time)


@dataclass(slots=True)
class FirstToken:
    time: float
    request_id: int
    generation: int
    priority: int = 3

    def handle(self, world) -> list:
        return world.first_token(self.request_id, self.generation, self.time)


@dataclass(slots=True)
class DecodeStep:
    """One more output token (step-by-step mode); `tokens` counts tokens produced so far."""

    time: float
    request_id: int
    generation: int
    tokens: int
    priority: int = 3

    def handle(self, world) -> list:
        return world.decode_step(self.request_id, self.generation, self.tokens, self.time)


@dataclass(slots=True)
class HopArrival:
    """The runtime profile: step `step` of a request reaches hop `hop` of its route."""

    time: float
    request_id: int
    generation: int
    step: int
    hop: int
    priority: int = 3

    def handle(self, world) -> list:
        return world.hop_arrive(self.request_id, self.generation, self.step, self.hop, self.time)


@dataclass(slots=True)
class HopReply(HopArrival):
    """The runtime profile: that hop's reply reaches the client (the same fields)."""

    def handle(self, world) -> list:
        return world.hop_reply(self.request_id, self.generation, self.step, self.hop, self.time)
