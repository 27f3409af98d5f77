"""Simulated swarm state: placement, cache slots per server, sessions, waiting requests, records.

The world decides nothing itself: routes come from the planner's policies through a SwarmView
built from this state. Waiting follows the router: WS-RR reserves slots at once and starts when
they free up; PETALS backs off 1, 2, 4 … 60 s and retries when a server on its route is full;
other routers (and the central-queue ones, QUEUE_ROUTERS, when every chain is full) wait in one
FIFO queue whose head is retried whenever cache frees up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Request, Route, Scenario, Span
from blockswarm.perf.model import route_time
from blockswarm.planner.freetimes import FreeTimes
from blockswarm.planner.registry import QUEUE_ROUTERS, ROUTERS, WAITING_ROUTERS, decide
from blockswarm.planner.routing import block_index, has_room
from blockswarm.planner.view import ActiveBySession, SwarmView
from blockswarm.sim.events import Completion, DecodeStep, FirstToken, HopArrival, HopReply, Retry, Start
from blockswarm.sim.metrics import RequestRecord

MAX_BACKOFF_S = 60.0


def backoff_instant(wait_s: float) -> float:
    """The first instant of PETALS' cumulative back-off (1, 3, 7, 15, … s: steps of 1, 2, 4, … s,
    each at most 60 s) at or after `wait_s`: when a polling client finds its cache free."""
    instant, step = 0.0, 1.0
    while instant < wait_s:
        instant += step
        step = min(2 * step, MAX_BACKOFF_S)
    return instant


@dataclass(slots=True)
class Session:
    request: Request
    route: Route
    generation: int
    reserved_at: float
    start: float
    ttft_s: float
    per_token_s: float
    end: float
    step: int = 1  # the runtime profile: the step in flight...
    hop: int = 0  # ...and the hop it is at (where a failed server's tail is replayed from)


@dataclass
class World:
    scenario: Scenario
    placement: Placement
    router: str
    step_by_step: bool = False
    allocation_delay_s: float = 0.0  # before each prefill, cache slots held (the published runs' hidden delay)
    backoff_rounding: bool = False  # WS-RR waits end at PETALS' back-off instants (clients poll)
    # the runtime profile: each step's hops are events, and a server computes one step at a time
    hop_level: bool = False
    host_block_s: float | None = None  # a server's serial work per block per step; None: the device's time
    client_step_s: float = 0.0  # the client's work per step
    open_rtts: float = 0.0  # set-up: round trips to each hop's server to open its session
    open_hop_s: float = 0.0  # set-up: each hop's own cost of opening, beside its round trips
    coordinator: str | None = None  # set-up: where the coordinator each request asks first is (None: none)
    busy_until: dict[int, float] = field(default_factory=dict)  # hop level: when each server's compute frees
    lost: dict[int, set[int]] = field(default_factory=dict)  # hop level: request -> failed servers on its route
    used: dict[int, int] = field(default_factory=dict)  # slots held per server
    active: dict[int, dict[int, tuple[float, int]]] = field(default_factory=dict)  # server -> rid -> (end, slots)
    sessions: dict[int, Session] = field(default_factory=dict)
    records: dict[int, RequestRecord] = field(default_factory=dict)
    waiting: deque = field(default_factory=deque)  # requests waiting for cache (FIFO routers, no route)
    slot_seconds: dict[int, float] = field(default_factory=dict)
    occupancy: list[tuple[float, int]] = field(default_factory=list)  # (time, slots held in the swarm)
    in_flight: dict[Route, int] = field(default_factory=dict)  # sessions running or reserved per route
    generation: int = 0

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise Infeasible(f"unknown routing {self.router!r}; choose one of {', '.join(ROUTERS)}")
        self._route = ROUTERS[self.router]
        self._active_view = ActiveBySession(self.active)
        self._set_placement(self.placement)
        self._held_total = 0

    # -- views and bookkeeping ----------------------------------------------------------------
    def view(self, now: float) -> SwarmView:
        return SwarmView(self.scenario, self.placement, now, self._active_view, self._index, self.used, self._memo,
                         self._free_times, self.in_flight, len(self.waiting))

    def _change_held(self, server: int, delta: int, now: float) -> None:
        self.used[server] = self.used.get(server, 0) + delta
        self._free_times.mark(server)
        self._held_total += delta
        self.occupancy.append((now, self._held_total))

    def _reserve(self, request: Request, route: Route, now: float, start: float) -> list:
        start += self.allocation_delay_s
        timing = route_time(self.scenario, route, request)
        self.generation += 1
        session = Session(request, route, self.generation, now, start, timing.ttft_s, timing.per_token_s,
                          start + timing.completion_s)
        self.sessions[request.request_id] = session
        self.in_flight[route] = self.in_flight.get(route, 0) + 1
        for hop in route.hops:
            self.active.setdefault(hop.server, {})[request.request_id] = (session.end, hop.blocks)
            self._change_held(hop.server, hop.blocks, now)
        return [Start(start, request.request_id, session.generation)]

    def _release(self, session: Session, now: float) -> None:
        self.lost.pop(session.request.request_id, None)
        for hop in session.route.hops:
            entries = self.active.get(hop.server)
            if entries is not None:
                entries.pop(session.request.request_id, None)
            self._change_held(hop.server, -hop.blocks, now)
            self.slot_seconds[hop.server] = self.slot_seconds.get(hop.server, 0.0) + hop.blocks * (
                now - session.reserved_at)
        del self.sessions[session.request.request_id]
        left = self.in_flight.pop(session.route) - 1
        if left:
            self.in_flight[session.route] = left

    def _current(self, request_id: int, generation: int) -> Session | None:
        session = self.sessions.get(request_id)
        return session if session is not None and session.generation == generation else None

    # -- event handlers --------------------------------------------------------------------------
    def arrive(self, request: Request, now: float, attempt: int) -> list:
        record = self.records.get(request.request_id)
        if record is None:
            self.records[request.request_id] = RequestRecord(request.request_id, request.client, request.arrival_s,
                                                             request.prompt_tokens, request.output_tokens)
        if record is None and self.waiting and self.router in QUEUE_ROUTERS:
            # a newcomer queues behind those already waiting (FIFO), and the queue is decided again:
            # a head that was waiting for a faster route now has somebody behind it
            self.waiting.append(request)
            return self._admit_waiting(now)
        view = self.view(now)
        try:
            if self.router in WAITING_ROUTERS:
                decision = decide(self.router, view, request)
                start = decision.start_s
                if self.backoff_rounding and start > now:
                    start = now + backoff_instant(start - now)
                return self._reserve(request, decision.route, now, start)
            route = self._route(view, request)
        except Infeasible:  # no route at all right now (a server is down): wait for a join
            self.waiting.append(request)
            return []
        if route is None:  # a central-queue router: every chain is full, wait in the FIFO
            self.waiting.append(request)
            return []
        if has_room(view, route):
            return self._reserve(request, route, now, now)
        if self.router == "petals":  # (the runtime profile: the refused question took its time too)
            asked = self._asking_s(request.client) if self.hop_level else 0.0
            return [Retry(now + asked + min(2.0 ** attempt, MAX_BACKOFF_S), request, attempt + 1)]
        self.waiting.append(request)
        return []

    def start(self, request_id: int, generation: int, now: float) -> list:
        session = self._current(request_id, generation)
        if session is None:
            return []
        record = self.records[request_id]
        record.hops = len(session.route.hops)
        record.start = now
        if self.hop_level:  # set-up (ask, open every hop), then the prompt's step leaves for the first hop
            record.start += self._setup_s(session)  # waiting ends when the route's sessions are open
            return [HopArrival(record.start + self._leg_s(session, 0, 1), request_id, generation, 1, 0)]
        if self.step_by_step:
            return [FirstToken(now + session.ttft_s, request_id, generation)]
        record.first_token = now + session.ttft_s
        return [Completion(session.end, request_id, generation)]

    def first_token(self, request_id: int, generation: int, now: float) -> list:
        session = self._current(request_id, generation)
        if session is None:
            return []
        self.records[request_id].first_token = now
        if session.request.output_tokens == 1:
            return [Completion(now, request_id, generation)]
        return [DecodeStep(now + session.per_token_s, request_id, generation, 2)]

    def decode_step(self, request_id: int, generation: int, tokens: int, now: float) -> list:
        session = self._current(request_id, generation)
        if session is None:
            return []
        if tokens >= session.request.output_tokens:
            return [Completion(now, request_id, generation)]
        return [DecodeStep(now + session.per_token_s, request_id, generation, tokens + 1)]

    # -- the runtime profile: hop by hop ------------------------------------------------------
    def _setup_s(self, session: Session) -> float:
        """The runtime's set-up: asking the coordinator (setup_s, plus `open_rtts` round trips to it:
        a connection of its own and the question), then opening each hop's session, one after the
        other, `open_rtts` round trips each (the connection's handshake and the open) and
        `open_hop_s`."""
        net, client = self.scenario.network, self.scenario.clients[session.request.client].location
        rtts = sum(net.rtt(client, self.scenario.servers[h.server].location) for h in session.route.hops)
        return self._asking_s(session.request.client) + self.open_rtts * rtts + self.open_hop_s * len(session.route.hops)

    def _asking_s(self, client: int) -> float:
        """The route's question: setup_s, plus `open_rtts` round trips to the coordinator (a new
        connection of its own, then the question) where there is one."""
        net = self.scenario.network
        if self.coordinator is None:
            return net.setup_s
        return net.setup_s + self.open_rtts * net.rtt(self.scenario.clients[client].location, self.coordinator)

    def _leg_s(self, session: Session, hop: int, step: int) -> float:
        """One way between the client and the hop's server: half the RTT and half the per-hop overhead."""
        net = self.scenario.network
        server = session.route.hops[hop].server
        overhead = net.prefill_overhead_s + net.prefill_s_per_token * session.request.prompt_tokens \
            if step == 1 else net.decode_overhead_s
        rtt = net.rtt(self.scenario.clients[session.request.client].location, self.scenario.servers[server].location)
        return (rtt + overhead) / 2

    def hop_arrive(self, request_id: int, generation: int, step: int, hop: int, now: float) -> list:
        """A step reaches a server. The runtime computes one step at a time per server (its compute
        thread): the step's serial work starts when the previous one ends. The reply leaves when
        both the device's time since arrival and the serial work are done (without `host_block_s`
        the device's time is the serial work)."""
        session = self._current(request_id, generation)
        if session is None:
            return []
        session.step, session.hop = step, hop
        hop_spec = session.route.hops[hop]
        if hop_spec.server in self.lost.get(request_id, ()):  # the client finds it gone: it repairs the route
            return self._replay_tail(session, hop, now)
        server = self.scenario.servers[hop_spec.server]
        device = hop_spec.blocks * (server.prefill_s(session.request.prompt_tokens) if step == 1 else server.decode_s)
        serial = device if self.host_block_s is None else hop_spec.blocks * self.host_block_s
        end = max(now, self.busy_until.get(hop_spec.server, 0.0)) + serial
        self.busy_until[hop_spec.server] = end
        leave = max(now + device, end)
        return [HopReply(leave + self._leg_s(session, hop, step), request_id, generation, step, hop)]

    def hop_reply(self, request_id: int, generation: int, step: int, hop: int, now: float) -> list:
        """A hop's reply reaches the client: on to the next hop, or the step is done."""
        session = self._current(request_id, generation)
        if session is None:
            return []
        if hop + 1 < len(session.route.hops):
            return [HopArrival(now + self._leg_s(session, hop + 1, step), request_id, generation, step, hop + 1)]
        done = now + self.client_step_s  # the client turns the last hidden states into a token
        if step == 1:
            self.records[request_id].first_token = done
        if step >= session.request.output_tokens:
            return [Completion(done, request_id, generation)]
        return [HopArrival(done + self._leg_s(session, 0, step + 1), request_id, generation, step + 1, 0)]

    def complete(self, request_id: int, generation: int, now: float) -> list:
        session = self._current(request_id, generation)
        if session is None:
            return []
        self.records[request_id].completion = now
        self._release(session, now)
        return self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> list:
        follow_ups, still = [], deque()
        while self.waiting:
            request = self.waiting.popleft()
            result = self.arrive(request, now, attempt=0)
            if self.waiting and self.waiting[-1] is request:  # still no room: keep FIFO order, stop
                self.waiting.pop()
                still.append(request)
                still.extend(self.waiting)
                self.waiting.clear()
                break
            follow_ups += result
        self.waiting = still
        return follow_ups

    def fail_server(self, server: int, now: float) -> list:
        """The server vanishes; every session through it restarts from scratch now. In the runtime
        profile a session under way instead repairs itself as the runtime's client does, when its
        step reaches the failed hop (now, if it is there): `_replay_tail`."""
        self._set_placement(Placement(tuple(s for s in self.placement.spans if s.server != server),
                                      self.placement.num_blocks))
        follow_ups = []
        for session in [s for s in self.sessions.values() if any(h.server == server for h in s.route.hops)]:
            if self.hop_level and self.records[session.request.request_id].start is not None:
                if session.route.hops[session.hop].server == server:  # its step is there: lost
                    follow_ups += self._replay_tail(session, session.hop, now)
                else:  # its step finds the server gone when it gets there (also if it rejoined: empty)
                    self.lost.setdefault(session.request.request_id, set()).add(server)
                continue
            follow_ups += self._restart(session, now)
        return follow_ups

    def _restart(self, session: Session, now: float) -> list:
        self._release(session, now)
        self.records[session.request.request_id].restarts += 1
        return self.arrive(session.request, now, attempt=0)

    def _replay_tail(self, session: Session, index: int, now: float) -> list:
        """The runtime's repair of a route whose hop `index` failed: a tail from that hop's first
        block over the servers left (the router's choice, with room now), each new hop opened (a
        round trip) and fed every step the session sent before (pipelined: a round trip, then the
        server's serial work for them all or the device's time for the prompt's, whichever is
        longer), after which the step in flight goes on from that hop. A restart when no tail has
        room now."""
        hops, request = session.route.hops, session.request
        lost = self.lost.pop(request.request_id, set()) - {h.server for h in hops[index:]}
        if lost:  # failed servers further back in the route: found when the step comes back there
            self.lost[request.request_id] = lost
        for hop in hops[index:]:  # the tail's slots are freed before the router looks
            self.active.get(hop.server, {}).pop(request.request_id, None)
            self._change_held(hop.server, -hop.blocks, now)
        try:
            decision = decide(self.router, self.view(now), request, hops[index].start)
        except Infeasible:
            decision = None
        if decision is None or decision.start_s > now or not has_room(self.view(now), decision.route):
            for hop in hops[index:]:  # as it was, for `_release`
                self.active.setdefault(hop.server, {})[request.request_id] = (session.end, hop.blocks)
                self._change_held(hop.server, hop.blocks, now)
            return self._restart(session, now)
        route = Route(hops[:index] + decision.route.hops)
        left = self.in_flight.pop(session.route) - 1
        if left:
            self.in_flight[session.route] = left
        self.in_flight[route] = self.in_flight.get(route, 0) + 1
        session.route = route
        for hop in decision.route.hops:
            self.active.setdefault(hop.server, {})[request.request_id] = (session.end, hop.blocks)
            self._change_held(hop.server, hop.blocks, now)
        sent, ready = session.step - 1, now  # steps every new hop must see again
        for position, hop in enumerate(decision.route.hops, start=index):
            round_trip = 2 * self._leg_s(session, position, 2)
            ready += round_trip * (self.open_rtts or 1) + self.open_hop_s  # open
            if sent:
                server = self.scenario.servers[hop.server]
                prompt = hop.blocks * server.prefill_s(request.prompt_tokens)
                serial = (prompt + hop.blocks * server.decode_s * (sent - 1) if self.host_block_s is None
                          else hop.blocks * self.host_block_s * sent)
                begin = max(ready, self.busy_until.get(hop.server, 0.0))
                self.busy_until[hop.server] = begin + serial
                ready = max(begin + serial, ready + prompt) + round_trip
        self.records[request.request_id].replays += 1
        self.generation += 1  # hop events of the old route are stale now
        session.generation = self.generation
        return [HopArrival(ready + self._leg_s(session, index, session.step), request.request_id, session.generation,
                           session.step, index)]

    def join_server(self, span: Span, now: float) -> list:
        spans = tuple(s for s in self.placement.spans if s.server != span.server) + (span,)
        self._set_placement(Placement(tuple(sorted(spans, key=lambda s: s.server)), self.placement.num_blocks))
        return self._admit_waiting(now)

    def _set_placement(self, placement: Placement) -> None:
        self.placement = placement
        self._index = block_index(placement)
        self._memo = {}
        self._free_times = FreeTimes(placement, len(self.scenario.servers), self._active_view, self.used)
