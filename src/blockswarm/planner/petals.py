"""The PETALS baseline (§3): its block-count rule, its lexicographic placement with servers
joining in random order, and its Dijkstra routing with the cache penalty."""

from __future__ import annotations

import random

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Request, Route, Scenario, Span
from blockswarm.planner.routing import has_room, memo_route, shortest_route
from blockswarm.planner.view import SwarmView

GIB = 2**30
UNKNOWN_RTT_S = 0.15
HOP_OVERHEAD_S = 0.018
CACHE_PENALTY_S = 10.0


def attn_cache_tokens(scenario: Scenario) -> int:
    return 16384 if scenario.model.kv_groups > 1 else 4096


def block_count(scenario: Scenario, server: int) -> int:
    """m_j = min(⌊(M_j − autograd_reserve) / (s_m + cache_per_block)⌋, L)."""
    model = scenario.model
    reserve = 2 * GIB * model.d_model / 14336
    cache_per_block = 2 * model.d_model * attn_cache_tokens(scenario) * model.kv_bytes / model.kv_groups
    usable = scenario.servers[server].memory_bytes - reserve
    return max(0, min(int(usable // (model.block_bytes + cache_per_block)), model.num_blocks))


def cache_slots(scenario: Scenario, blocks: int) -> int:
    """Sessions of the workload's maximal length that PETALS' fixed cache holds, in block-sessions."""
    return blocks * (attn_cache_tokens(scenario) // scenario.workload.max_tokens)


def throughput(scenario: Scenario, server: int, blocks: int) -> float:
    """min(forward_rps / ((1 + m_j) / 2), network_rps), as PETALS announces it."""
    spec = scenario.servers[server]
    forward_rps = 1.0 / spec.decode_s
    bandwidth = scenario.network.bandwidth_bps.get((spec.location, spec.location), 1e9)
    network_rps = bandwidth / (scenario.model.d_model * 16)  # 16-bit hidden states, bits/s
    return min(forward_rps / ((1 + blocks) / 2), network_rps)


def place(scenario: Scenario, seed: int | None = None) -> Placement:
    L = scenario.model.num_blocks
    order = list(range(len(scenario.servers)))
    if scenario.behaviour.petals_join_order is not None:  # pinned (a published run's), else random per seed
        order = list(scenario.behaviour.petals_join_order)
    else:
        random.Random(scenario.workload.seed if seed is None else seed).shuffle(order)
    per_block = [0.0] * L
    spans = []
    for server in order:
        m = block_count(scenario, server)
        if m == 0:
            continue
        start = min(range(L - m + 1), key=lambda a: (sorted(per_block[a:a + m]), a))
        rps = throughput(scenario, server, m)
        for block in range(start, start + m):
            per_block[block] += rps
        spans.append(Span(server, start, start + m, cache_slots(scenario, m)))
    if not spans or min(per_block) == 0:
        raise Infeasible("PETALS placement leaves blocks uncovered: the swarm has too little memory for this model")
    return Placement(tuple(sorted(spans, key=lambda s: s.server)), L)


def route(view: SwarmView, request: Request, start: int = 0) -> Route:
    scenario = view.scenario
    client = scenario.clients[request.client]

    def cost(server: int, start: int, end: int, penalize: bool = True) -> float:
        spec = scenario.servers[server]
        rtt = scenario.network.rtt(client.location, spec.location) if scenario.network.rtt_s else UNKNOWN_RTT_S
        blocks = end - start
        penalty = CACHE_PENALTY_S if penalize and blocks > view.free_slots(server) else 0.0
        return rtt / 2 + HOP_OVERHEAD_S + blocks * spec.decode_s + penalty

    # The penalty only adds cost, so the unpenalized shortest route wins whenever it has room.
    static = memo_route(view, ("petals", request.client), lambda j, a, b: cost(j, a, b, penalize=False), start)
    if has_room(view, static):
        return static
    return shortest_route(view.placement, cost, view.index, start)[1]
