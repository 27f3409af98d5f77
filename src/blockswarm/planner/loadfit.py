"""`loadfit`: blockswarm's own policy — a placement fitted to the load, routed by WS-RR.

The published methods size their placement by one rule: CG-BP for R = round(λT̄ + √(λT̄))
concurrent requests (T̄ from an unloaded request), GBP-CR for a concurrency c per chain. Both
rules look at the load through one number and ignore what the swarm does with it: a placement
sized for more concurrency holds fewer blocks per server (more hops, slower chains) but waits
less; one sized for less is faster per request and queues sooner. `loadfit` instead scores
every candidate placement of both families by the mean response time it should give at the
workload's arrival rate, and keeps the best:

- candidates: CG-BP for R = 1, 2, 4, … up to the largest feasible R, plus the published R, and
  GBP-CR for every c that places;
- score: the placement's GCA chains (fastest route with cache, its capacity, repeat) fed to
  `chains.response_estimate_s` — the load poured into the fastest chains up to their
  throughput, plus the Erlang-C wait of one queue in front of all their slots;
- routing: WS-RR on the chosen placement (each request on the route that minimizes its wait
  plus service, so it waits for a fast chain rather than take a slow one when that is quicker).

A pure function of the scenario (servers, network, workload), like the other placements, so the
coordinator can run it; docs/POLICY.md gives the reasoning and the ablations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Scenario
from blockswarm.planner import cgbprr, chains, wsrr


@dataclass(frozen=True)
class Candidate:
    family: str  # "cgbp" or "gbpcr"
    size: int  # R for CG-BP, c for GBP-CR
    placement: Placement
    estimate_s: float  # the mean response time it should give at the workload's rate


def candidates(scenario: Scenario, rate: float | None = None) -> list[Candidate]:
    rate = scenario.workload.rate if rate is None else rate
    found = []
    largest = cgbprr.max_feasible_R(scenario)
    if largest:
        sizes = {1 << k for k in range(largest.bit_length())} | {largest, wsrr.choose_R(scenario, rate, largest)}
        for R in sorted(sizes):
            placement = cgbprr.place(scenario, R).placement
            found.append(Candidate("cgbp", R, placement, chains.response_estimate_s(chains.gca(scenario, placement),
                                                                                    rate)))
    found += [Candidate("gbpcr", c, placement, estimate)
              for c, placement, estimate in chains.gbpcr_candidates(scenario, rate)]
    return found


def choose(scenario: Scenario, rate: float | None = None) -> Candidate:
    """The best-scoring candidate (the first of equals: CG-BP before GBP-CR, smaller sizes first)."""
    found = candidates(scenario, rate)
    if not found:
        raise Infeasible("the swarm cannot hold the model plus one request's cache; add servers or memory")
    finite = [c for c in found if c.estimate_s != math.inf]
    if not finite:  # nothing carries the rate: the most capacity, i.e. the largest size that placed
        return max(found, key=lambda c: (sum(s.slots for s in c.placement.spans), c.family == "cgbp"))
    return min(finite, key=lambda c: c.estimate_s)


def place(scenario: Scenario) -> Placement:
    return choose(scenario).placement
