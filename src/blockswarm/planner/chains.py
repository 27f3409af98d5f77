"""Chain composition with a central queue (published-runs.md §B; Sun, He, Hou, MobiHoc 2026).

- GBP-CR: for a target concurrency c per chain, each server holds m_j(c) = min(⌊M_j/(s_m+s_c·c)⌋, L)
  blocks; servers sorted by amortized time t_j(c)/m_j(c) fill *disjoint* chains greedily (fast
  servers with fast servers) until the chains' service rate covers the load, Σ c/T_k ≥ λ/ρ̄.
- GCA: on the routing DAG of any placement, repeatedly take the fastest route whose hops still
  have cache, give it capacity c_k = min over hops ⌊residual_j / k_j⌋, subtract, repeat.
- JFFC: a request takes the fastest chain with a free slot, else waits in one central FIFO
  queue; a completion hands its slot to the head of the queue (the simulator's FIFO does that).

Where the authors' code differs from our model we follow ours and say so: a hop computes only
the blocks it is entered for (their DAG makes a server compute its whole span), and a chain's
time is our §2 model's for the workload's lengths (their τᶜ_j + τᵖ_j·m_j per server), averaged
over clients when there are several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Hop, Placement, Request, Route, Scenario, Span
from blockswarm.perf.model import blocks_beside_cache, default_request, hop_service_s, route_time, slots
from blockswarm.planner.routing import shortest_route
from blockswarm.planner.view import SwarmView

TARGET_UTILIZATION = 0.9  # ρ̄ of GBP-CR's stopping rule (the authors' default)


@dataclass(frozen=True, slots=True)
class Chain:
    route: Route
    capacity: int  # concurrent requests it is given cache for
    service_s: float  # a request's time on it (the workload's lengths, no waiting)


def chain_time(scenario: Scenario, route: Route) -> float:
    """T_k: one request's completion time on `route`, averaged over clients."""
    requests = [default_request(scenario, c) for c in range(len(scenario.clients))]
    return sum(route_time(scenario, route, r).completion_s for r in requests) / len(requests)


def _hop_time(scenario: Scenario, requests: list[Request], server: int, blocks: int) -> float:
    return sum(hop_service_s(scenario, r, server, blocks) for r in requests) / len(requests)


def gbp_cr(scenario: Scenario, c: int, rate: float | None = None) -> Placement:
    """GBP-CR's placement for concurrency `c` per chain and arrival rate `rate` (the workload's)."""
    if c < 1:
        raise Infeasible(f"the concurrency per chain c must be at least 1, got {c}")
    L = scenario.model.num_blocks
    rate = scenario.workload.rate if rate is None else rate
    requests = [default_request(scenario, client) for client in range(len(scenario.clients))]
    m = {j: blocks_beside_cache(scenario, j, c) for j in range(len(scenario.servers))}
    usable = [j for j, blocks in m.items() if blocks > 0]
    if sum(m[j] for j in usable) < L:
        raise Infeasible(f"the swarm cannot hold one chain with cache for c={c} requests on every block; "
                         "lower c or add servers")
    order = sorted(usable, key=lambda j: (_hop_time(scenario, requests, j, m[j]) / m[j], j))
    spans, hops, position, service_rate = [], [], 0, 0.0
    for j in order:
        size = min(m[j], L - position)
        spans.append(Span(j, position, position + size, slots(scenario, j, size)))
        hops.append(Hop(j, position, position + size))
        position += size
        if position == L:  # a chain is complete
            service_rate += c / chain_time(scenario, Route(tuple(hops)))
            hops, position = [], 0
            if service_rate >= rate / TARGET_UTILIZATION:
                break
    if service_rate == 0.0:
        raise Infeasible(f"the swarm cannot form one chain for c={c}")
    return Placement(tuple(sorted(spans, key=lambda s: s.server)), L)


