"""Routing-only integer program for a fixed placement (§6): integer flows per client.

Per client c and hop option (server j entered at boundary b, leaving at its end e_j) an integer
y = how many of c's requests take that hop. Flow conservation over block boundaries sends n_c
requests from 0 to L; a server's cache holds at most n_j block-sessions:
Σ_c Σ_b (e_j − b)·y ≤ n_j. Minimizes the summed per-token time.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Hop, Placement, Route, Scenario
from blockswarm.perf.model import hop_decode_s
from blockswarm.planner.mip import Model, Solution


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    routes: dict[int, list[tuple[Route, int]]]  # client -> [(route, number of requests)]
    objective: float  # Σ over requests of per-token time
    solution: Solution


def solve(scenario: Scenario, placement: Placement, requests_per_client: dict[int, int],
          time_limit_s: float = 60.0) -> RoutingPlan:
    L = placement.num_blocks
    model = Model()
    options = [(span.server, b, span.end) for span in placement.spans for b in range(span.start, span.end)]
    y: dict[tuple[int, int, int, int], int] = {}
    for client, count in requests_per_client.items():
        for server, b, end in options:
            y[(client, server, b, end)] = model.var(cost=hop_decode_s(scenario, client, server, end - b),
                                                    upper=count, integer=True)
        for boundary in range(L + 1):
            out = [(y[(client, s, b, e)], 1) for s, b, e in options if b == boundary]
            into = [(y[(client, s, b, e)], -1) for s, b, e in options if e == boundary]
            supply = count if boundary == 0 else -count if boundary == L else 0
            model.row(out + into, lower=supply, upper=supply)
    for span in placement.spans:
        terms = [(var, key[3] - key[2]) for key, var in y.items() if key[1] == span.server]
        model.row(terms, upper=span.slots)
    solution = model.solve(time_limit_s)
    if solution.values is None:
        raise Infeasible(f"no routing fits the caches of this placement ({solution.status}); "
                         "fewer concurrent requests or a placement with more cache")
    x = solution.values
    routes = {client: _decompose({k: round(x[v]) for k, v in y.items() if k[0] == client}, L)
              for client in requests_per_client}
    return RoutingPlan(routes, solution.objective, solution)


def _decompose(flows: dict[tuple[int, int, int, int], int], L: int) -> list[tuple[Route, int]]:
    """Split an integer flow from boundary 0 to L into paths with their multiplicities."""
    flows = {k: v for k, v in flows.items() if v > 0}
    paths = []
    while flows:
        hops, boundary = [], 0
        while boundary != L:
            key = next(k for k in flows if k[2] == boundary)
            hops.append(key)
            boundary = key[3]
        amount = min(flows[k] for k in hops)
        for key in hops:
            flows[key] -= amount
            if flows[key] == 0:
                del flows[key]
        paths.append((Route(tuple(Hop(k[1], k[2], k[3]) for k in hops)), amount))
    return paths
