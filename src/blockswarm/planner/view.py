"""The read-only snapshot policies decide from. The simulator builds it from simulated state;
the coordinator will build it from live reports. Policies never mutate it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from blockswarm.core.specs import Placement, Scenario


@dataclass(frozen=True, slots=True)
class SwarmView:
    scenario: Scenario
    placement: Placement
    now: float = 0.0
    # server -> ((expected end time, slots held), ...) for the sessions active or reserved there
    active: Mapping[int, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    index: tuple | None = None  # routing.block_index(placement), when the caller keeps one
    used: Mapping[int, int] | None = None  # slots held per server, when the caller keeps the sums
    memo: dict | None = None  # scratch space for routers, valid for this placement (caller clears it)
    free_times: object | None = None  # a planner.freetimes.FreeTimes over `active`, when the caller keeps one
    routes_in_flight: Mapping | None = None  # Route -> sessions running or reserved on it (central-queue policies)
    queued: int = 0  # other requests waiting in the caller's central queue (central-queue policies)

    def free_slots(self, server: int) -> int:
        span = self.placement.span_of(server)
        capacity = span.slots if span else 0
        if self.used is not None:
            return capacity - self.used.get(server, 0)
        return capacity - sum(held for _, held in self.active.get(server, ()))

    def slots_free_at(self, server: int, needed: int) -> float | None:
        """When `needed` slots will be free at `server` (now, or the end time of the session whose
        completion frees enough, walking active sessions by end time); None if never (more than
        the server has). An absolute time, so that a start equals the end it waited for exactly."""
        span = self.placement.span_of(server)
        if span is None or needed > span.slots:
            return None
        free = self.free_slots(server)
        if free >= needed:
            return self.now
        for end, held in sorted(self.active.get(server, ())):
            free += held
            if free >= needed:
                return max(self.now, end)
        return None


class ActiveBySession(Mapping):
    """`SwarmView.active` over server -> {session: (end, slots)}, the shape callers keep (a session
    is added and removed in O(1)); each server's tuple is built only when a router asks for it."""

    def __init__(self, active: dict):
        self._active = active

    def __getitem__(self, server):
        return tuple(self._active[server].values())

    def get(self, server, default=()):
        entries = self._active.get(server)
        return tuple(entries.values()) if entries else default

    def __iter__(self):
        return iter(self._active)

    def __len__(self):
        return len(self._active)
