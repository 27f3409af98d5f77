"""Run one simulation: a scenario, a policy `PLACEMENT+ROUTING`, a request stream, a seed.

Shorthands: `petals` = PETALS placement and routing; `cgbprr` = CG-BP placement sized with
R = round(λT̄ + √(λT̄)) and WS-RR online routing (the published method).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Request, Scenario
from blockswarm.planner import wsrr
from blockswarm.planner.registry import PLACEMENTS, SHORTHANDS, parse_policy
from blockswarm.sim.engine import Engine
from blockswarm.sim.events import Arrival, ServerFailure, ServerJoin
from blockswarm.sim.metrics import RequestRecord, occupancy_stats, summarize
from blockswarm.sim.workload import generate
from blockswarm.sim.world import World


@dataclass(frozen=True, slots=True)
class Outage:
    """Server `server` fails at `at_s` and, if `back_s` is given, rejoins with its old span then."""

    server: int
    at_s: float
    back_s: float | None = None


@dataclass
class SimResult:
    policy: str
    seed: int
    summary: dict
    records: list[RequestRecord]
    occupancy: list[tuple[float, int]]
    capacity_slots: int
    events: int
    wall_s: float
    R: int | None


def allocation_delay(delays: dict[str, float], policy: str) -> float:
    """The delay a scenario sets for `policy`, named as given or by an equivalent name (cgbprr =
    cgbp+wsrr = wsrr)."""
    full = SHORTHANDS.get(policy, policy)
    return next((delay for name, delay in delays.items() if SHORTHANDS.get(name, name) == full), 0.0)


def with_workload(scenario: Scenario, rate: float | None = None, output_tokens: int | None = None,
                  prompt_tokens: int | None = None, requests: int | None = None) -> Scenario:
    """The scenario with workload overrides; the cache is sized for the new maximal lengths."""
    w = scenario.workload
    changes = {}
    if rate is not None:
        changes["rate"] = rate
    if output_tokens is not None:
        changes.update(output_tokens=output_tokens, max_output_tokens=output_tokens)
    if prompt_tokens is not None:
        changes.update(prompt_tokens=prompt_tokens, max_prompt_tokens=prompt_tokens)
    if requests is not None:
        changes["num_requests"] = requests
    return dataclasses.replace(scenario, workload=dataclasses.replace(w, **changes)) if changes else scenario


def fit_to_requests(scenario: Scenario, requests: list[Request]) -> Scenario:
    """Size caches for the longest prompt and output in `requests` (e.g. a replayed trace)."""
    w = scenario.workload
    longest_prompt = max([w.max_prompt_tokens] + [r.prompt_tokens for r in requests])
    longest_output = max([w.max_output_tokens] + [r.output_tokens for r in requests])
    workload = dataclasses.replace(w, max_prompt_tokens=longest_prompt, max_output_tokens=longest_output,
                                   num_requests=len(requests))
    return dataclasses.replace(scenario, workload=workload)


def simulate(scenario: Scenario, policy: str, seed: int = 0, requests: list[Request] | None = None,
             step_by_step: bool = False, outages: tuple[Outage, ...] = (), R: int | None = None,
             burstiness: float = 1.0) -> SimResult:
    placement_name, routing = parse_policy(policy)
    if placement_name == "cgbp":
        R = R or wsrr.choose_R(scenario)
    placement = PLACEMENTS[placement_name](scenario, R, seed)
    if requests is None:
        requests = generate(scenario, seed, burstiness=burstiness)
    too_long = [r for r in requests if r.prompt_tokens + r.output_tokens > scenario.workload.max_tokens]
    if too_long:
        raise ConfigError(f"{len(too_long)} requests are longer than the workload's max_prompt_tokens + "
                          f"max_output_tokens ({scenario.workload.max_tokens}) that caches are sized for")
    behaviour = scenario.behaviour
    world = World(scenario, placement, routing, step_by_step=step_by_step,
                  allocation_delay_s=allocation_delay(behaviour.allocation_delay_s, policy),
                  backoff_rounding=behaviour.backoff_rounding, hop_level=behaviour.hop_level,
                  host_block_s=behaviour.host_block_s, client_step_s=behaviour.client_step_s,
                  open_rtts=behaviour.open_rtts, open_hop_s=behaviour.open_hop_s,
                  coordinator=behaviour.coordinator)
    engine = Engine()
    for request in requests:
        engine.schedule(Arrival(request.arrival_s, request))
    for outage in outages:
        engine.schedule(ServerFailure(outage.at_s, outage.server))
        span = placement.span_of(outage.server)
        if outage.back_s is not None and span is not None:
            engine.schedule(ServerJoin(outage.back_s, span))
    begin = time.perf_counter()
    engine.run(world)
    wall = time.perf_counter() - begin
    records = sorted(world.records.values(), key=lambda r: r.request_id)
    first = min((r.arrival for r in records), default=0.0)
    last = max((r.completion for r in records if r.completion is not None), default=first)
    makespan = last - first
    capacity = sum(s.slots for s in placement.spans)
    used = sum(world.slot_seconds.values())
    summary = summarize(records, makespan, used / (capacity * makespan) if capacity and makespan > 0 else 0.0,
                        occupancy_stats(world.occupancy, capacity, first, last))
    return SimResult(policy, seed, summary, records, world.occupancy, capacity, engine.processed, wall, R)
