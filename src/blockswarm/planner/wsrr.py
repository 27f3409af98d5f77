"""WS-RR (§5): route each arriving request at once on the waiting-penalized shortest path.

A hop into server j computing k blocks needs k cache slots until the request completes; its
cost is the time until k slots are free (0 if free now) plus the request's service time on
that hop (prefill + decode terms of §2). The caller reserves the slots along the chosen route.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Request, Route, Scenario
from blockswarm.perf.model import default_request, hop_service_s, route_time
from blockswarm.planner import cgbprr
from blockswarm.planner.routing import has_room, memo_route, shortest_route
from blockswarm.planner.view import SwarmView


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    route: Route
    start_s: float  # when every hop of the route has its slots: an absolute time, never now + a wait,
    # so that a start equals the end it waited for exactly (float rounding would overlap them)


def route(view: SwarmView, request: Request, start: int = 0) -> RoutingDecision:
    """`start` > 0: the tail of a route from that block boundary (a failed hop's replacement)."""
    scenario = view.scenario
    # Exact shortcut: waiting only adds to a route's cost, so the shortest route without waiting
    # is optimal whenever all its hops have room now (the common case when R is sized well).
    static = memo_route(view, ("wsrr", request.client, request.prompt_tokens, request.output_tokens),
                        lambda j, a, b: hop_service_s(scenario, request, j, b - a), start)
    if has_room(view, static):
        return RoutingDecision(static, view.now)
    free_at: dict[tuple[int, int], float] = {}

    def cost(server: int, start: int, end: int) -> float | None:
        ready = view.slots_free_at(server, end - start)
        if ready is None:
            return None
        free_at[(server, end - start)] = ready
        return (ready - view.now) + hop_service_s(scenario, request, server, end - start)

    try:
        chosen = shortest_route(view.placement, cost, view.index, start)[1]
    except Infeasible:
        raise Infeasible("no route can ever get cache for this request: it needs more slots than servers have")
    return RoutingDecision(chosen, max(free_at[(h.server, h.blocks)] for h in chosen.hops))


def choose_R(scenario: Scenario, rate: float | None = None) -> int:
    """R = round(λ·T̄ + √(λ·T̄)), T̄ the time of one request under the offline plan, capped by the largest feasible R."""
    rate = scenario.workload.rate if rate is None else rate
    largest = cgbprr.max_feasible_R(scenario)
    if largest == 0:
        raise Infeasible("the swarm cannot hold the model plus one request's cache; add servers or memory")
    plan = cgbprr.place(scenario, 1)
    view = SwarmView(scenario, plan.placement)
    times = []
    for client in range(len(scenario.clients)):
        request = default_request(scenario, client)
        times.append(route_time(scenario, cgbprr.route(view, request), request).completion_s)
    load = rate * sum(times) / len(times)
    return max(1, min(largest, round(load + math.sqrt(load))))
