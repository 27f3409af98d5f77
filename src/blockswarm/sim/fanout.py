"""Independent simulation runs, one after another or over local processes.

A run is a pure function of (scenario, policy, seed, options): where it executes cannot change
its result, so a sweep can spread its runs over the cores (here) or over a cluster (the
`blockswarm.rayfanout` adapter, outside the pure layers because Ray is a network library) and
get the serial numbers back, in the serial order. Both answer `map(runs, progress)`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, Protocol

from blockswarm.core.specs import Scenario
from blockswarm.sim.runner import SimResult, simulate


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    policy: str
    seed: int
    options: dict = field(default_factory=dict)  # simulate()'s keyword options (requests, burstiness, …)


def execute(run: Run) -> SimResult:
    return simulate(run.scenario, run.policy, seed=run.seed, **run.options)


class Fanout(Protocol):
    def map(self, runs: list[Run], progress: Callable[[], None] | None = None) -> list[SimResult]: ...


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class LocalFanout:
    """Runs over `workers` local processes (spawned: a clean interpreter each, nothing inherited);
    one worker, or one run, stays in this process."""

    workers: int = 0  # 0: one per core this process may use

    def map(self, runs: list[Run], progress: Callable[[], None] | None = None) -> list[SimResult]:
        workers = min(self.workers or default_workers(), len(runs))
        if workers <= 1:
            results = []
            for run in runs:
                results.append(execute(run))
                if progress:
                    progress()
            return results
        results: list = [None] * len(runs)
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_interrupts)
        try:
            for index, result in pool.imap_unordered(_execute_indexed, enumerate(runs)):
                results[index] = result
                if progress:
                    progress()
        except BaseException:
            pool.terminate()  # Ctrl-C or a failed run: stop the others now rather than finish them
            raise
        else:
            pool.close()
        finally:
            pool.join()
        return results


def _execute_indexed(item: tuple[int, Run]) -> tuple[int, SimResult]:
    return item[0], execute(item[1])


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which terminates them (no traceback from each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
