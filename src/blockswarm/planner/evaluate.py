"""Score a placement + router on a set of concurrent requests, as the MILP would score it."""

from __future__ import annotations

from typing import Callable

from blockswarm.core.specs import Placement, Request, Route, Scenario
from blockswarm.perf.model import route_per_token_s
from blockswarm.planner.view import SwarmView


def total_per_token_s(scenario: Scenario, placement: Placement, router: Callable[[SwarmView, Request], Route],
                      requests: list[Request]) -> float | None:
    """Σ per-token time of routing every request on `placement` (no load), or None when the
    requests' caches would break the memory rule s_m·m_j + s_c·(blocks used) ≤ M_j."""
    view = SwarmView(scenario, placement)
    routes = [router(view, r) for r in requests]
    used: dict[int, int] = {}
    for route in routes:
        for hop in route.hops:
            used[hop.server] = used.get(hop.server, 0) + hop.blocks
    for span in placement.spans:
        need = scenario.model.block_bytes * span.length + scenario.session_cache_bytes * used.get(span.server, 0)
        if need > scenario.servers[span.server].memory_bytes * (1 + 1e-12):
            return None
    return sum(route_per_token_s(scenario, r, q.client) for r, q in zip(routes, requests))
