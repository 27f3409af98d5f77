"""Per-request records and the aggregates reported by `blockswarm simulate`.

Per request: waiting (arrival → start), TTFT (arrival → first token), time per output token
after the first (TPOT), completion time, and the paper's headline per-token time
(completion − arrival) / l_out. Aggregates: mean and percentiles, throughput, utilisation of
cache slots, cache occupancy over time (held or reserved slots / capacity), and 95 % confidence
intervals across seeds (Student's t).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    client: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    start: float | None = None
    first_token: float | None = None
    completion: float | None = None
    restarts: int = 0
    replays: int = 0  # the runtime profile: tails replayed into other servers after a failure
    hops: int = 0

    @property
    def wait_s(self) -> float:
        return self.start - self.arrival

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.arrival

    @property
    def per_token_s(self) -> float:
        """The headline metric: (completion − arrival) / l_out."""
        return (self.completion - self.arrival) / self.output_tokens

    @property
    def tpot_s(self) -> float:
        if self.output_tokens <= 1:
            return 0.0
        return (self.completion - self.first_token) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def occupancy_stats(occupancy: list[tuple[float, int]], capacity: int, start: float, end: float) -> tuple[float, float]:
    """(time-weighted mean, peak) of cache slots held in the swarm, as fractions of its capacity."""
    if not occupancy or capacity <= 0 or end <= start:
        return 0.0, 0.0
    area, peak = 0.0, 0
    for (t0, held), (t1, _) in zip(occupancy, occupancy[1:] + [(end, 0)]):
        area += held * (min(t1, end) - max(t0, start)) if t1 > start and t0 < end else 0.0
        peak = max(peak, held)
    return area / ((end - start) * capacity), peak / capacity


def downsample(occupancy: list[tuple[float, int]], capacity: int, points: int = 200) -> list[tuple[float, float]]:
    """At most `points` (time, fraction held) samples of the occupancy curve (the last value per bucket)."""
    if not occupancy or capacity <= 0:
        return []
    step = max(1, len(occupancy) // points)
    return [(t, held / capacity) for t, held in occupancy[step - 1::step]]


def summarize(records: list[RequestRecord], makespan_s: float, utilisation: float,
              occupancy: tuple[float, float] = (0.0, 0.0)) -> dict:
    done = [r for r in records if r.completion is not None]
    per_token = [r.per_token_s for r in done]
    ttft = [r.ttft_s for r in done]
    response = [r.completion - r.arrival for r in done]
    out = {
        "n_requests": len(done),
        "n_unfinished": len(records) - len(done),
        "mean_per_token_s": statistics.fmean(per_token) if done else math.nan,
        "p50_per_token_s": percentile(per_token, 0.5),
        "p90_per_token_s": percentile(per_token, 0.9),
        "p99_per_token_s": percentile(per_token, 0.99),
        "mean_ttft_s": statistics.fmean(ttft) if done else math.nan,
        "p90_ttft_s": percentile(ttft, 0.9),
        "mean_wait_s": statistics.fmean(r.wait_s for r in done) if done else math.nan,
        "mean_tpot_s": statistics.fmean(r.tpot_s for r in done) if done else math.nan,
        # response = completion − arrival (waiting included); service = completion − start
        "mean_response_s": statistics.fmean(response) if done else math.nan,
        "p50_response_s": percentile(response, 0.5),
        "p95_response_s": percentile(response, 0.95),
        "p99_response_s": percentile(response, 0.99),
        "mean_service_s": statistics.fmean(r.completion - r.start for r in done) if done else math.nan,
        "throughput_rps": len(done) / makespan_s if makespan_s > 0 else math.nan,
        "tokens_per_s": sum(r.output_tokens for r in done) / makespan_s if makespan_s > 0 else math.nan,
        "utilisation": utilisation,
        "cache_occupancy_mean": occupancy[0],
        "cache_occupancy_peak": occupancy[1],
        "restarts": sum(r.restarts for r in records),
    }
    return out


# two-sided 95 % Student t quantiles for 1..30 degrees of freedom
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def confidence_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % interval); half-width 0 for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))
