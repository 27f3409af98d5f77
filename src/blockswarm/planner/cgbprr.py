"""CG-BPRR (§4): conservative block counts, greedy placement, shortest-path routing, Theorem-2 bound.

R is the number of concurrent requests the placement must carry: every server keeps cache for
R sessions on all its blocks, so cache never runs out while concurrency stays ≤ R.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Request, Route, Scenario, Span
from blockswarm.perf.model import blocks_beside_cache, decode_link_s, hop_decode_s
from blockswarm.planner.routing import memo_route
from blockswarm.planner.view import SwarmView


@dataclass(frozen=True, slots=True)
class CgbpResult:
    placement: Placement
    R: int
    K: int  # servers placed when every block first had capacity ≥ R
    bound_per_token_s: float  # Theorem 2: the average per-token time is at most this
    order: tuple[int, ...]  # servers by ascending amortized time t̃_j


def conservative_blocks(scenario: Scenario, server: int, R: int) -> int:
    """m_j = min(⌊M_j / (s_m + s_c·R)⌋, L), and at most the scenario's cap for the server's hardware."""
    cap = scenario.behaviour.max_blocks.get(scenario.servers[server].hardware, scenario.model.num_blocks)
    return min(blocks_beside_cache(scenario, server, R), cap)


def guaranteed_sessions(scenario: Scenario, server: int, blocks: int) -> int:
    """s̄_j = ⌊(M_j − s_m·m_j) / (s_c·m_j)⌋."""
    free = scenario.servers[server].memory_bytes - scenario.model.block_bytes * blocks
    return int(free // (scenario.session_cache_bytes * blocks))


def is_feasible(scenario: Scenario, R: int) -> bool:
    """Σ_j min(⌊M_j/(s_m + s_c·R)⌋, L) ≥ L is necessary; the greedy then decides coverage."""
    if sum(conservative_blocks(scenario, j, R) for j in range(len(scenario.servers))) < scenario.model.num_blocks:
        return False
    try:
        place(scenario, R)
        return True
    except Infeasible:
        return False


def max_feasible_R(scenario: Scenario, limit: int = 1 << 16) -> int:
    """The largest R the swarm can be placed for (0 if not even one request fits)."""
    if not is_feasible(scenario, 1):
        return 0
    low, high = 1, 2
    while high <= limit and is_feasible(scenario, high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if is_feasible(scenario, middle) else (low, middle)
    return low


def place(scenario: Scenario, R: int) -> CgbpResult:
    if R < 1:
        raise Infeasible(f"R must be at least 1, got {R}")
    L = scenario.model.num_blocks
    servers = range(len(scenario.servers))
    m = {j: conservative_blocks(scenario, j, R) for j in servers}
    usable = [j for j in servers if m[j] > 0]
    if not usable:
        raise Infeasible(f"no server can hold one block plus cache for R={R} sessions; lower R or add memory")
    worst_link = {j: max(decode_link_s(scenario, c, j) for c in range(len(scenario.clients))) for j in usable}
    amortized = {j: scenario.servers[j].decode_s + worst_link[j] / m[j] for j in usable}
    order = sorted(usable, key=lambda j: (amortized[j], j))
    t0 = max(amortized.values()) + 1.0
    capacity = [0] * L
    total = [R * t0] * L
    spans, K = [], 0
    for placed, j in enumerate(order, start=1):
        size = m[j]
        sessions = guaranteed_sessions(scenario, j, size)
        windows = range(L - size + 1)
        if min(capacity) < R:
            candidates = [a for a in windows if min(capacity[a:a + size]) < R]
            start = max(candidates, key=lambda a: (sum(total[a:a + size]), -a))
        else:
            start = min(windows, key=lambda a: (sorted(capacity[a:a + size]), a))
        for b in range(start, start + size):
            total[b] -= (t0 - amortized[j]) * min(max(R - capacity[b], 0), sessions)
            capacity[b] += sessions
        spans.append(Span(j, start, start + size, sessions * size))
        if K == 0 and min(capacity) >= R:
            K = placed
    if min(capacity) < R:
        short = [b for b in range(L) if capacity[b] < R]
        raise Infeasible(f"the swarm cannot hold R={R} concurrent requests on every block "
                         f"(blocks {short[0]}..{short[-1]} fall short); lower R or add servers")
    first = order[:K]
    blocks_first = sum(m[j] for j in first)
    bound = sum(amortized[j] * m[j] for j in first) - scenario.servers[first[-1]].decode_s * (blocks_first - L)
    placement = Placement(tuple(sorted(spans, key=lambda s: s.server)), L)
    return CgbpResult(placement, R, K, bound, tuple(order))


def route(view: SwarmView, request: Request, start: int = 0) -> Route:
    """Shortest path on the feasibility DAG with per-token costs t_cj + τ_j·k (load ignored)."""
    scenario = view.scenario
    return memo_route(view, ("shortest", request.client),
                      lambda j, a, b: hop_decode_s(scenario, request.client, j, b - a), start)
