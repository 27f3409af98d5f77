"""`ServeConfig`: what a server is told on its command line, checked before anything loads (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.runtime.messages import DTYPE_ITEMSIZE


@dataclass(frozen=True, slots=True)
class Emulation:
    """Another device's speed and memory, taken on by a server whose own compute is negligible
    (the testbed: a tiny model standing for a big one). Each step's reply is held until the
    emulated device would have finished it; steps of different sessions overlap, as the
    performance model's servers batch them for free. The server registers these times and this
    memory, and the model's accounting numbers (block size, KV width and bytes), instead of its own.
    It knows nothing of scenarios: `testbed.devices` fills it from one."""

    block_decode_s: float  # seconds per token per block
    block_prefill_s_per_token: float  # a prompt of n tokens: per block, n * this + base
    block_prefill_base_s: float
    memory_bytes: int
    d_kv: int
    params_per_block: int
    weight_bytes_per_param: float
    weight_overhead: float
    kv_bytes: int
    label: str = "an emulated device"  # said in the READY line

    def step_s(self, blocks: int, tokens: int, prompt: bool) -> float:
        """How long the emulated device computes a step of `tokens` tokens over `blocks` blocks."""
        if prompt:
            return blocks * (self.block_prefill_s_per_token * tokens + self.block_prefill_base_s)
        return blocks * self.block_decode_s * tokens

    def check(self) -> None:
        if not (self.block_decode_s > 0 and self.block_prefill_s_per_token >= 0 and self.block_prefill_base_s >= 0):
            raise ConfigError("an emulated device needs a positive decode time and non-negative prefill times")
        if min(self.memory_bytes, self.d_kv, self.params_per_block, self.kv_bytes) < 1 or \
                not self.weight_bytes_per_param > 0 or not self.weight_overhead > 0:
            raise ConfigError("an emulated device needs positive memory and model sizes")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model: str
    start: int = 0  # the span; with a coordinator, the coordinator assigns it
    end: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # control port; 0: pick a free port and report it in the READY line
    data_port: int = 0  # steps; 0: pick a free port (clients learn it from the open reply)
    device: str = "cpu"
    dtype: str = "float32"
    cache_tokens: int = 16384  # tokens of KV cache for the whole span, shared by all sessions
    session_timeout_s: float = 300.0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    decode_s: float | None = None  # per-block decode time to announce instead of the measured one (--decode-ms)
    prefill_budget: int = 512  # tokens per compute slice: longer prompts run in slices
    max_session_tokens: int | None = None  # one session's limit; None: the model's context length
    max_peer_share: float = 1.0  # share of the cache one peer (key or address) may hold
    max_sessions: int = 4096
    max_connections: int = 1024  # per port, from everybody
    max_connections_per_address: int = 512  # per port, from one source address
    keys: str | None = None  # DIR/NAME of this server's CURVE key pair: a private swarm
    allow: str | None = None  # directory of the public keys (*.key) of the clients admitted
    coordinator: str | None = None  # host:port of the coordinator that places this server (no --blocks)
    memory: int | None = None  # bytes this server offers a coordinator (weights + cache); None: measured
    public_host: str | None = None  # the address others reach it at and its own connections leave from
    #   (the testbed's link emulator listens there on the same ports); None: `host`
    emulation: Emulation | None = None  # take on another device's speed and memory (the testbed)

    @property
    def reachable_host(self) -> str:
        return self.public_host or self.host

    def check(self) -> None:
        """Values a user typed; each error says what to change."""
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPE_ITEMSIZE)}")
        for name, value, low in [("--cache-tokens", self.cache_tokens, 1), ("--prefill-budget", self.prefill_budget, 1),
                                 ("--max-sessions", self.max_sessions, 1), ("--max-connections", self.max_connections, 2),
                                 ("--max-connections-per-address", self.max_connections_per_address, 2)]:
            if value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        if not self.session_timeout_s > 0:
            raise ConfigError(f"--session-timeout must be positive, got {self.session_timeout_s}")
        if not 0 < self.max_peer_share <= 1:
            raise ConfigError(f"--max-peer-share must be in (0, 1], got {self.max_peer_share}")
        if self.coordinator is None and not 0 <= self.start < self.end:
            raise ConfigError("give --blocks START:END, or --coordinator HOST:PORT to have a coordinator place it")
        if self.emulation is not None:
            self.emulation.check()
        if (self.keys is None) != (self.allow is None):
            raise ConfigError("a private server needs both --keys DIR/NAME (its own key pair) and --allow DIR "
                              "(the clients' public keys)")
