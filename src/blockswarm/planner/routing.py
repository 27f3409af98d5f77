"""Shortest route over block boundaries, shared by every routing policy.

Nodes are block boundaries 0..L. From boundary b, a server j whose span contains block b
(a_j ≤ b < a_j + m_j) carries the request to its span's end; the caller prices that hop. This is
the feasibility DAG of §4 (a server always computes from where it enters to its end), so
Dijkstra on it gives CG-BPRR's shortest path, PETALS' Dijkstra and WS-RR's waiting-aware path.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

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


@dataclass(frozen=True)
class BoundaryGraph:
    """The same DAG as arrays, for routers that price every hop of a decision in one numpy step.
    Nodes are `start` and every span end after it (no other boundary is ever reached, so hops
    entering elsewhere are left out). Edges are cut into segments, one per (target node, source
    node), ordered by target, then source, and inside a segment in span order: Dijkstra's
    relaxation order, so that `cheapest` resolves ties as `shortest_route` does."""

    boundaries: tuple[int, ...]  # node -> block boundary; node 0 is `start`, the last is L
    server: np.ndarray  # edge -> server
    entry: np.ndarray  # edge -> the boundary it enters its server at
    blocks: np.ndarray  # edge -> blocks it computes (its span's end − entry)
    segments: tuple[tuple[int, int, int, int], ...]  # (target node, source node, first edge, end edge)
    segment_starts: np.ndarray  # each segment's first edge (for np.minimum.reduceat)


def boundary_graph(placement: Placement, start: int = 0) -> BoundaryGraph:
    L = placement.num_blocks
    boundaries = sorted({start} | {s.end for s in placement.spans if s.end > start})
    if boundaries[-1] != L:
        boundaries.append(L)  # unreachable: no edge reaches it, and `cheapest` says so
    ending: dict[int, list] = {}
    for span in placement.spans:
        ending.setdefault(span.end, []).append(span)
    server, entry, blocks, segments = [], [], [], []
    for target, end in enumerate(boundaries[1:], 1):
        for source, b in enumerate(boundaries[:target]):
            first = len(server)
            for span in ending.get(end, ()):
                if span.start <= b:
                    server.append(span.server), entry.append(b), blocks.append(end - b)
            if len(server) > first:
                segments.append((target, source, first, len(server)))
    as_array = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
    return BoundaryGraph(tuple(boundaries), as_array(server), as_array(entry), as_array(blocks), tuple(segments),
                         as_array([segment[2] for segment in segments]))


def cheapest(graph: BoundaryGraph, cost: np.ndarray) -> tuple[Route, list[int]] | None:
    """The cheapest route through `graph` with `cost` per edge (math.inf forbids an edge) and the
    edges it takes; None when nothing reaches L. The graph is a DAG in boundary order, so one pass
    over its segments suffices, each priced by its cheapest edge (rounding is monotone, so
    best + min(cost) is the min of best + cost); numpy finds the edge only on the chosen route."""
    nodes = len(graph.boundaries)
    best, via = [math.inf] * nodes, [-1] * nodes
    best[0] = 0.0
    cheapest_in = np.minimum.reduceat(cost, graph.segment_starts).tolist() if graph.segments else []
    for k, (target, source, _, _) in enumerate(graph.segments):
        total = best[source] + cheapest_in[k]
        if total < best[target] or (total == best[target] != math.inf
                                    and best[source] < best[graph.segments[via[target]][1]]):
            # Dijkstra keeps the first relaxation: from the source it settled first (cheapest, then
            # lowest boundary; segments come by boundary, so an equal one later never replaces it)
            best[target], via[target] = total, k
    if via[-1] < 0:
        return None
    hops, edges, target = [], [], nodes - 1
    while target != 0:
        _, source, first, end = graph.segments[via[target]]
        edge = first + int((best[source] + cost[first:end]).argmin())  # the first in span order
        edges.append(edge)
        hops.append(Hop(int(graph.server[edge]), int(graph.entry[edge]), graph.boundaries[target]))
        target = source
    return Route(tuple(hops[::-1])), edges[::-1]
