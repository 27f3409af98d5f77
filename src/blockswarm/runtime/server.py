"""`blockswarm serve`: one process holding a span of blocks, serving sessions over ZeroMQ.

A control socket (info/open/close) is served by the main thread, a data socket (steps) by the
compute thread, so control stays responsive while a step computes and steps of many sessions
queue up in ZeroMQ. Every request is validated; a bad one gets an error reply and the server goes on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import torch
import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, ConfigError
from blockswarm.model.checkpoint import model_fingerprint, resolve_model
from blockswarm.model.profile import SpanProfile, measure
from blockswarm.model.span import Span
from blockswarm.runtime.protocol import (
    DTYPE_NAMES, DTYPES, OPS, PROTOCOL_VERSION, ServerInfo, decode, encode, error_reply, keep_alive, ok,
)
from blockswarm.runtime.sessions import SessionTable

log = logging.getLogger("blockswarm.server")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model: str
    start: int
    end: int
    host: str = "127.0.0.1"
    port: int = 0  # control port; 0: pick a free port and report it in the READY line
    data_port: int = 0  # steps; 0: pick a free port (clients learn it from the open reply)
    device: str = "cpu"
    dtype: str = "float32"
    cache_tokens: int = 16384  # tokens of KV cache for the whole span, shared by all sessions
    session_timeout_s: float = 300.0
    threads: int | None = None  # torch intra-op threads; None keeps torch's default


class Server:
    def __init__(self, config: ServeConfig, span: Span, profile: SpanProfile, fingerprint: str):
        self.config, self.span, self.profile, self.fingerprint = config, span, profile, fingerprint
        self.table = SessionTable(span.start, span.end, config.cache_tokens)
        self.address: str | None = None
        self.data_port: int | None = None
        self._stop = threading.Event()

    @classmethod
    def load(cls, config: ServeConfig) -> "Server":
        if config.dtype not in DTYPES:
            raise BadRequest(f"--dtype must be one of {sorted(DTYPES)}")
        _check_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        path = resolve_model(config.model)
        span = Span.load(path, config.start, config.end, dtype=DTYPES[config.dtype], device=config.device)
        return cls(config, span, measure(span), model_fingerprint(path))

    def info(self) -> ServerInfo:
        return ServerInfo(
            version=PROTOCOL_VERSION, model=self.fingerprint, num_blocks=int(self.span.config.num_hidden_layers),
            start=self.span.start, end=self.span.end, hidden_size=self.span.hidden_size,
            dtype=DTYPE_NAMES[self.span.dtype], cache_tokens=self.config.cache_tokens,
            free_cache_tokens=self.table.free_cache_tokens, sessions=len(self.table.sessions),
            block_decode_s=self.profile.block_decode_s,
            block_prefill_s_per_token=self.profile.block_prefill_s_per_token,
            block_prefill_base_s=self.profile.block_prefill_base_s,
            data_port=self.data_port or 0,
        )

    def stop(self) -> None:
        """Ask the serving loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def serve(self, on_ready=None) -> None:
        """Serve until stop(). Two sockets, one per thread (ZeroMQ sockets are not thread-safe):

        - the control socket (this thread) answers info/open/close at once, also while a step
          computes, and expires idle sessions;
        - the data socket (the compute thread) takes steps, computes them inline and replies
          directly. No hand-off between threads on the hot path: on this VM each thread wake-up
          after a long compute costs ~0.2-0.5 ms, and a queue + inproc reply cost two of them.
        """
        context = zmq.Context()
        control = _bound_router(context, self.config.host, self.config.port)
        data = _bound_router(context, self.config.host, self.config.data_port)
        self.address = f"{self.config.host}:{_port(control)}"
        self.data_port = _port(data)
        # the data socket moves to the compute thread; thread start is the memory barrier ZeroMQ asks for
        compute = threading.Thread(target=self._compute_loop, args=(data,), name="compute", daemon=True)
        compute.start()
        if on_ready:
            on_ready(self)
        expiry_interval = max(0.05, min(5.0, self.config.session_timeout_s / 4))
        next_expiry = time.monotonic() + expiry_interval
        try:
            while not self._stop.is_set():
                if control.poll(100):
                    _drain(control, lambda frames: control.send_multipart(
                        [frames[0], *self._answer(frames[1:], self._dispatch)]))
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + expiry_interval
                    for session_id in self.table.expire(self.config.session_timeout_s):
                        log.info("session %s expired after %.0f s idle", session_id, self.config.session_timeout_s)
        finally:
            self._stop.set()
            compute.join(timeout=10)
            control.close(linger=0)
            context.term()

    def _compute_loop(self, data) -> None:
        try:
            while not self._stop.is_set():
                if data.poll(100):
                    _drain(data, lambda frames: data.send_multipart(
                        [frames[0], *self._answer(frames[1:], self._step_op)]))
        finally:
            data.close(linger=0)

    def _answer(self, body: list[bytes], handler) -> list[bytes]:
        """Decode, handle, encode; every failure becomes an error reply and the server goes on.
        Every reply says how long the server held the request (`server_s`), so a client can tell
        the server's share of a round trip from the network's and its own."""
        received = time.perf_counter()
        rid = None
        try:
            header, tensors = decode(body)
            rid = header.get("rid") if isinstance(header.get("rid"), int) else None
            reply, out = handler(header, tensors, rid)
        except BlockswarmError as exc:
            reply, out = error_reply(rid, exc), ()
        except Exception as exc:  # a bug: log it loudly, tell the client, keep serving others
            log.exception("internal error while handling a request")
            reply, out = {"ok": False, "rid": rid, "code": "internal", "retriable": False,
                          "message": f"internal server error: {type(exc).__name__}: {exc}"}, ()
        reply["server_s"] = time.perf_counter() - received
        return encode(reply, out)

    def _step_op(self, header: dict, tensors: list, rid):
        if header.get("op") != "step":
            raise BadRequest(f"the data port takes only steps; send {header.get('op')!r:.40} to the control port")
        return self._step(header, tensors, rid)

    def _dispatch(self, header: dict, tensors: list, rid):
        op = header.get("op")
        if op == "step":
            raise BadRequest(f"steps go to the data port {self.data_port} (the open reply and info name it)")
        if op == "info":
            return ok(rid, **self.info().to_wire()), ()
        if op == "open":
            session = self.table.open(header.get("session"), header.get("start", self.span.start),
                                      header.get("end", self.span.end), header.get("max_length"),
                                      self.span.new_cache)
            return ok(rid, reserved=session.max_length, data_port=self.data_port), ()
        if op == "close":
            self.table.close(header.get("session"))
            return ok(rid), ()
        raise BadRequest(f"unknown op {op!r:.40}; expected one of {', '.join(OPS)}")

    def _step(self, header: dict, tensors: list, rid):
        """Runs on the compute thread: validate against the session, then run the blocks."""
        session = self.table.get(header.get("session"))
        if len(tensors) != 1:
            raise BadRequest(f"step takes exactly one tensor (hidden states), got {len(tensors)}")
        hidden = tensors[0]
        if hidden.dtype != self.span.dtype:
            raise BadRequest(f"hidden states must be {DTYPE_NAMES[self.span.dtype]}, got {DTYPE_NAMES[hidden.dtype]}")
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1 or hidden.shape[2] != self.span.hidden_size:
            raise BadRequest(f"hidden states must have shape (1, new_tokens>=1, {self.span.hidden_size}), "
                             f"got {tuple(hidden.shape)}")
        self.table.check_step(session, session.cache.length, hidden.shape[1])
        begin = time.perf_counter()
        out = self.span.forward(hidden.to(self.span.device), session.cache, first=session.start)
        self.span.synchronize()  # on a GPU the compute is queued; count it as compute, not transport
        return ok(rid, step=header.get("step"), compute_s=time.perf_counter() - begin), (out,)


def run_server(config: ServeConfig) -> None:
    """Load, print one READY line with the address and measured speed, serve until SIGINT/SIGTERM."""
    server = Server.load(config)

    def announce(srv: Server) -> None:
        p = srv.profile
        print(f"READY {srv.address} blocks {config.start}:{config.end} data port {srv.data_port} "
              f"decode {p.block_decode_s * 1e3:.3f} ms/block/token "
              f"prefill {p.block_prefill_s_per_token * 1e3:.4f} ms/token + {p.block_prefill_base_s * 1e3:.3f} ms per block",
              flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve(announce)


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")


def _bound_router(context: zmq.Context, host: str, port: int):
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # oversized frames drop the peer, not us
    keep_alive(socket)  # connections of vanished clients are dropped
    if port:
        socket.bind(f"tcp://{host}:{port}")
    else:
        socket.bind_to_random_port(f"tcp://{host}")
    return socket


def _port(socket) -> int:
    return int(socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])


def _drain(socket, handle) -> None:
    """Handle every message already waiting on a socket without blocking."""
    while True:
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames)
