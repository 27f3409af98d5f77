"""Shortest route over block boundaries, shared by every routing policy.

Nodes are block boundaries 0..L. From boundary b, a server j whose span contains block b
(a_j ≤ b < a_j + m_j) carries the request to its span's end; the caller prices that hop. This is
the feasibility DAG of §4 (a server always computes from where it enters to its end), so
Dijkstra on it gives CG-BPRR's shortest path, PETALS' Dijkstra and WS-RR's waiting-aware path.
"""

from __future__ import annotations

import heapq
from typing import Callable

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Hop, Placement, Route

HopCost = Callable[[int, int, int], float | None]  # (server, start, end) -> cost, None to forbid


def memo_route(view, key: tuple, hop_cost: HopCost, start: int = 0) -> Route:
    """The shortest route (from block boundary `start`) under a load-independent cost, remembered in
    the view's memo (one per placement, owned by the caller) so that a stream of requests pays for
    Dijkstra once per key."""
    memo = view.memo
    key = (*key, start)
    if memo is not None and key in memo:
        return memo[key]
    route = shortest_route(view.placement, hop_cost, view.index, start)[1]
    if memo is not None:
        memo[key] = route
    return route


def has_room(view, route: Route) -> bool:
    return all(view.free_slots(hop.server) >= hop.blocks for hop in route.hops)


def block_index(placement: Placement) -> tuple[tuple, ...]:
    """For each block, the spans that hold it (build once per placement when routing many requests)."""
    by_block: list[list] = [[] for _ in range(placement.num_blocks)]
    for span in placement.spans:
        for block in range(span.start, span.end):
            by_block[block].append(span)
    return tuple(tuple(spans) for spans in by_block)


def shortest_route(placement: Placement, hop_cost: HopCost, index: tuple | None = None,
                   start: int = 0) -> tuple[float, Route]:
    """The cheapest route from block boundary `start` (0 unless a route's tail is being replaced) to L."""
    L = placement.num_blocks
    by_block = index if index is not None else block_index(placement)
    best = {start: 0.0}
    previous: dict[int, tuple[int, Hop]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == L:
            break
        if cost > best[boundary]:
            continue
        for span in by_block[boundary]:
            step = hop_cost(span.server, boundary, span.end)
            if step is None:
                continue
            total = cost + step
            if total < best.get(span.end, float("inf")):
                best[span.end] = total
                previous[span.end] = (boundary, Hop(span.server, boundary, span.end))
                heapq.heappush(queue, (total, span.end))
    if L not in best:
        covered = sorted({(s.start, s.end) for s in placement.spans})
        raise Infeasible(f"no route covers blocks {start}:{L} (spans held: {covered[:12]}"
                         f"{' ...' if len(covered) > 12 else ''})")
    hops, boundary = [], L
    while boundary != start:
        boundary, hop = previous[boundary]
        hops.append(hop)
    return best[L], Route(tuple(hops[::-1]))
