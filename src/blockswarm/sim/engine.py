"""A plain heapq event loop that knows nothing about LLMs (SimPy's shape, without its overhead).

Events are ordered by (time, priority, sequence): at equal times lower priority values run
first, and otherwise events run in the order they were scheduled. The sequence counter belongs
to the engine, so two runs in one process never interfere.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol


class Event(Protocol):
    time: float
    priority: int

    def handle(self, world) -> list: ...


class Engine:
    def __init__(self):
        self._heap: list = []
        self._sequence = itertools.count()
        self.now = 0.0
        self.processed = 0

    def schedule(self, event) -> None:
        if event.time < self.now:
            raise ValueError(f"cannot schedule {type(event).__name__} in the past ({event.time} < {self.now})")
        heapq.heappush(self._heap, (event.time, event.priority, next(self._sequence), event))

    def step(self, world) -> bool:
        """Run the next event and schedule what it returns; False when nothing is left."""
        if not self._heap:
            return False
        time, _, _, event = heapq.heappop(self._heap)
        self.now = time
        self.processed += 1
        for follow_up in event.handle(world):
            self.schedule(follow_up)
        return True

    def run(self, world, until: float = math.inf) -> None:
        while self._heap and self._heap[0][0] <= until:
            self.step(world)

    def __len__(self) -> int:
        return len(self._heap)
