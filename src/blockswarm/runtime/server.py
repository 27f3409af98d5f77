"""`blockswarm serve`: one process holding a span of blocks, serving sessions over ZeroMQ.

A control socket (info/open/close) is served by the main thread, a data socket (steps) by the
compute thread, so control stays responsive while a step computes. Every request is validated;
a bad one gets an error reply and the server goes on. Nothing a peer sends can grow the
server's memory without bound or hold it for long: frames, messages, connections, sessions and
cache per peer are bounded (see `guard.py`), long prompts run in slices between other sessions'
steps (`steps.py`), and the control loop answers in bounded batches so that expiry and shutdown
always get their turn.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import signal
import threading
import time

import torch
import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, CacheFull, ServerError, UnknownSession
from blockswarm.model.checkpoint import load_config, model_fingerprint, resolve_model
from blockswarm.model.profile import SpanProfile, measure
from blockswarm.model.span import Span
from blockswarm.runtime.collector import freeze_startup_objects
from blockswarm.runtime.devices import check_device
from blockswarm.runtime.endpoints import Endpoints, port_limits, receive
from blockswarm.runtime.guard import HOT_CHECK_S, Guard, give_memory_back
from blockswarm.runtime.protocol import (
    DTYPE_NAMES, DTYPES, OPS, PROTOCOL_VERSION, ServerInfo, decode, encode, error_reply, integer, ok, text,
)
from blockswarm.runtime.ratelog import RateLimitedLog
from blockswarm.runtime.sessions import Limits, SessionTable
from blockswarm.runtime.serveconfig import ServeConfig  # noqa: F401  (re-exported: callers import it from here)
from blockswarm.runtime.steps import StepJob, StepQueue
from blockswarm.runtime.tickets import Ticket, TicketBook

log = logging.getLogger("blockswarm.server")
BATCH = 256  # messages handled per loop turn before expiry, guards and shutdown get theirs
MAX_QUEUED_STEPS = 4096  # steps read but not yet computed; beyond it ZeroMQ holds them (per peer, bounded)


class Server:
    def __init__(self, config: ServeConfig, span: Span, profile: SpanProfile, fingerprint: str,
                 context_tokens: int | None = None, endpoints: Endpoints | None = None,
                 ticket_secret: str | None = None):
        """`context_tokens`: the model's context length, the default limit of one session.
        `ticket_secret`: in a coordinated swarm, sessions open only with the coordinator's tickets."""
        config.check()
        self.config, self.span, self.profile, self.fingerprint = config, span, profile, fingerprint
        self.hidden_size, self.dtype = span.hidden_size, span.dtype  # (a config lookup costs µs per step)
        max_tokens = _session_tokens(config, context_tokens)
        self.table = SessionTable(span.start, span.end, config.cache_tokens,
                                  Limits(max_tokens, config.max_sessions, config.max_peer_share))
        self.endpoints = endpoints or Endpoints(
            config, port_limits(config, max_tokens, span.hidden_size, span.dtype.itemsize), RateLimitedLog(log))
        self.log = self.endpoints.log
        self.steps = StepQueue(config.prefill_budget, MAX_QUEUED_STEPS)
        self.ticket_secret = ticket_secret
        self.tickets = TicketBook()
        self.draining = False  # moving to another span: no new sessions
        self._peer_property = "User-Id" if self.endpoints.private else "Peer-Address"  # who owns a session
        self.address: str | None = None
        self.data_port: int | None = None
        self._stop = threading.Event()
        # replies an emulated device has not finished yet: (due, order, identity, reply, tensors, received)
        self._held: list[tuple] = []
        self._held_order = itertools.count()

    @classmethod
    def load(cls, config: ServeConfig) -> "Server":
        """Bind first (a port in use fails at once), then load the span and measure it."""
        config.check()
        check_device(config.device)
        path = resolve_model(config.model)
        model_config = load_config(path)
        context_tokens = getattr(model_config, "max_position_embeddings", None)
        limits = port_limits(config, _session_tokens(config, context_tokens), int(model_config.hidden_size),
                             DTYPES[config.dtype].itemsize)
        endpoints = Endpoints(config, limits, RateLimitedLog(log))
        try:
            if config.threads:
                torch.set_num_threads(config.threads)
            span = Span.load(path, config.start, config.end, dtype=DTYPES[config.dtype], device=config.device)
            profile = own_profile(span, config.emulation, config)
            return cls(config, span, profile, model_fingerprint(path), context_tokens, endpoints)
        except BaseException:
            endpoints.close()
            raise

    def info(self) -> ServerInfo:
        return ServerInfo(
            version=PROTOCOL_VERSION, model=self.fingerprint, num_blocks=int(self.span.config.num_hidden_layers),
            start=self.span.start, end=self.span.end, hidden_size=self.span.hidden_size,
            dtype=DTYPE_NAMES[self.span.dtype], cache_tokens=self.config.cache_tokens,
            free_cache_tokens=self.table.free_cache_tokens, sessions=len(self.table.sessions),
            block_decode_s=self.profile.block_decode_s,
            block_prefill_s_per_token=self.profile.block_prefill_s_per_token,
            block_prefill_base_s=self.profile.block_prefill_base_s,
            data_port=self.data_port or 0, device=str(self.span.device),
        )

    def stop(self) -> None:
        """Ask the serving loop to finish (safe from signal handlers and other threads)."""
        self._stop.set()

    def swap(self, span: Span, cache_tokens: int) -> None:
        """Serve another span (the coordinator moved this server); only once no session is open."""
        if self.table.sessions or self.steps:
            raise BadRequest("cannot move while sessions are open")
        limits = self.table.limits
        self.config = dataclasses.replace(self.config, start=span.start, end=span.end, cache_tokens=cache_tokens)
        self.span = span
        self.table = SessionTable(span.start, span.end, cache_tokens, limits)
        self.tickets = TicketBook()
        self.draining = False

    def serve(self, on_ready=None) -> None:
        """Serve until stop(). Two sockets, one per thread (ZeroMQ sockets are not thread-safe):

        - the control socket (this thread) answers info/open/close at once, also while a step
          computes, expires idle sessions and runs both ports' guards;
        - the data socket (the compute thread) takes steps and computes them in slices, replying
          directly. No hand-off between threads on the hot path: on this VM each thread wake-up
          after a long compute costs ~0.2-0.5 ms, and a queue + inproc reply cost two of them.
        """
        ends = self.endpoints
        control, data, guards = ends.control, ends.data, ends.guards
        self.address = f"{self.config.reachable_host}:{_port(control)}"
        self.data_port = _port(data)
        # the data socket moves to the compute thread; thread start is the memory barrier ZeroMQ asks for
        compute = threading.Thread(target=self._compute_loop, args=(data, guards[1]), name="compute", daemon=True)
        compute.start()
        if not ends.private:
            log.warning("serving an OPEN swarm: anyone who can reach %s may use it, and traffic is not encrypted "
                        "(see `blockswarm keys new` and serve --keys/--allow for a private swarm)", self.address)
        if on_ready:
            on_ready(self)
        poller = zmq.Poller()
        for socket in (control, *(g.monitor for g in guards)):
            poller.register(socket, zmq.POLLIN)
        expiry_interval = max(0.05, min(5.0, self.config.session_timeout_s / 4))
        next_expiry = time.monotonic()
        trim_at = None
        try:
            while not self._stop.is_set():
                hot = any(guard.hot for guard in guards)
                poller.poll(int(HOT_CHECK_S * 1000) if hot else 100)
                for guard in guards:
                    guard.events()
                self._serve_batch(control, guards[0], self._dispatch)
                for guard in guards:
                    guard.check()
                now = time.monotonic()
                if any(guard.trim_due for guard in guards):  # a flood was cut: once libzmq freed it,
                    trim_at = now + 0.5                     # give the memory back to the system
                    for guard in guards:
                        guard.trim_due = False
                if trim_at is not None and now >= trim_at:
                    trim_at = None
                    give_memory_back()
                if now >= next_expiry:
                    next_expiry = now + expiry_interval
                    for token in self.table.expire(self.config.session_timeout_s):
                        self.log.info("expiry", "a session expired after %.0f s idle (%s…)",
                                      self.config.session_timeout_s, token[:8])
        finally:
            self._stop.set()
            compute.join(timeout=5)
            if compute.is_alive():  # a forward is still running: its socket is in use, leave the context
                log.warning("stopping while a step still computes; not waiting for it")
            else:
                ends.close()

    def _serve_batch(self, socket: zmq.Socket, guard: Guard, handler) -> None:
        """Answer at most BATCH waiting control messages, so a flood cannot starve the rest of the loop."""
        for _ in range(BATCH):
            message = receive(socket, guard, self._peer_property)
            if message is None:
                return
            identity, body, peer = message
            socket.send_multipart([identity, *self._answer(body, peer, handler)], copy=False)

    def _compute_loop(self, data: zmq.Socket, guard: Guard) -> None:
        try:
            while not self._stop.is_set():
                if self._held:
                    self._send_due(data)
                if not self.steps:
                    if data.poll(self._idle_ms()):
                        self._take_steps(data, guard)
                elif not self.steps.full:
                    self._take_steps(data, guard)  # steps that came in during the last slice
                if self.steps:
                    self._run_slice(data)
        finally:
            data.close(linger=0)

    def _idle_ms(self) -> int:
        """How long the compute thread may wait for steps: until the next held reply is due. zmq's
        poll counts whole milliseconds, so the last stretch is slept precisely instead."""
        if not self._held:
            return 100
        left = self._held[0][0] - time.perf_counter()
        if left <= 0.0015:
            time.sleep(max(0.0, left))
            return 0
        return int((left - 0.001) * 1000)

    def _send_due(self, data: zmq.Socket) -> None:
        now = time.perf_counter()
        while self._held and self._held[0][0] <= now:
            _, _, identity, reply, tensors, received = heapq.heappop(self._held)
            data.send_multipart([identity, *self._finish(reply, tensors, received)], copy=False)

    def _take_steps(self, data: zmq.Socket, guard: Guard) -> None:
        """Read waiting steps into the queue; answer the ones that cannot run at once."""
        for _ in range(BATCH):
            if self.steps.full:
                return
            message = receive(data, guard, self._peer_property)
            if message is None:
                return
            identity, body, peer = message
            received = time.perf_counter()
            rid = None
            try:
                header, tensors = decode(body)
                rid = _rid(header)
                self.steps.push(self._admit_step(header, tensors, identity, rid, peer, received))
            except BlockswarmError as exc:
                data.send_multipart([identity, *self._finish(error_reply(rid, exc), (), received)], copy=False)
            except Exception:  # a bug: log it (rate-limited), tell the client, keep serving others
                self.log.exception("internal-step", "internal error while admitting a step")
                data.send_multipart([identity, *self._finish(_internal(rid), (), received)], copy=False)

    def _admit_step(self, header: dict, tensors: list, identity: bytes, rid, peer: str, received: float) -> StepJob:
        if header.get("op") != "step":
            raise BadRequest(f"the data port takes only steps; send {_op_name(header)} to the control port")
        session = self.table.find(text(header, "session"), peer)
        if len(tensors) != 1:
            raise BadRequest(f"step takes exactly one tensor (hidden states), got {len(tensors)}")
        hidden = tensors[0]
        if hidden.dtype != self.dtype:
            raise BadRequest(f"hidden states must be {DTYPE_NAMES[self.dtype]}, got {DTYPE_NAMES[hidden.dtype]}")
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.hidden_size:
            raise BadRequest(f"hidden states must have shape (1, new_tokens>=1, {self.hidden_size}), "
                             f"got {tuple(hidden.shape)}")
        self.table.accept_step(session, integer(header, "step", 1), hidden.shape[1])
        return StepJob(identity, rid, header["step"], session, hidden, received)

    def _run_slice(self, data: zmq.Socket) -> None:
        """Run one slice of the job whose turn it is; reply when its step is complete."""
        job = self.steps.head()
        session = job.session
        if not self.table.acquire(session):  # closed or expired while queued
            self._answer_dropped(data, session, UnknownSession(
                "the session was closed or expired before this step ran; open it again"))
            return
        first, last = job.next_slice(self.steps.budget)
        hidden = job.hidden if last - first == job.tokens else job.hidden[:, first:last]  # (no view per decode)
        try:
            begin = time.perf_counter()
            # an emulated device finishes other sessions' steps while this one computes: their
            # replies leave on time, not after this step's (real, serial) compute
            send_due = (lambda: self._send_due(data)) if self._held else None
            out = self.span.forward(hidden.to(self.span.device), session.cache, first=session.start,
                                    between_blocks=send_due)
            self.span.synchronize()  # on a GPU the compute is queued; count it as compute, not transport
            job.compute_s += time.perf_counter() - begin
        except Exception as exc:
            # the cache may have grown in some layers and not in others: never step it again
            self.table.release(session)
            self.table.drop(session)
            self.log.exception("forward", "a step failed half-way; its session was dropped")
            self._answer_dropped(data, session, ServerError(
                f"the server failed while computing this step ({type(exc).__name__}); the session was dropped "
                "here: open it again, here or on another server"))
            return
        self.table.release(session)
        job.outputs.append(out)
        job.done = last
        finished = job.done == job.tokens
        self.steps.advance(finished)
        if finished:
            hidden = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1)
            emulation = self.config.emulation
            if emulation is not None:  # the reply leaves when the emulated device would have finished
                device_s = emulation.step_s(self.span.end - session.start, job.tokens, prompt=job.number == 1)
                reply = ok(job.rid, step=job.number, compute_s=device_s, host_s=job.compute_s)
                heapq.heappush(self._held, (job.received + device_s, next(self._held_order), job.identity, reply,
                                            (hidden,), job.received))
                self._send_due(data)
                return
            reply = ok(job.rid, step=job.number, compute_s=job.compute_s)
            data.send_multipart([job.identity, *self._finish(reply, (hidden,), job.received)], copy=False)

    def _answer_dropped(self, data: zmq.Socket, session, error: BlockswarmError) -> None:
        """A session went away: every step of it still queued gets the error."""
        for job in self.steps.remove_session(session.token):
            data.send_multipart([job.identity, *self._finish(error_reply(job.rid, error), (), job.received)],
                                copy=False)

    def _answer(self, body: list, peer: str, handler) -> list:
        """Decode, handle, encode; every failure becomes an error reply and the server goes on.
        Every reply says how long the server held the request (`server_s`), so a client can tell
        the server's share of a round trip from the network's and its own."""
        received = time.perf_counter()
        rid = None
        try:
            header, tensors = decode(body)
            rid = _rid(header)
            if tensors:
                raise BadRequest(f"the control port takes no tensors; steps go to the data port {self.data_port}")
            reply = handler(header, peer, rid)
        except BlockswarmError as exc:
            reply = error_reply(rid, exc)
        except Exception:  # a bug: log it (rate-limited), tell the client, keep serving others
            self.log.exception("internal-control", "internal error while handling a request")
            reply = _internal(rid)
        return self._finish(reply, (), received)

    def _finish(self, reply: dict, tensors: tuple, received: float) -> list:
        reply["server_s"] = time.perf_counter() - received
        return encode(reply, tensors)

    def _dispatch(self, header: dict, peer: str, rid) -> dict:
        op = header.get("op")
        if op == "step":
            raise BadRequest(f"steps go to the data port {self.data_port} (the open reply and info name it)")
        if op == "info":
            return ok(rid, **self.info().to_wire())
        if op == "open":
            return self._open(header, peer, rid)
        if op == "close":
            self.table.close(text(header, "session"), peer)
            return ok(rid)
        raise BadRequest(f"unknown op {_op_name(header)}; expected one of {', '.join(OPS)}")


    def _open(self, header: dict, peer: str, rid) -> dict:
        if self.draining:
            raise CacheFull("this server is moving to other blocks and opens no new sessions; ask the coordinator "
                            "for another route")
        start = integer(header, "start", 0, 10**9)
        if "end" in header and integer(header, "end", 0, 10**9) != self.span.end:
            raise BadRequest(f"a route that enters this server computes to the end of its span, block "
                             f"{self.span.end}; ask for end={self.span.end} or leave end out")
        max_length = integer(header, "max_length", 1, 10**9)
        terms = None
        if self.ticket_secret is not None:  # coordinated: only the coordinator's reservations open sessions
            terms = Ticket.check(self.ticket_secret, header.get("ticket"), start, max_length)
            previous = self.tickets.previous(terms.reservation)
            if previous is not None:  # one live session per ticket: a reopening replaces the old one
                self.table.close(previous, peer)
        session = self.table.open(start, max_length, peer, self.span.new_cache)
        if terms is not None:
            if len(self.tickets) > 4 * self.config.max_sessions:
                self.tickets.forget_closed(self.table.sessions)
            self.tickets.record(terms.reservation, session.token)
        return ok(rid, session=session.token, reserved=session.max_length, data_port=self.data_port)


