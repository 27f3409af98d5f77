"""WS-RR (§5): route each arriving request at once on the waiting-penalized shortest path.

A hop into server j computing k blocks needs k cache slots until the request completes; its
cost is the time until k slots are free (0 if free now) plus the request's service time on
that hop (prefill + decode terms of §2). The caller reserves the slots along the chosen route.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Request, Route, Scenario
from blockswarm.perf.model import ServerTable, default_request, hop_service_array, hop_service_s, route_time
from blockswarm.planner import cgbprr
from blockswarm.planner.freetimes import FreeTimes
from blockswarm.planner.routing import boundary_graph, cheapest, has_room, memo_route
from blockswarm.planner.view import SwarmView


EVERY = slice(None)  # all entries of a table selected per edge


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    route: Route
    start_s: float  # when every hop of the route has its slots: an absolute time, never now + a wait,
    # so that a start equals the end it waited for exactly (float rounding would overlap them)


def route(view: SwarmView, request: Request, start: int = 0) -> RoutingDecision:
    """`start` > 0: the tail of a route from that block boundary (a failed hop's replacement)."""
    static = _free_now(view, request, start)
    return RoutingDecision(static, view.now) if static is not None else _search(view, request, start)[0]


def _free_now(view: SwarmView, request: Request, start: int) -> Route | None:
    """Exact shortcut: waiting only adds to a route's cost, so the shortest route without waiting is
    optimal whenever all its hops have room now (the common case when R is sized well); None when
    some hop is full and the full search must run."""
    scenario = view.scenario
    static = memo_route(view, ("wsrr", request.client, request.prompt_tokens, request.output_tokens),
                        lambda j, a, b: hop_service_s(scenario, request, j, b - a), start)
    return static if has_room(view, static) else None


def _search(view: SwarmView, request: Request, start: int):
    """The full waiting-aware search: (decision, the hops' free times, their costs, the graph)."""
    graph, ready, cost = _priced(view, request, start)
    found = cheapest(graph, cost)
    if found is None:
        raise Infeasible("no route can ever get cache for this request: it needs more slots than servers have")
    chosen, edges = found
    return RoutingDecision(chosen, max(view.now, float(ready[edges].max()))), ready, cost, graph


def _priced(view: SwarmView, request: Request, start: int):
    """The boundary graph from `start`, each hop's free time, and each hop's cost: its wait for
    slots (an absolute free time, so max(now, ·)) + its service."""
    memo = view.memo if view.memo is not None else {}
    graph = memo.get(("wsrr-graph", start))
    if graph is None:
        graph = memo[("wsrr-graph", start)] = boundary_graph(view.placement, start)
    # the servers' constants per edge of the graph (a table whose "servers" are the edges); the memo
    # follows the placement, and servers may join the scenario meanwhile, hence the identity check
    kept = memo.get(("wsrr-edges", start))
    if kept is None or kept[0] is not view.scenario:
        kept = memo[("wsrr-edges", start)] = (view.scenario, ServerTable.of(view.scenario).select(graph.server))
    times = view.free_times if view.free_times is not None else FreeTimes.of_view(view)
    ready = times.table()[graph.server, graph.blocks]
    cost = np.maximum(ready - view.now, 0.0) + hop_service_array(view.scenario, kept[1], request, EVERY, graph.blocks)
    return graph, ready, cost


def route_or_queue(view: SwarmView, request: Request, start: int = 0) -> Route | None:
    """WS-RR admitted through a central queue (blockswarm's `wsrr-queue`). WS-RR's choice (the route
    minimizing wait + service) is taken when it can start now. When it would wait for a busy
    faster route, the request waits for it only while nobody queues behind it; with a queue, the
    cheapest route free now is taken instead (the swarm keeps working, as JFFC does), and if
    none is free the request waits (None: the caller's FIFO queue; it is decided again when cache
    frees up or another request arrives). Nothing is reserved ahead, so slots never sit idle
    under a reservation whose turn has not come."""
    static = _free_now(view, request, start)
    if static is not None:
        return static
    decision, ready, cost, graph = _search(view, request, start)
    if decision.start_s <= view.now:
        return decision.route
    if view.queued == 0:
        return None
    found = cheapest(graph, np.where(ready <= view.now, cost, math.inf))  # the same prices, free hops only
    return None if found is None else found[0]


def choose_R(scenario: Scenario, rate: float | None = None, largest: int | None = None) -> int:
    """R = round(λ·T̄ + √(λ·T̄)), T̄ the time of one request under the offline plan, capped by the largest feasible R."""
    rate = scenario.workload.rate if rate is None else rate
    largest = cgbprr.max_feasible_R(scenario) if largest is None else largest  # (a caller that has it passes it)
    if largest == 0:
        raise Infeasible("the swarm cannot hold the model plus one request's cache; add servers or memory")
    # T̄ comes from the plan without the scenario's block caps (as the published simulator estimates it)
    uncapped = dataclasses.replace(scenario, behaviour=dataclasses.replace(scenario.behaviour, max_blocks={}))
    plan = cgbprr.place(uncapped, 1)
    view = SwarmView(uncapped, plan.placement)
    times = []
    for client in range(len(scenario.clients)):
        request = default_request(scenario, client)
        times.append(route_time(scenario, cgbprr.route(view, request), request).completion_s)
    load = rate * sum(times) / len(times)
    return max(1, min(largest, round(load + math.sqrt(load))))