def gca(scenario: Scenario, placement: Placement) -> tuple[Chain, ...]:
    """GCA's chains, fastest first, each with the capacity its hops' cache gives it."""
    requests = [default_request(scenario, client) for client in range(len(scenario.clients))]
    residual = {span.server: span.slots for span in placement.spans}
    chains = []
    while True:
        def cost(server: int, start: int, end: int) -> float | None:
            return _hop_time(scenario, requests, server, end - start) if residual[server] >= end - start else None

        try:
            route = shortest_route(placement, cost)[1]
        except Infeasible:
            break
        capacity = min(residual[h.server] // h.blocks for h in route.hops)
        for hop in route.hops:
            residual[hop.server] -= capacity * hop.blocks
        chains.append(Chain(route, capacity, chain_time(scenario, route)))
    return tuple(sorted(chains, key=lambda chain: chain.service_s))


def whole_model(scenario: Scenario) -> Placement:
    """Every server that can hold all L blocks and one session's cache holds them (`jffc-whole`)."""
    L = scenario.model.num_blocks
    held = {j: slots(scenario, j, L) for j in range(len(scenario.servers))}
    spans = tuple(Span(j, 0, L, n) for j, n in held.items() if n >= L)
    if not spans:
        need = (scenario.model.block_bytes + scenario.session_cache_bytes) * L / 1e9
        raise Infeasible(f"no server can hold the whole model ({L} blocks) plus one session's cache "
                         f"({need:.1f} GB); jffc-whole needs at least one; use `chains` to split the model")
    return Placement(spans, L)


def response_estimate_s(chains: tuple[Chain, ...], rate: float) -> float:
    """The mean response time JFFC should give at `rate`: the load poured into the fastest chains up
    to their throughput c_k/T_k (the service part, a lower bound), plus the M/M/n wait of one queue
    in front of all n = Σ c_k slots at that mean service time (Erlang C). Infinite when the chains
    cannot carry the rate."""
    fastest = chains[0].service_s
    if rate <= 0:
        return fastest
    remaining, busy = rate, 0.0  # busy: slots in use on average (Little), Σ share_k·T_k
    for chain in chains:
        share = min(remaining, chain.capacity / chain.service_s)
        busy += share * chain.service_s
        remaining -= share
    slots_total = sum(chain.capacity for chain in chains)
    if remaining > 1e-12 or busy >= slots_total:
        return math.inf
    service = busy / rate
    blocking = 1.0  # Erlang B by its recursion, then C from B
    for k in range(1, slots_total + 1):
        blocking = busy * blocking / (k + busy * blocking)
    waiting = slots_total * blocking / (slots_total - busy * (1 - blocking))
    return service + waiting * service / (slots_total - busy)


def gbpcr_candidates(scenario: Scenario, rate: float, largest: int = 256):
    """(c, placement, its GCA chains' `response_estimate_s` at `rate`) for c = 1, 2, … while GBP-CR
    places and GCA finds a chain."""
    for c in range(1, largest + 1):
        try:
            placement = gbp_cr(scenario, c, rate)
        except Infeasible:
            return
        found = gca(scenario, placement)
        if not found:
            return
        yield c, placement, response_estimate_s(found, rate)


def tune_c(scenario: Scenario, rate: float | None = None) -> int:
    """The concurrency per chain whose GBP-CR + GCA chains give the lowest `response_estimate_s`
    (the smallest such c on ties; the largest c that places at all when none can carry the rate).
    The authors tune c by their lower bound or by simulation; this estimate adds the queueing
    their bound leaves out, which at equal service times favours more slots."""
    rate = scenario.workload.rate if rate is None else rate
    scored = [(estimate, c) for c, _, estimate in gbpcr_candidates(scenario, rate)]
    if not scored:
        raise Infeasible("the swarm cannot hold one chain of the model plus one session's cache")
    best = min(scored)  # (estimate, c): the smallest c among equal estimates
    return best[1] if best[0] != math.inf else scored[-1][1]


def jffc(view: SwarmView, request: Request, start: int = 0) -> Route | None:
    """Join the fastest free chain: the fastest GCA chain with fewer requests in flight than its
    capacity, or None (the caller queues the request in one FIFO). The chains are GCA's on the
    view's placement, remembered in its memo. A tail (`start` > 0, after a failure) takes the
    tail of the fastest chain that passes `start` with room, else none."""
    chains = _chains(view)
    in_flight = view.routes_in_flight or {}
    for chain in chains:
        if in_flight.get(chain.route, 0) < chain.capacity:
            if start == 0:
                return chain.route
            tail = tuple(h for h in chain.route.hops if h.end > start)
            if tail and tail[0].start <= start:
                return Route((Hop(tail[0].server, start, tail[0].end),) + tail[1:])
    return None


def _chains(view: SwarmView) -> tuple[Chain, ...]:
    memo = view.memo if view.memo is not None else {}
    kept = memo.get("gca")
    if kept is None or kept[0] is not view.scenario:
        kept = memo["gca"] = (view.scenario, gca(view.scenario, view.placement))
    return kept[1]
