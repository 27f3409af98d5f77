"""Placement on a live swarm: place servers that join later, and restore coverage after a failure,
moving as few servers as possible.

A swarm's first servers are placed together by the policy itself (`registry.PLACEMENTS`). Later
changes must not re-place everyone: each move empties a server's cache and reloads its weights.
- A server that joins a covered swarm takes the policy's number of blocks for it (CG-BP's
  conservative count for R, PETALS' rule) on the weakest window, the rule both policies use once
  every block is covered (§3, §4): the window whose sorted capacities are smallest.
- When blocks lose every holder, idle servers (no sessions, blocks all held elsewhere) move onto
  them one at a time, each to the window that covers the first missing block and as many others
  as it can, until the model is covered again or nobody can move.
Capacities are counted in sessions per block, as the policies count them.
"""

from __future__ import annotations

from blockswarm.core.specs import Placement, Scenario, Span
from blockswarm.planner import cgbprr, petals


def block_count(policy: str, scenario: Scenario, server: int, R: int) -> int:
    if policy == "petals":
        return petals.block_count(scenario, server)
    return cgbprr.conservative_blocks(scenario, server, R)


def span_for(policy: str, scenario: Scenario, server: int, start: int, blocks: int) -> Span:
    """The span with the cache slots the policy gives it (block-sessions)."""
    if policy == "petals":
        slots = petals.cache_slots(scenario, blocks)
    else:
        slots = cgbprr.guaranteed_sessions(scenario, server, blocks) * blocks
    return Span(server, start, start + blocks, slots)


def capacity(placement: Placement) -> list[int]:
    """Sessions each block can hold over the placement's spans."""
    per_block = [0] * placement.num_blocks
    for span in placement.spans:
        for block in range(span.start, span.end):
            per_block[block] += span.slots // max(1, span.length)
    return per_block


def missing_blocks(placement: Placement) -> list[int]:
    held = [False] * placement.num_blocks
    for span in placement.spans:
        for block in range(span.start, span.end):
            held[block] = True
    return [block for block, is_held in enumerate(held) if not is_held]


def extend(policy: str, scenario: Scenario, placement: Placement, newcomers: list[int], R: int) -> list[Span]:
    """Spans for servers joining a placed swarm (in the order given); the others stay where they are."""
    per_block = capacity(placement)
    L = placement.num_blocks
    spans = []
    for server in newcomers:
        size = min(block_count(policy, scenario, server, R), L)
        if size < 1:
            continue
        start = min(range(L - size + 1), key=lambda a: (sorted(per_block[a:a + size]), a))
        span = span_for(policy, scenario, server, start, size)
        for block in range(span.start, span.end):
            per_block[block] += span.slots // size
        spans.append(span)
    return spans


def repair(policy: str, scenario: Scenario, placement: Placement, idle: list[int], R: int) -> list[Span]:
    """New spans for idle servers so that every block is held again (as many as needed, fewest
    first by how much of the gap they cover); an empty list if the gap cannot be closed."""
    spans = {span.server: span for span in placement.spans}
    L = placement.num_blocks
    moves: dict[int, Span] = {}
    candidates = list(idle)
    while True:
        current = Placement(tuple(spans.values()), L)
        gap = missing_blocks(current)
        if not gap:
            return list(moves.values())
        best = None
        for server in candidates:
            others = Placement(tuple(s for j, s in spans.items() if j != server), L)
            if server in spans and any(b not in gap for b in missing_blocks(others)):
                continue  # moving it would uncover blocks that are held now
            size = min(block_count(policy, scenario, server, R), L)
            if size < 1:
                continue
            first = gap[0]
            windows = range(max(0, first - size + 1), min(first, L - size) + 1)
            start = max(windows, key=lambda a: (sum(a <= b < a + size for b in gap), -a))
            covered = sum(start <= b < start + size for b in gap)
            if best is None or covered > best[0]:
                best = (covered, server, start, size)
        if best is None:
            return []
        _, server, start, size = best
        spans[server] = moves[server] = span_for(policy, scenario, server, start, size)
        candidates.remove(server)


def repairable_losses(placement: Placement) -> list[int]:
    """Servers whose loss would leave blocks nobody holds that another server, taking as many
    blocks as it holds now, could cover without uncovering its own: the failures `repair` mends."""
    L = placement.num_blocks
    found = []
    for lost in placement.spans:
        rest = Placement(tuple(s for s in placement.spans if s is not lost), L)
        gap = missing_blocks(rest)
        if not gap:
            continue
        for mover in rest.spans:
            others = Placement(tuple(s for s in rest.spans if s is not mover), L)
            fits = mover.length >= gap[-1] - gap[0] + 1
            if fits and missing_blocks(others) == gap:
                found.append(lost.server)
                break
    return found
