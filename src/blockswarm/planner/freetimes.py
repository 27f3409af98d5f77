"""When each server will have k cache slots free, for every k up to its span's length, as one array.

WS-RR prices every hop (server j entering k blocks before its span's end) with the time until k
slots are free there. Asking `SwarmView.slots_free_at` edge by edge walks the server's sessions
each time: under congestion that is thousands of Python calls per decision. The answer for
(j, k) changes only when j's sessions change, and never with `now` (it is an absolute time, and
the caller takes max(now, ·)), so it is kept here as a table that a caller owning the session
state updates by marking the servers it touched; rows are rebuilt when next read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from blockswarm.core.specs import Placement

FREE_NOW = -math.inf  # k slots are free already
NEVER = math.inf  # more slots than the server has


class FreeTimes:
    """`table()[j, k]`: the absolute time when k slots are free at server j (FREE_NOW, a session's end
    time, or NEVER), exactly what `SwarmView.slots_free_at(j, k)` answers before max(now, ·)."""

    def __init__(self, placement: Placement, num_servers: int, active: Mapping, used: Mapping | None = None):
        self._placement = placement
        self._active = active  # server -> iterable of (end, slots held), read when a row is rebuilt
        self._used = used
        servers = max([num_servers] + [span.server + 1 for span in placement.spans])
        self._table = np.full((servers, placement.num_blocks + 1), NEVER)
        self._dirty = {span.server for span in placement.spans}

    @classmethod
    def of_view(cls, view) -> FreeTimes:
        return cls(view.placement, len(view.scenario.servers), view.active, view.used)

    def mark(self, server: int) -> None:
        """Server's sessions or slot count changed: its row is rebuilt when next read."""
        self._dirty.add(server)

    def table(self) -> np.ndarray:
        for server in self._dirty:
            self._rebuild(server)
        self._dirty.clear()
        return self._table

    def _rebuild(self, server: int) -> None:
        span = self._placement.span_of(server)
        row = self._table[server]
        row[:] = NEVER
        if span is None:
            return
        entries = self._active.get(server, ())
        held = self._used.get(server, 0) if self._used is not None else sum(n for _, n in entries)
        free = span.slots - held
        reach = min(span.length, span.slots)  # k beyond the slots a server has: never
        row[1:max(1, min(free, reach) + 1)] = FREE_NOW
        if free >= reach:
            return
        first = max(free, 0) + 1
        values, k = [], first
        for end, n in sorted(entries):  # the walk of slots_free_at, once for every k
            free += n
            while k <= reach and free >= k:
                values.append(end)
                k += 1
            if k > reach:
                break
        row[first:first + len(values)] = values
