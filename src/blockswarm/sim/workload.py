"""Request streams: Poisson or bursty (Gamma) arrivals with fixed or distributed lengths, several
clients with their own rates, and replay of a CSV trace `arrival_s,prompt_tokens,output_tokens[,client]`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Request, Scenario
from blockswarm.perf.trace import read_trace, trace_rows


@dataclass(frozen=True, slots=True)
class Lengths:
    """Token counts: fixed (low == high) or uniform on [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> "Lengths":
        try:
            parts = [int(p) for p in str(text).split("-")]
        except ValueError:
            raise ConfigError(f"lengths must be N or LOW-HIGH, got {text!r}") from None
        low, high = (parts[0], parts[0]) if len(parts) == 1 else parts[:2]
        if not 1 <= low <= high:
            raise ConfigError(f"lengths must satisfy 1 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


def arrivals(rng: random.Random, rate: float, count: int, burstiness: float = 1.0) -> list[float]:
    """Arrival times with mean gap 1/rate: exponential gaps (Poisson) when burstiness is 1, else
    Gamma gaps with shape 1/burstiness² (coefficient of variation = burstiness)."""
    if rate <= 0:
        raise ConfigError(f"arrival rate must be positive, got {rate}")
    shape = 1.0 / (burstiness ** 2)
    now, times = 0.0, []
    for _ in range(count):
        now += rng.expovariate(rate) if burstiness == 1.0 else rng.gammavariate(shape, 1.0 / (rate * shape))
        times.append(now)
    return times


def matlab_arrivals(seed: int, skip: int, rate: float, count: int) -> list[float]:
    """The published simulator's arrivals: MATLAB's rng(seed,'twister') (numpy's RandomState draws the
    same uniforms), `skip` uniforms spent first, then exprnd(1/λ) = −log(u)/λ per gap, the first gap 0."""
    uniforms = np.random.RandomState(seed).random_sample(skip + count)[skip:]
    gaps = -np.log(uniforms) / rate
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def generate(scenario: Scenario, seed: int, rate: float | None = None, count: int | None = None,
             prompt: Lengths | None = None, output: Lengths | None = None, burstiness: float = 1.0) -> list[Request]:
    """The scenario's workload (overrides allowed); clients with their own `rate` get their own stream."""
    w = scenario.workload
    rng = random.Random(seed)
    if w.trace is not None:
        return _replay(scenario, rng)
    rate = w.rate if rate is None else rate
    count = w.num_requests if count is None else count
    prompt = prompt or Lengths(w.prompt_tokens, w.prompt_tokens)
    output = output or Lengths(w.output_tokens, w.output_tokens)
    own = [c for c, spec in enumerate(scenario.clients) if spec.rate]
    if w.arrivals == "matlab":
        streams = [(t, rng.randrange(len(scenario.clients)) if len(scenario.clients) > 1 else 0)
                   for t in matlab_arrivals(w.matlab_seed + seed, w.matlab_skip, rate, count)]
    elif own:
        total = sum(scenario.clients[c].rate for c in own)
        streams = [(t, c) for c in own
                   for t in arrivals(rng, scenario.clients[c].rate, round(count * scenario.clients[c].rate / total),
                                     burstiness)]
    else:
        streams = [(t, rng.randrange(len(scenario.clients))) for t in arrivals(rng, rate, count, burstiness)]
    streams.sort()
    return [Request(client, prompt.sample(rng), output.sample(rng), arrival, index)
            for index, (arrival, client) in enumerate(streams)]


def load_trace(path: str | Path, clients: int) -> list[Request]:
    """A trace file's requests as they are (perf/trace.py reads both formats)."""
    rows = read_trace(str(path))
    bad = next((i for i, row in enumerate(rows) if row[3] >= clients), None)
    if bad is not None:
        raise ConfigError(f"{path}: a request names client {rows[bad][3]}; the scenario has clients 0..{clients - 1}")
    return [Request(c, p, o, a, i) for i, (a, p, o, c) in enumerate(rows)]


def _replay(scenario: Scenario, rng: random.Random) -> list[Request]:
    """The scenario's trace (rows spread over the clients by the run's seed when it has several)."""
    w = scenario.workload
    rows = trace_rows(w.trace, w.num_requests, w.context_tokens, w.trace_time_scale)
    start = rows[0][0]
    clients = len(scenario.clients)
    return [Request(rng.randrange(clients) if clients > 1 else 0, p, o, a - start, i)
            for i, (a, p, o, _) in enumerate(rows)]
