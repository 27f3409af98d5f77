"""Pick a chain of servers that covers blocks [start, L) from what the servers report.

The planner's shortest route over block boundaries, priced by each server's measured decode
time for the blocks it computes plus a fixed per-hop overhead, so fast servers and few hops win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Span
from blockswarm.planner.routing import shortest_route
from blockswarm.runtime.protocol import ServerInfo

HOP_OVERHEAD_S = 0.001  # transport cost of one hop on a LAN; keeps equal-speed chains short


@dataclass(frozen=True, slots=True)
class Hop:
    address: str
    start: int
    end: int
    ticket: str | None = field(default=None, compare=False)  # the coordinator's permission to open there


def describe(hops: list[Hop]) -> str:
    return " -> ".join(f"{h.address}[{h.start}:{h.end}]" for h in hops)


def choose_chain(infos: dict[str, ServerInfo], num_blocks: int, start: int = 0) -> list[Hop]:
    """The whole chain, or (start > 0) the tail that replaces a chain's hops from block `start` on."""
    addresses = sorted(infos)
    placement = Placement(tuple(Span(i, infos[a].start, infos[a].end) for i, a in enumerate(addresses)), num_blocks)
    try:
        _, route = shortest_route(
            placement, lambda i, a, b: HOP_OVERHEAD_S + infos[addresses[i]].block_decode_s * (b - a), start=start)
    except Infeasible:
        covered = sorted((i.start, i.end) for i in infos.values())
        raise Infeasible(f"the servers do not cover blocks {start}:{num_blocks} (they hold {covered}); "
                         "start servers for the missing blocks") from None
    return [Hop(addresses[h.server], h.start, h.end) for h in route.hops]