def run_server(config: ServeConfig, server_class: type[Server] = Server) -> None:
    """Bind, load, print one READY line with the address and measured speed, serve until SIGINT/SIGTERM.
    (`server_class`: tests run hostile variants of the server through the same start-up.)"""
    server = server_class.load(config)
    freeze_startup_objects()  # (the model is loaded and measured: what is alive now lives as long as we do)
    announce_ready(server)


def announce_ready(server: Server, on_signal=None) -> None:
    """Serve until SIGINT/SIGTERM, printing one READY line with the address and speed once serving.
    `on_signal`: what a signal does instead of stopping at once (a coordinated server drains)."""

    def announce(srv: Server) -> None:
        p = srv.profile
        config = srv.config
        emulating = f" emulating {config.emulation.label}" if config.emulation else ""
        print(f"READY {srv.address} blocks {config.start}:{config.end} data port {srv.data_port} "
              f"decode {p.block_decode_s * 1e3:.3f} ms/block/token "
              f"prefill {p.block_prefill_s_per_token * 1e3:.4f} ms/token + {p.block_prefill_base_s * 1e3:.3f} ms per block"
              f"{' private' if srv.endpoints.private else ''}{emulating}",
              flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (on_signal or server.stop)())
    server.serve(announce)


def own_profile(span: Span | None, emulation, config: ServeConfig) -> SpanProfile:
    """What a server announces of its speed: the emulated device's times, or those measured on
    `span`, with the operator's per-block decode time where given (--decode-ms, as PETALS'
    --throughput overrides its benchmark): what clients and the coordinator plan with."""
    profile = emulated_profile(emulation) if emulation is not None else measure(span)
    return profile if config.decode_s is None else dataclasses.replace(profile, block_decode_s=config.decode_s)


def emulated_profile(emulation) -> SpanProfile:
    """An emulated device's times, reported instead of measured ones."""
    return SpanProfile(emulation.block_decode_s, emulation.block_prefill_s_per_token, emulation.block_prefill_base_s)


def _session_tokens(config: ServeConfig, context_tokens: int | None) -> int:
    return min(config.max_session_tokens or context_tokens or config.cache_tokens, config.cache_tokens)


def _rid(header: dict):
    rid = header.get("rid")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else None


def _op_name(header: dict) -> str:
    op = header.get("op")
    return repr(op[:40]) if isinstance(op, str) else f"of type {type(op).__name__}"


def _internal(rid) -> dict:
    return {"ok": False, "rid": rid, "code": "internal", "retriable": False,
            "message": "internal server error (logged on the server)"}


def _port(socket) -> int:
    return int(socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
