"""`ServeConfig`: what a server is told on its command line, checked before anything loads (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.runtime.messages import DTYPE_ITEMSIZE


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
        if (self.keys is None) != (self.allow is None):
            raise ConfigError("a private server needs both --keys DIR/NAME (its own key pair) and --allow DIR "
                              "(the clients' public keys)")
