"""Small hand-made scenarios for planner tests, and the brute-force referee for the MILP."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from blockswarm.core.specs import (
    ClientSpec, Hop, ModelSpec, NetworkSpec, Placement, Request, Route, Scenario, ServerSpec, Span, WorkloadSpec,
)
from blockswarm.perf.model import route_per_token_s

# Sizes are synthetic but keep realistic ratios: s_m = 1 GB, s_c = 0.1 GB per block-session,
# and PETALS' autograd reserve and fixed cache stay small beside them.
BLOCK_BYTES = 1e9  # s_m
SESSION_BYTES = 1e8  # s_c = 2 · d_kv · 10 tokens · 4 bytes


def tiny_scenario(L: int, memories: list[float], decode_s: list[float], locations: list[str],
                  client_locations: list[str] = ("c0",), rtt: dict | None = None) -> Scenario:
    model = ModelSpec("tiny", num_blocks=L, d_model=1024, d_kv=1_250_000, params_per_block=int(BLOCK_BYTES),
                      weight_bytes_per_param=1.0, kv_bytes=4)
    servers = tuple(ServerSpec(f"s{j}", loc, mem, tau, 1e-5, 1e-3)
                    for j, (mem, tau, loc) in enumerate(zip(memories, decode_s, locations)))
    clients = tuple(ClientSpec(f"c{i}", loc) for i, loc in enumerate(client_locations))
    places = sorted(set(locations) | set(client_locations))
    rtt = rtt or {}
    rtt_s = {(a, b): rtt.get((a, b), rtt.get((b, a), 0.005 if a == b else 0.05)) for a in places for b in places}
    network = NetworkSpec(rtt_s=rtt_s, decode_overhead_s=0.01, prefill_overhead_s=0.01, setup_s=0.0)
    workload = WorkloadSpec(rate=0.1, num_requests=10, prompt_tokens=4, output_tokens=6,
                            max_prompt_tokens=4, max_output_tokens=6)
    return Scenario("tiny", model, servers, clients, network, workload)


@st.composite
def scenarios(draw, max_servers=4, max_blocks=6, min_servers=2):
    servers = draw(st.integers(min_servers, max_servers))
    L = draw(st.integers(3, max_blocks))
    memories = [draw(st.sampled_from([1.2e9, 1.5e9, 2.3e9, 3.5e9, 6.5e9])) for _ in range(servers)]
    taus = [draw(st.sampled_from([0.001, 0.003, 0.01, 0.02])) for _ in range(servers)]
    locations = [draw(st.sampled_from(["a", "b"])) for _ in range(servers)]
    clients = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2))
    return tiny_scenario(L, memories, taus, locations, clients)


def all_routes(placement: Placement) -> list[Route]:
    L = placement.num_blocks
    routes = []

    def extend(boundary: int, hops: list[Hop]):
        if boundary == L:
            routes.append(Route(tuple(hops)))
            return
        for span in placement.spans:
            if span.start <= boundary < span.end:
                extend(span.end, hops + [Hop(span.server, boundary, span.end)])

    extend(0, [])
    return routes


def brute_force_optimum(scenario: Scenario, requests: list[Request]) -> float | None:
    """min over every placement (m_j ≥ 1 each) and every route per request of Σ per-token time,
    subject to s_m·m_j + s_c·(blocks of j used by all requests) ≤ M_j. None if infeasible."""
    L = scenario.model.num_blocks
    s_m, s_c = scenario.model.block_bytes, scenario.session_cache_bytes
    options = []
    for j, spec in enumerate(scenario.servers):
        spans = [(a, e) for a in range(L) for e in range(a + 1, L + 1) if s_m * (e - a) <= spec.memory_bytes]
        if not spans:
            return None
        options.append(spans)
    best = None
    for choice in itertools.product(*options):
        placement = Placement(tuple(Span(j, a, e) for j, (a, e) in enumerate(choice)), L)
        routes = all_routes(placement)
        costs = {(id(r), q.client): route_per_token_s(scenario, r, q.client) for r in routes for q in requests}
        for assignment in itertools.product(routes, repeat=len(requests)):
            used = [0] * len(choice)
            for route in assignment:
                for hop in route.hops:
                    used[hop.server] += hop.blocks
            if any(s_m * (e - a) + s_c * used[j] > scenario.servers[j].memory_bytes + 1e-9
                   for j, (a, e) in enumerate(choice)):
                continue
            total = sum(costs[(id(r), q.client)] for r, q in zip(assignment, requests))
            if best is None or total < best:
                best = total
    return best
