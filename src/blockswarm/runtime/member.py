"""A server in a coordinated swarm: it measures itself, registers, loads the span it is given, heartbeats.

`serve --coordinator ADDR [--memory 8GiB]`: the server binds its ports, loads one block to
measure its per-block decode and prefill times and a block's size, registers (memory budget,
device, times), waits for the coordinator to place it, loads only that span's weights, and
serves. Its cache budget is what `--memory` leaves after the span's weights (the coordinator
derives it with the performance model, as it derives the server's blocks). A heartbeat thread
reports its load every second; a reply may assign another span, and then the server drains (it
opens no new sessions), loads the new span once its sessions are done, and serves that. If the
coordinator forgets it (a restart that lost its state), it registers again, with the span it
serves, so nothing is re-placed needlessly.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time

import zmq

from blockswarm.core.errors import BlockswarmError, ConfigError, PeerGone, Timeout
from blockswarm.model.checkpoint import load_config, model_fingerprint, resolve_model
from blockswarm.model.span import Span
from blockswarm.runtime.collector import freeze_startup_objects
from blockswarm.runtime.coordinator.link import CoordinatorLink
from blockswarm.runtime.endpoints import Endpoints, port_limits
from blockswarm.runtime.messages import model_name
from blockswarm.runtime.protocol import DTYPES, PROTOCOL_VERSION
from blockswarm.runtime.ratelog import RateLimitedLog
from blockswarm.runtime.devices import check_device
from blockswarm.runtime.connection import client_context
from blockswarm.runtime.server import Server, ServeConfig, announce_ready, own_profile

log = logging.getLogger("blockswarm.server")
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
REGISTER_TIMEOUT_S = 10.0
DRAIN_S = 120.0  # a server asked to stop waits this long for its sessions to end (a second signal: at once)


def parse_memory(text: str) -> int:
    """'8GiB', '500MB', '300mib', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--memory {text!r}: give a size such as 8GiB, 500MB or 300MiB")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if size <= 0:
        raise ConfigError(f"--memory {text!r} must be positive")
    return size


def default_memory(device: str) -> int:
    """What a server offers without --memory: 90 % of a GPU's free memory, half the free RAM on a CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0] * 0.9)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return 2**32


def kv_width(config) -> int:
    """d_kv: key (or value) values cached per token per block."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return int(kv_heads * head_dim)


class Member:
    """The server's link to the coordinator (its own socket, used by one thread at a time)."""

    def __init__(self, context: zmq.Context, address: str, keys=None):
        self.link = CoordinatorLink(context, address, keys)
        self.server_id: str | None = None
        self.secret: str | None = None

    def call(self, header: dict, timeout_s: float = REGISTER_TIMEOUT_S) -> dict:
        return self.link.call(timeout_s=timeout_s, **header)

    def register(self, registration: dict) -> dict:
        reply = self.call({"op": "register", **registration})
        server, secret = reply.get("server"), reply.get("secret")
        if not isinstance(server, str) or not isinstance(secret, str):
            raise ConfigError(f"{self.link.address} answered register without a server id; is it a coordinator?")
        self.server_id, self.secret = server, secret
        return reply

    def loading(self, timeout_s: float = REGISTER_TIMEOUT_S) -> dict:
        """A heartbeat before serving: placed or not yet, the span is not loaded."""
        return self.call({"op": "heartbeat", "server": self.server_id, "state": "loading", "free_cache_tokens": 0,
                          "sessions": 0}, timeout_s)


