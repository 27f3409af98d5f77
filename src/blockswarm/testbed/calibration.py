"""The runtime's own costs, for the simulator to predict the testbed with: what one request's
steps and set-up were made of on a real swarm (`StepBreakdown`, `SetupSample`, `Measured`), the
constants fitted to them (`calibrate` -> `RuntimeConstants`) and what they were fitted on
(`Calibration`). Pure: no processes or sockets (run.py runs the swarms that measure).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Scenario
from blockswarm.sim.metrics import RequestRecord

OPEN_RTTS = 3.0  # ZeroMQ's greeting and handshake, then `open`: fitted instead where routes' RTTs differ enough


@dataclass(frozen=True)
class RuntimeConstants:
    """The runtime's own costs, in real seconds (fitted by `calibrate`)."""

    decode_hop_s: float = 0.001  # per hop per decode step: round trip − the server's hold − the link's RTT
    prefill_hop_s: float = 0.001  # the same for the prompt's step
    setup_s: float = 0.005  # per request: the coordinator's answer beside the round trips to it
    open_rtts: float = OPEN_RTTS  # a new connection and one question: round trips (a hop's open, the route's)
    open_hop_s: float = 0.001  # opening a hop's session beside its round trips
    host_block_s: float = 0.0005  # an emulating server's own compute per block per step (one step at a time)
    client_step_s: float = 0.001  # the client's work per step (embedding, head, sampling)

    def scenario(self, scenario: Scenario, time_scale: float, coordinator: str) -> Scenario:
        """The scenario the simulator predicts the testbed with: the runtime profile (every hop of
        every step, each server computing one step at a time; set-up asks the coordinator at
        location `coordinator`) with these costs (×K), and no per-token transfer term (a tiny
        model's hidden states cross the links in microseconds; bandwidth terms of the real model
        do not carry over)."""
        K = time_scale
        network = dataclasses.replace(scenario.network, decode_overhead_s=self.decode_hop_s * K,
                                      prefill_overhead_s=self.prefill_hop_s * K,
                                      prefill_s_per_token=0.0, setup_s=self.setup_s * K)
        behaviour = dataclasses.replace(scenario.behaviour, profile="runtime", hop_level=True,
                                        host_block_s=self.host_block_s * K, client_step_s=self.client_step_s * K,
                                        open_rtts=self.open_rtts, open_hop_s=self.open_hop_s * K,
                                        coordinator=coordinator)
        return dataclasses.replace(scenario, network=network, behaviour=behaviour)


@dataclass(frozen=True)
class StepBreakdown:
    """Where one request's time went, per decode step, in real seconds (means over its steps)."""

    wire_hop_s: float  # per hop: round trip − the server's hold − the link's RTT (client I/O, ZeroMQ, emulator)
    wire_prefill_hop_s: float  # the same for the prompt's step
    server_hop_s: float  # per hop: the server's hold beyond the device's time (its queue and serial compute)
    host_block_s: float  # the servers' own compute per block per decode step
    client_step_s: float  # per step: the client's own work between hops (embedding, head, sampling)
    hops: int


@dataclass(frozen=True)
class SetupSample:
    """One request's set-up, in real seconds: its total, the link RTT to the coordinator, and per
    hop (the time to connect and open it, the link RTT to its server)."""

    total_s: float
    coordinator_rtt_s: float
    opens: tuple[tuple[float, float], ...]


@dataclass
class Measured:
    records: list[RequestRecord]
    breakdowns: list[StepBreakdown]  # per completed request
    setup_samples: list[SetupSample]  # per completed request
    cpu_busy: float | None = None  # the share of this machine's CPU time that was busy during the run


def calibrate(runs: list[Measured]) -> RuntimeConstants:
    """The runtime's constants from calibration runs (pooled): each a mean over requests (each
    request's mean over its steps), except the set-up's. Opening a hop and asking the coordinator
    are both a new connection and one question, so both take `open_rtts` round trips to the other
    end: the slope of a line through every hop's open time against its link's RTT (fitted where
    the RTTs spread by 10 ms or more, else OPEN_RTTS), its intercept `open_hop_s`. What the set-up
    spends beyond its opens is the route's question: `setup_s` is its median less `open_rtts`
    round trips to the coordinator (a median: WS-RR's coordinator holds a request while no chain
    has room, which the simulator counts as waiting)."""
    mean = mean_breakdown(runs)
    samples = [s for run in runs for s in run.setup_samples]
    slope, open_hop = _line([rtt for s in samples for _, rtt in s.opens], [t for s in samples for t, _ in s.opens],
                            default_slope=OPEN_RTTS)
    asking = statistics.median(s.total_s - sum(t for t, _ in s.opens) - slope * s.coordinator_rtt_s for s in samples)
    return RuntimeConstants(decode_hop_s=max(mean["wire_hop_s"], 0.0), prefill_hop_s=max(mean["wire_prefill_hop_s"], 0.0),
                            setup_s=max(asking, 0.0), open_rtts=slope, open_hop_s=max(open_hop, 0.0),
                            host_block_s=max(mean["host_block_s"], 0.0), client_step_s=max(mean["client_step_s"], 0.0))


def _line(xs: list[float], ys: list[float], default_slope: float, spread: float = 0.010) -> tuple[float, float]:
    """(slope, intercept) of y against x, robust to a few held requests: a least-squares line
    through the median y of each distinct x (to 0.1 ms); where the x spread less than `spread`,
    the slope is `default_slope` and the intercept the median of y − slope·x. The slope is kept
    within [0, 10]."""
    groups: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        groups.setdefault(round(x, 4), []).append(y)
    points = sorted((x, statistics.median(g)) for x, g in groups.items())
    slope = default_slope
    if len(points) >= 2 and points[-1][0] - points[0][0] >= spread:
        slope = min(max(statistics.linear_regression(*zip(*points)).slope, 0.0), 10.0)
    return slope, statistics.median(y - slope * x for x, y in zip(xs, ys))


def mean_breakdown(runs: list[Measured]) -> dict:
    """The runs' mean of each part of a step (real seconds): where the time went."""
    breakdowns = [b for run in runs for b in run.breakdowns]
    return {f.name: statistics.fmean(getattr(b, f.name) for b in breakdowns)
            for f in dataclasses.fields(StepBreakdown)} if breakdowns else {}


@dataclass(frozen=True)
class Calibration:
    """Constants fitted on calibration runs, and what they were fitted on."""

    constants: RuntimeConstants
    scenario: str
    seed: int
    policies: tuple[str, ...]
    breakdown: dict  # the runs' mean of each part of a step, real seconds

    def to_json(self) -> dict:
        return {"constants": dataclasses.asdict(self.constants), "scenario": self.scenario, "seed": self.seed,
                "policies": list(self.policies), "breakdown": self.breakdown}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        """From `to_json`'s output, a `testbed run --json` file (which holds it as `calibration`) or
        a benchmarks/sim_vs_real.py one (its first of `calibrations`)."""
        if isinstance(data.get("calibrations"), list) and data["calibrations"]:
            data = data["calibrations"][0]
        data = data.get("calibration", data)
        try:
            return cls(RuntimeConstants(**data["constants"]), data["scenario"], data["seed"],
                       tuple(data["policies"]), data.get("breakdown", {}))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"not a testbed calibration (a `testbed run --json` file): {exc}") from None
