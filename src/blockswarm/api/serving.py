"""Putting the API together and serving it: the swarm client, the engine, the page's state, uvicorn.

`APIServer` is what `blockswarm api` and `demo --api` run in the foreground (`serve_forever`, which
stops on Ctrl-C) and what tests and benchmarks run in a thread (`start`/`stop`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.runtime.collector import freeze_startup_objects
from blockswarm.runtime.messages import model_name

log = logging.getLogger("blockswarm.api")
MAX_CONNECTIONS = 1000


@dataclass
class APIConfig:
    servers: list[str] | None = None  # host:port of servers (without a coordinator)...
    coordinator: str | None = None  # ...or the coordinator's host:port
    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 8000
    keys: object = None  # a private swarm's security.ClientKeys
    api_keys: set[str] | None = None  # Bearer keys clients must send (None: open)
    insecure: bool = False  # serve beyond loopback without API keys
    slots: int = 16  # generations at once
    queue: int = 64  # requests waiting for a slot before 429s
    full_wait_s: float = 30.0  # how long a request waits out a full swarm before a 429
    timeout_s: float = 60.0  # per server reply
    wait_s: float = 120.0  # with a coordinator: for the swarm to cover the model at start
    dtype: str = "float32"
    max_request_bytes: int = 1 << 20
    default_max_tokens: int = 256
    body_timeout_s: float = 30.0  # the longest a request's body may take to arrive (then 408)

    def check(self) -> None:
        if (self.servers is None) == (self.coordinator is None):
            raise ConfigError("give --servers HOST:PORT,... or --coordinator HOST:PORT (not both)")
        if not is_loopback(self.host) and not self.api_keys and not self.insecure:
            raise ConfigError(f"refusing to serve on {self.host} without API keys: anyone who can reach it could "
                              "use the swarm; pass --api-keys FILE, or --insecure if that is what you want, or "
                              "--host 127.0.0.1")
        for name in ("slots", "queue", "max_request_bytes", "default_max_tokens"):
            if getattr(self, name) < (0 if name == "queue" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {0 if name == 'queue' else 1}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_keys(path: str) -> set[str]:
    """One key per line; blank lines and # comments skipped."""
    try:
        with open(path) as handle:
            keys = {line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")}
    except OSError as exc:
        raise ConfigError(f"cannot read --api-keys {path}: {exc.strerror}") from None
    if not keys:
        raise ConfigError(f"--api-keys {path} holds no key (one per line)")
    return keys


class APIServer:
    def __init__(self, config: APIConfig, on_wait=None):
        """Connects to the swarm (waiting for coverage with a coordinator) and binds the port; the
        model's head loads here, so a bad model or an unreachable swarm is said before serving."""
        config.check()
        import uvicorn

        from blockswarm.api.app import build_app
        from blockswarm.api.engine import Engine
        from blockswarm.api.swarmstate import SwarmState
        from blockswarm.runtime.client import DistributedModel

        self.config = config
        self.socket = bind(config.host, config.port)  # before the model loads: a taken port is said at once
        try:
            if config.coordinator is not None:
                model = DistributedModel.from_coordinator(config.coordinator, model=config.model,
                                                          timeout_s=config.timeout_s, dtype=config.dtype,
                                                          keys=config.keys, wait_s=config.wait_s, on_wait=on_wait)
            else:
                model = DistributedModel.from_servers(config.servers, model=config.model, timeout_s=config.timeout_s,
                                                      dtype=config.dtype, keys=config.keys)
            if not model.head.has_tokenizer:
                model.close()
                raise ConfigError(f"{config.model} has no tokenizer; the API needs one to read text")
        except BaseException:
            self.socket.close()
            raise
        self.state = None
        self.engine = Engine(model, model_name(config.model), config.slots, config.queue, config.full_wait_s,
                             missing=lambda: self.state.missing() if self.state else None)
        self.state = SwarmState(self.engine, model.context, config.coordinator, config.servers, config.keys).start()
        app = build_app(self.engine, self.state, config.api_keys, config.max_request_bytes, config.default_max_tokens,
                        config.body_timeout_s)
        # connections beyond MAX_CONNECTIONS get uvicorn's own 503: a crowd of idle sockets cannot
        # take the process's descriptors (slow bodies are cut by the app after body_timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=2, limit_concurrency=MAX_CONNECTIONS))
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Until Ctrl-C or SIGTERM, then everything stops and KeyboardInterrupt says so. (uvicorn
        catches the signal, shuts down and raises it again, but under asyncio.run that second
        SIGINT may or may not become a KeyboardInterrupt: whether the main task was still running
        decides. Raising it here makes the ending the same every time.)"""
        freeze_startup_objects()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.close()
        if self.server.should_exit:  # (nothing else asks it to exit while it serves in the foreground)
            raise KeyboardInterrupt

    def start(self) -> "APIServer":
        """Serve in a background thread (tests, benchmarks); returns once it accepts requests."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="api",
                                        daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            time.sleep(0.02)
        if not self.server.started:
            raise ConfigError("the API server did not start (see the log above)")
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.state.stop()
        self.engine.close()
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP, and with Nagle on, each streamed chunk waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port "
                          "(0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