def run_member(config: ServeConfig, keys=None) -> None:
    """Bind, measure, register, wait for a span, load it, serve until SIGINT/SIGTERM; leave on exit."""
    config.check()
    check_device(config.device)
    path = resolve_model(config.model)
    model_config = load_config(path)
    context_tokens = getattr(model_config, "max_position_embeddings", None)
    emulation = config.emulation
    memory = emulation.memory_bytes if emulation else (config.memory or default_memory(config.device))
    itemsize = DTYPES[config.dtype].itemsize
    endpoints = Endpoints(config, port_limits(config, context_tokens or config.cache_tokens,
                                              int(model_config.hidden_size), itemsize), RateLimitedLog(log))
    try:
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        # measured on one block, or the emulated device's times and the emulated model's sizes (for
        # the coordinator's accounting)
        probe = Span.load(path, 0, 1, dtype=DTYPES[config.dtype], device=config.device) if emulation is None else None
        profile = own_profile(probe, emulation, config)
        params = emulation.params_per_block if probe is None else sum(p.numel() for p in probe.blocks.parameters())
        del probe
        control_port = int(endpoints.control.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        data_port = int(endpoints.data.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        registration = {
            "version": PROTOCOL_VERSION, "model": model_name(config.model), "fingerprint": model_fingerprint(path),
            "num_blocks": int(model_config.num_hidden_layers), "hidden_size": int(model_config.hidden_size),
            "d_kv": emulation.d_kv if emulation else kv_width(model_config), "params_per_block": int(params),
            "dtype": config.dtype, "itemsize": itemsize, "address": f"{config.reachable_host}:{control_port}",
            "data_port": data_port, "device": emulation.label if emulation else config.device, "memory_bytes": memory,
            "block_decode_s": profile.block_decode_s, "block_prefill_s_per_token": profile.block_prefill_s_per_token,
            "block_prefill_base_s": profile.block_prefill_base_s,
        }
        if emulation is not None:
            registration.update(weight_bytes_per_param=emulation.weight_bytes_per_param,
                                weight_overhead=emulation.weight_overhead, kv_bytes=emulation.kv_bytes)
        if config.end > 0:  # it asks for its span (the testbed places as its simulator does); the coordinator adopts it
            registration.update(start=config.start, end=config.end)
        # its own context (the server destroys its context on exit), leaving from the server's public address
        member = Member(client_context(config.public_host), config.coordinator, keys)
        reply = _patiently(lambda: member.register(registration), config.coordinator)
        print(f"JOINED {registration['address']} coordinator {config.coordinator} memory {memory / 2**30:.2f} GiB "
              f"decode {profile.block_decode_s * 1e3:.3f} ms/block/token; waiting for a span", flush=True)
        assign = reply.get("assign")
        while assign is None:
            time.sleep(reply.get("heartbeat_s", 1.0))
            beat = _patiently(member.loading, config.coordinator)
            if not beat.get("known"):
                reply = _patiently(lambda: member.register(registration), config.coordinator)
                assign = reply.get("assign")
            else:
                assign = beat.get("assign")
        with LoadingBeats(member, reply.get("heartbeat_s", 1.0)):  # (a big span loads for longer than 3 misses)
            span = Span.load(path, assign["start"], assign["end"], dtype=DTYPES[config.dtype], device=config.device)
            served = dataclasses.replace(config, start=assign["start"], end=assign["end"],
                                         cache_tokens=max(1, assign["cache_tokens"]),
                                         max_session_tokens=assign["session_tokens"])
            server = Server(served, span, profile, model_fingerprint(path), context_tokens, endpoints,
                            ticket_secret=member.secret)
            freeze_startup_objects()  # (here, between beats: its full collection holds the GIL for a while)
    except BaseException:
        endpoints.close()
        raise
    heart = Heartbeat(server, member, registration, path)
    heart.start()
    try:
        announce_ready(server, on_signal=heart.leave_gracefully)
    finally:
        heart.leave()


def _patiently(call, address: str):
    """Retry a call to a coordinator that does not answer (it may be restarting), saying so once."""
    said = False
    while True:
        try:
            return call()
        except (Timeout, PeerGone) as exc:
            if not said:
                print(f"waiting for the coordinator at {address}: {exc}", flush=True)
                said = True


class LoadingBeats:
    """While the span it was given loads: a thread that tells the coordinator "loading" every
    `period`, so that a load longer than the coordinator's patience (three missed beats) is not
    taken for a server gone. The member's socket is the thread's until the block ends (starting
    and joining the thread are the memory barriers ZeroMQ asks for)."""

    def __init__(self, member: Member, period: float):
        self.member, self.period = member, period
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loading-beats", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.period):
            try:
                self.member.loading(timeout_s=self.period * 2)
            except BlockswarmError as exc:  # (the heartbeat thread re-registers if it was forgotten)
                log.info("the coordinator did not answer a heartbeat while loading (%s); retrying", exc)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


class Heartbeat:
    """Reports the server's load every period; applies the coordinator's assignments (drain, move)."""

    def __init__(self, server: Server, member: Member, registration: dict, path):
        self.server, self.member, self.registration, self.path = server, member, registration, path
        self._stop = threading.Event()
        self._loading: threading.Thread | None = None
        self._leave_by: float | None = None  # draining to exit: stop when idle or at this time
        self._thread = threading.Thread(target=self.run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()  # the member's socket moves to this thread (start is the memory barrier)

    def leave_gracefully(self) -> None:
        """First Ctrl-C/SIGTERM: drain (no new sessions; the coordinator routes elsewhere), stop once
        the sessions are done; a second one stops at once."""
        if self._leave_by is not None:
            self.server.stop()
            return
        self._leave_by = time.monotonic() + DRAIN_S
        self.server.draining = True
        print(f"draining: no new sessions; stopping when the {len(self.server.table.sessions)} open ones end "
              f"(at most {DRAIN_S:.0f} s; Ctrl-C again to stop now)", flush=True)

    def run(self) -> None:
        period = 1.0
        while not self._stop.wait(period):
            server = self.server
            if self._leave_by is not None and (not (server.table.sessions or server.steps)
                                               or time.monotonic() > self._leave_by):
                server.stop()
                return
            state = "loading" if self._loading is not None else ("draining" if server.draining else "serving")
            header = {"op": "heartbeat", "server": self.member.server_id, "state": state,
                      "start": server.span.start, "end": server.span.end,
                      "free_cache_tokens": server.table.free_cache_tokens, "sessions": len(server.table.sessions)}
            try:
                reply = self.member.call(header, timeout_s=period * 2)
                if not reply.get("known"):
                    reply = self.member.register({**self.registration, "start": server.span.start,
                                                  "end": server.span.end})
                    server.ticket_secret = self.member.secret
                    log.info("registered again with the coordinator (it had forgotten this server)")
                self._apply(reply.get("assign"))
            except BlockswarmError as exc:
                server.log.info("coordinator", "the coordinator did not answer a heartbeat (%s); retrying", exc)

    def _apply(self, assign: dict | None) -> None:
        server = self.server
        if assign is None or self._loading is not None or self._leave_by is not None:
            return
        if (assign["start"], assign["end"]) == (server.span.start, server.span.end):
            return
        if not server.draining:
            log.info("moving to blocks %d:%d: draining (no new sessions)", assign["start"], assign["end"])
            server.draining = True
        if server.table.sessions or server.steps:
            return
        self._loading = threading.Thread(target=self._move, args=(assign,), name="loader", daemon=True)
        self._loading.start()

    def _move(self, assign: dict) -> None:
        server = self.server
        try:
            span = Span.load(self.path, assign["start"], assign["end"], dtype=server.span.dtype,
                             device=server.span.device)
            server.swap(span, max(1, assign["cache_tokens"]))
            log.info("now serving blocks %d:%d", span.start, span.end)
        except Exception:
            log.exception("loading blocks %d:%d failed; still draining", assign["start"], assign["end"])
        finally:
            self._loading = None

    def leave(self) -> None:
        """Tell the coordinator this server is going (a graceful exit frees its blocks at once)."""
        self._stop.set()
        self._thread.join(timeout=5)  # its socket is ours again once it has stopped
        try:
            self.member.call({"op": "leave", "server": self.member.server_id}, timeout_s=1.0)
        except BlockswarmError:
            pass
