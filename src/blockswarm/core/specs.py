"""Plain data describing a deployment: model, servers, clients, network, workload; placement and routes.

Units are SI throughout: seconds, bytes, tokens. Symbols in comments follow
`shared/spec/allocation.md` (L, M_j, τ_j, s_m, s_c, t_cj).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_blocks: int  # L
    d_model: int
    d_kv: int  # key/value width: d_model without GQA, d_model / kv_groups with it
    params_per_block: int
    weight_bytes_per_param: float = 2.0  # 4.25/8 for NF4 with its scales
    weight_overhead: float = 1.0  # multiplicative slack (e.g. 1.01 for quantization state)
    kv_bytes: int = 2  # bytes per cached value

    @property
    def block_bytes(self) -> float:
        """s_m: memory of one block's weights."""
        return self.params_per_block * self.weight_bytes_per_param * self.weight_overhead

    @property
    def kv_groups(self) -> int:
        return max(1, self.d_model // self.d_kv)

    def session_cache_bytes(self, max_tokens: int) -> float:
        """s_c: KV-cache memory of one session on one block, for prompt + output tokens."""
        return 2 * self.d_kv * max_tokens * self.kv_bytes


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    location: str
    memory_bytes: float  # M_j, usable
    decode_s: float  # τ_j, seconds per token per block
    prefill_s_per_token: float  # τᴵ_j(l_in) = prefill_s_per_token · l_in + prefill_base_s
    prefill_base_s: float
    hardware: str = "custom"

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_s_per_token * prompt_tokens + self.prefill_base_s


@dataclass(frozen=True, slots=True)
class ClientSpec:
    name: str
    location: str
    rate: float | None = None  # requests/s from this client; None shares the workload's rate


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """RTTs between locations plus the per-hop overheads measured on PETALS (§7)."""

    rtt_s: dict[tuple[str, str], float]  # symmetric; (a, a) is the RTT inside a location
    bandwidth_bps: dict[tuple[str, str], float] = field(default_factory=dict)
    decode_overhead_s: float = 0.100  # t_cj = RTT + this
    prefill_overhead_s: float = 0.067  # tᴵ_cj = RTT + prefill_s_per_token · l_in + this
    prefill_s_per_token: float = 0.0007049
    setup_s: float = 0.070  # once per request

    def rtt(self, a: str, b: str) -> float:
        return self.rtt_s[(a, b)] if (a, b) in self.rtt_s else self.rtt_s[(b, a)]


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    rate: float = 0.1  # requests/s (Poisson)
    num_requests: int = 100
    prompt_tokens: int = 20  # l_in
    output_tokens: int = 128  # l_out
    max_prompt_tokens: int = 20  # lᴵ_max
    max_output_tokens: int = 128  # l_max
    seed: int = 0
    # "poisson" (Python's RNG, seeded by the run's seed) or "matlab": the published simulator's stream,
    # numpy's RandomState(matlab_seed + run seed) skipping `matlab_skip` uniforms, gaps −log(u)/λ, the
    # first gap 0 (published-runs.md §A)
    arrivals: str = "poisson"
    matlab_seed: int = 42
    matlab_skip: int = 0
    # replay of a trace file (perf/trace.py): its first num_requests rows, lengths clipped to
    # context_tokens, arrival times × trace_time_scale; prompt/output_tokens are then its means
    trace: str | None = None
    context_tokens: int | None = None
    trace_time_scale: float = 1.0

    @property
    def max_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_output_tokens


@dataclass(frozen=True)
class Behaviour:
    """Where swarms behave differently from the performance model, as scenario fields rather than
    code: the "published" profile sets the first three to what the published studies' simulator
    does (published-runs.md); the "runtime" profile simulates what blockswarm's runtime does (each
    step's hops, each server computing one step at a time); the default profile leaves every one off."""

    profile: str = "default"
    # policy name (as given, or its PLACEMENT+ROUTING) -> seconds each request waits, holding its
    # cache slots, before its prefill starts; not part of the request time R is chosen from
    allocation_delay_s: dict[str, float] = field(default_factory=dict)
    backoff_rounding: bool = False  # WS-RR clients poll with PETALS' back-off: waits end at 1, 3, 7, 15, … s
    max_blocks: dict[str, int] = field(default_factory=dict)  # hardware -> cap on a server's blocks (CG-BP)
    petals_join_order: tuple[int, ...] | None = None  # server indices in join order; None: random per seed
    # the "runtime" profile: what blockswarm's own runtime does, step by step and hop by hop
    hop_level: bool = False  # simulate every step's every hop; a server computes one step at a time
    host_block_s: float | None = None  # a server's serial work per block per step; None: its device's time
    client_step_s: float = 0.0  # the client's own work per step (embedding, head, sampling)
    open_rtts: float = 0.0  # set-up: round trips to each hop's server to open its session, beside setup_s
    open_hop_s: float = 0.0  # set-up: each hop's own cost of opening, beside its round trips
    coordinator: str | None = None  # set-up: the location of a coordinator each request asks first, over a
    #                                 connection of its own (open_rtts round trips); None: no coordinator


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    model: ModelSpec
    servers: tuple[ServerSpec, ...]
    clients: tuple[ClientSpec, ...]
    network: NetworkSpec
    workload: WorkloadSpec
    behaviour: Behaviour = Behaviour()

    @property
    def session_cache_bytes(self) -> float:
        """s_c for this workload's maximal lengths."""
        return self.model.session_cache_bytes(self.workload.max_tokens)


@dataclass(frozen=True, slots=True)
class Request:
    client: int  # index into scenario.clients
    prompt_tokens: int
    output_tokens: int
    arrival_s: float = 0.0
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Span:
    """Server `server` holds blocks [start, end) and `slots` block-sessions of KV cache (§5's n_j)."""

    server: int
    start: int
    end: int
    slots: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Placement:
    spans: tuple[Span, ...]  # only servers that hold blocks
    num_blocks: int

    @cached_property
    def _by_server(self) -> dict[int, Span]:
        return {span.server: span for span in self.spans}

    def span_of(self, server: int) -> Span | None:
        return self._by_server.get(server)

    def to_json(self) -> list[dict]:
        return [{"server": s.server, "start": s.start, "end": s.end} for s in self.spans]


@dataclass(frozen=True, slots=True)
class Hop:
    """A route enters `server` at block `start` and computes to the end of its span, `end`."""

    server: int
    start: int
    end: int

    @property
    def blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Route:
    hops: tuple[Hop, ...]

    def covers(self, num_blocks: int) -> bool:
        position = 0
        for hop in self.hops:
            if hop.start != position or hop.end <= hop.start:
                return False
            position = hop.end
        return position == num_blocks and bool(self.hops)

    def to_json(self) -> list[dict]:
        return [{"server": h.server, "start": h.start, "end": h.end} for h in self.hops]
