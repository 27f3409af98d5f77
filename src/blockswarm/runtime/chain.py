"""Pick a chain of servers that covers blocks [0, L) from what the servers report.

Shortest path over block boundaries: from boundary b, a server whose span contains b can carry
the request to its span's end (a route may enter a server mid-span and always leaves at the
end). Each hop costs a fixed per-hop overhead plus the server's measured decode time for the
blocks it computes, so fast servers and few hops win.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.runtime.protocol import ServerInfo

HOP_OVERHEAD_S = 0.001  # transport cost of one hop on a LAN; keeps equal-speed chains short


@dataclass(frozen=True, slots=True)
class Hop:
    address: str
    start: int
    end: int


def choose_chain(infos: dict[str, ServerInfo], num_blocks: int) -> list[Hop]:
    best = {0: 0.0}
    previous: dict[int, tuple[int, Hop]] = {}
    queue = [(0.0, 0)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == num_blocks:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for address, info in sorted(infos.items()):
            if not info.start <= boundary < info.end:
                continue
            step = HOP_OVERHEAD_S + info.block_decode_s * (info.end - boundary)
            if cost + step < best.get(info.end, float("inf")):
                best[info.end] = cost + step
                previous[info.end] = (boundary, Hop(address, boundary, info.end))
                heapq.heappush(queue, (cost + step, info.end))
    if num_blocks not in best:
        covered = sorted((i.start, i.end) for i in infos.values())
        raise Infeasible(f"the servers do not cover blocks 0:{num_blocks} (they hold {covered}); "
                         "start servers for the missing blocks")
    hops, boundary = [], num_blocks
    while boundary:
        boundary, hop = previous[boundary]
        hops.append(hop)
    return hops[::-1]
