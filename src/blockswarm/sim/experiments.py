"""Several policies × several seeds, and one-parameter sweeps, with confidence intervals."""

from __future__ import annotations

import dataclasses
from typing import Callable

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Scenario
from blockswarm.sim.fanout import Fanout, LocalFanout, Run
from blockswarm.sim.metrics import confidence_interval, downsample
from blockswarm.sim.runner import SimResult, with_workload

REPORTED = ("mean_per_token_s", "mean_ttft_s", "p90_per_token_s", "p99_per_token_s", "mean_wait_s", "mean_tpot_s",
            "mean_response_s", "p99_response_s", "throughput_rps", "utilisation", "cache_occupancy_mean", "cache_occupancy_peak")
SWEEPABLE = ("servers", "rate", "output", "fast-share")


def compare(scenario: Scenario, policies: list[str], seeds: int, progress: Callable[[], None] | None = None,
            fanout: Fanout | None = None, **options) -> dict[str, dict]:
    """policy -> {metric: mean, metric_ci95: half-width, n_requests, per_seed: [...]}, plus raw results.
    The runs go through `fanout` (serial by default); the table does not depend on where they ran."""
    return compare_many([scenario], policies, seeds, progress, fanout, **options)[0]


def compare_many(scenarios: list[Scenario], policies: list[str], seeds: int,
                 progress: Callable[[], None] | None = None, fanout: Fanout | None = None,
                 **options) -> list[dict[str, dict]]:
    """`compare` for several scenarios (a sweep's points) in one batch, so that every run of every
    point can go out at once."""
    runs = [Run(scenario, policy, seed, options) for scenario in scenarios for policy in policies
            for seed in range(seeds)]
    results = iter((fanout or LocalFanout(workers=1)).map(runs, progress))
    return [{policy: _row([next(results) for _ in range(seeds)], seeds) for policy in policies}
            for _ in scenarios]


def _row(runs: list[SimResult], seeds: int) -> dict:
    row: dict = {"n_requests": sum(r.summary["n_requests"] for r in runs), "seeds": seeds,
                 "R": runs[0].R, "events": sum(r.events for r in runs)}
    for metric in REPORTED:
        mean, half = confidence_interval([r.summary[metric] for r in runs])
        row[metric], row[f"{metric}_ci95"] = mean, half
    row["per_token_samples"] = [rec.per_token_s for r in runs for rec in r.records if rec.completion is not None]
    row["cache_occupancy_over_time"] = downsample(runs[0].occupancy, runs[0].capacity_slots)  # first seed
    return row


def vary(scenario: Scenario, parameter: str, value: float) -> Scenario:
    if parameter == "rate":
        return with_workload(scenario, rate=float(value))
    if parameter == "output":
        return with_workload(scenario, output_tokens=int(value))
    if parameter == "servers":
        count = int(value)
        servers = tuple(dataclasses.replace(scenario.servers[i % len(scenario.servers)],
                                            name=f"{scenario.servers[i % len(scenario.servers)].hardware}-{i}")
                        for i in range(count))
        return dataclasses.replace(scenario, servers=servers)
    if parameter == "fast-share":
        if not 0 <= value <= 1:
            raise ConfigError(f"fast-share values are fractions in [0, 1], got {value}")
        fast = min(scenario.servers, key=lambda s: s.decode_s)
        slow = max(scenario.servers, key=lambda s: s.decode_s)
        n = len(scenario.servers)
        k = round(value * n)
        servers = tuple(dataclasses.replace(fast if i < k else slow, name=f"{(fast if i < k else slow).hardware}-{i}")
                        for i in range(n))
        return dataclasses.replace(scenario, servers=servers)
    raise ConfigError(f"cannot sweep {parameter!r}; choose one of {', '.join(SWEEPABLE)}")
