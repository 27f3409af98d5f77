"""`blockswarm coordinator`: the ZeroMQ service around `Swarm`, one thread, one ROUTER socket.

Same framing and limits as a server's control port (msgpack headers, no tensors; `guard.py`
bounds frames, connections and backlogs). Ops:
- from servers: `register` {model shape, address, data_port, device, memory_bytes, per-block
  times, start/end if it already serves} → {server, secret, heartbeat_s, assign};
  `heartbeat` {server, state, start, end, free_cache_tokens, sessions} → {known, assign};
  `leave` {server}.
- from clients: `hello` {client} → {shape, servers, missing, session_tokens};
  `route` {client, prompt_tokens, max_new_tokens[, reservation, start, avoid, gone]} →
  {reservation, hops: [{address, start, end, ticket, key}], waited_s} (a route WS-RR starts later
  is answered then: the request is held, not refused); `release` {client, reservation};
  `rtts` {client, rtts: {address: seconds}}.
- from anyone: `status` → the swarm (see `status_json`).
Every route decision is timed from request decoded to reply encoded (`route_ms` in status).
"""

from __future__ import annotations

import heapq
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, ConfigError
from blockswarm.perf.model import default_request, route_time
from blockswarm.planner.registry import decide
from blockswarm.runtime.collector import freeze_startup_objects
from blockswarm.runtime.coordinator.store import Store, default_state_path
from blockswarm.runtime.coordinator.swarm import DEFAULT_RTT_S, HEARTBEAT_S, Swarm, SwarmConfig
from blockswarm.runtime.endpoints import MAX_FRAMES, bind_router, receive
from blockswarm.runtime.guard import PortLimits
from blockswarm.runtime.messages import (
    MAX_HEADER_BYTES, PROTOCOL_VERSION, decode_header, duration, encode_header, error_reply, integer, number, ok, text,
)
from blockswarm.runtime.ratelog import RateLimitedLog
from blockswarm.runtime.security import KeyPair, start_gate

log = logging.getLogger("blockswarm.coordinator")
BATCH = 256
TICK_S = 0.2  # expiry and placement run this often
OPS = ("register", "heartbeat", "leave", "hello", "route", "release", "rtts", "status")
MAX_RTT_REPORT = 1024


@dataclass(frozen=True)
class CoordinatorConfig:
    swarm: SwarmConfig
    host: str = "127.0.0.1"
    port: int = 0
    state: str | None = None  # SQLite file; None: one per port in the user's cache directory
    keys: str | None = None
    allow: str | None = None


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        if (config.keys is None) != (config.allow is None):
            raise ConfigError("a private coordinator needs both --keys DIR/NAME and --allow DIR (the public keys "
                              "of the servers and clients it admits)")
        self.config = config
        self.ratelog = RateLimitedLog(log)
        self.context = zmq.Context()
        pair = KeyPair.load(config.keys) if config.keys else None
        self.private = pair is not None
        self.gate = start_gate(self.context, config.allow, self.ratelog) if pair else None
        limits = PortLimits(max_frame_bytes=MAX_HEADER_BYTES, max_frames=MAX_FRAMES, max_backlog_bytes=2**18,
                            queue_per_peer=64)
        self.socket, self.guard = bind_router(self.context, config.host, config.port, "--port", pair, limits,
                                              "coordinator", self.ratelog)
        self.port = int(self.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        path = config.state or default_state_path(self.port)
        self.store = Store(path)
        self.swarm = Swarm(config.swarm, self.store)
        self.route_ms: deque[float] = deque(maxlen=10_000)
        self._held: list = []  # (due, sequence, identity, reply frames): routes that start later
        self._sequence = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self, on_ready=None) -> None:
        if on_ready:
            on_ready(self)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.guard.monitor, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                timeout = TICK_S if not self._held else max(0.0, min(TICK_S, self._held[0][0] - time.time()))
                poller.poll(int(timeout * 1000) + 1)
                self.guard.events()
                for _ in range(BATCH):
                    message = receive(self.socket, self.guard, "User-Id" if self.private else "Peer-Address")
                    if message is None:
                        break
                    self._answer(*message)
                self.guard.check()
                now = time.time()
                while self._held and self._held[0][0] <= now:
                    _, _, identity, frames = heapq.heappop(self._held)
                    self.socket.send_multipart([identity, *frames], copy=False)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_S
                    try:
                        self.swarm.expire()
                        self.swarm.place()
                    except Exception:  # a bug: logged (rate-limited); the coordinator keeps serving
                        self.ratelog.exception("tick", "internal error while expiring or placing")
                self._flush_log()
        finally:
            self._flush_log()
            self.close()

    def close(self) -> None:
        self.guard.close()
        if self.gate is not None:
            self.gate.stop()
        self.store.close()
        self.context.destroy(linger=0)

    def _flush_log(self) -> None:
        for line in self.swarm.log:
            log.info("%s", line)
        self.swarm.log.clear()

    def _answer(self, identity: bytes, body: list, peer: str) -> None:
        received = time.perf_counter()
        rid, op, due = None, None, None
        try:
            header = decode_header(body)
            if len(body) > 1:
                raise BadRequest("the coordinator takes no tensors")
            rid = header.get("rid") if isinstance(header.get("rid"), int) else None
            op = header.get("op")
            reply, due = self._dispatch(op, header, peer, rid)
        except BlockswarmError as exc:
            reply = error_reply(rid, exc)
        except Exception:  # a bug: log it (rate-limited), answer, keep serving
            self.ratelog.exception("internal", "internal error while handling a request")
            reply = {"ok": False, "rid": rid, "code": "internal", "retriable": False,
                     "message": "internal coordinator error (logged on the coordinator)"}
        frames = [encode_header(reply)]
        if op == "route":
            self.route_ms.append((time.perf_counter() - received) * 1e3)
        if due is not None and due > time.time():
            self._sequence += 1
            heapq.heappush(self._held, (due, self._sequence, identity, frames))
        else:
            self.socket.send_multipart([identity, *frames], copy=False)

    def _dispatch(self, op, header: dict, peer: str, rid) -> tuple[dict, float | None]:
        swarm = self.swarm
        if op == "route":
            client = text(header, "client", 64)
            avoid = header.get("avoid", [])
            if not isinstance(avoid, list) or len(avoid) > 256 or not all(isinstance(a, str) for a in avoid):
                raise BadRequest("avoid must be a list of at most 256 server addresses")
            reservation_id = header.get("reservation")
            if reservation_id is not None:
                reservation_id = text(header, "reservation", 64)
            start = integer(header, "start", 0, 100_000) if "start" in header else 0
            if header.get("gone") is not None:
                swarm.suspect(text(header, "gone", 64))
            reservation, start_at = swarm.route(
                client, integer(header, "prompt_tokens", 1, 10**7), integer(header, "max_new_tokens", 1, 10**7),
                tuple(avoid), reservation_id, start)
            hops = [h for h in swarm.tickets(reservation) if h["start"] >= start]
            waited = max(0.0, start_at - time.time())
            return ok(rid, reservation=reservation.id, hops=hops, waited_s=waited), start_at
        if op == "release":
            swarm.release(text(header, "reservation", 64))
            return ok(rid), None
        if op == "heartbeat":
            report = {"state": text(header, "state", 16), "free_cache_tokens": integer(header, "free_cache_tokens"),
                      "sessions": integer(header, "sessions"),
                      "start": header.get("start") if isinstance(header.get("start"), int) else None,
                      "end": header.get("end") if isinstance(header.get("end"), int) else None}
            record = swarm.heartbeat(text(header, "server", 64), report)
            if record is None:
                return ok(rid, known=False), None
            return ok(rid, known=True, assign=swarm.assignment(record)), None
        if op == "register":
            info = self._registration(header)
            record = swarm.register(info, peer if self.private else None)
            swarm.place()
            return ok(rid, server=record.id, secret=record.secret, heartbeat_s=HEARTBEAT_S,
                      assign=swarm.assignment(record)), None
        if op == "leave":
            swarm.leave(text(header, "server", 64))
            return ok(rid), None
        if op == "hello":
            swarm.client_position(text(header, "client", 64))
            members = swarm.members()
            return ok(rid, shape=swarm.shape, servers=[r.address for r in members], missing=swarm.missing(),
                      keys={r.address: r.key for r in members if r.key}, session_tokens=swarm.config.session_tokens,
                      version=PROTOCOL_VERSION), None
        if op == "rtts":
            rtts = header.get("rtts")
            if not isinstance(rtts, dict) or len(rtts) > MAX_RTT_REPORT:
                raise BadRequest(f"rtts must be a map of at most {MAX_RTT_REPORT} address -> seconds")
            swarm.report_rtts(text(header, "client", 64), {str(a)[:64]: duration(rtts, a) for a in rtts})
            return ok(rid), None
        if op == "status":
            return ok(rid, **status_json(self, with_scenario=header.get("scenario") is True)), None
        raise BadRequest(f"unknown op {str(op)[:40]!r}; the coordinator takes {', '.join(OPS)}")

    def _registration(self, header: dict) -> dict:
        version = integer(header, "version", 0)
        if version != PROTOCOL_VERSION:
            raise BadRequest(f"the server speaks blockswarm protocol {version}, the coordinator {PROTOCOL_VERSION}")
        num_blocks = integer(header, "num_blocks", 1, 100_000)
        info = {"model": text(header, "model"), "fingerprint": text(header, "fingerprint"), "num_blocks": num_blocks,
                "hidden_size": integer(header, "hidden_size", 1, 2**20), "d_kv": integer(header, "d_kv", 1, 2**20),
                "params_per_block": integer(header, "params_per_block", 1, 2**40), "dtype": text(header, "dtype", 16),
                "itemsize": integer(header, "itemsize", 1, 8), "address": text(header, "address", 64),
                "data_port": integer(header, "data_port", 1, 65535), "device": text(header, "device", 64),
                "memory_bytes": integer(header, "memory_bytes", 1, 2**50),
                "block_decode_s": duration(header, "block_decode_s", positive=True),
                "block_prefill_s_per_token": duration(header, "block_prefill_s_per_token"),
                "block_prefill_base_s": duration(header, "block_prefill_base_s"), "start": None, "end": None}
        # the model's accounting sizes, when they are not the weights' dtype (an emulated big model)
        info["kv_bytes"] = integer(header, "kv_bytes", 1, 8) if "kv_bytes" in header else info["itemsize"]
        for name, default in (("weight_bytes_per_param", float(info["itemsize"])), ("weight_overhead", 1.0)):
            info[name] = number(header, name, 0, 64) if name in header else default
        if header.get("start") is not None:
            info["start"] = integer(header, "start", 0, num_blocks - 1)
            info["end"] = integer(header, "end", info["start"] + 1, num_blocks)
        return info


def status_json(coordinator: Coordinator, with_scenario: bool = False) -> dict:
    """The swarm as `blockswarm status` shows it (and `--json` writes it)."""
    swarm = coordinator.swarm
    servers = []
    for record in sorted(swarm.servers.values(), key=lambda r: r.sequence):
        servers.append({"address": record.address, "start": record.start, "end": record.end, "state": record.state,
                        "device": record.device, "memory_bytes": record.memory_bytes,
                        "block_decode_s": record.block_decode_s,
                        "block_prefill_s_per_token": record.block_prefill_s_per_token,
                        "block_prefill_base_s": record.block_prefill_base_s, "sessions": record.sessions,
                        "free_cache_tokens": record.free_cache_tokens, "cache_tokens": record.cache_tokens,
                        "slots": record.slots})
    coverage = swarm.coverage() if swarm.shape else []
    predicted = None
    if swarm.shape and not swarm.missing():
        view = swarm.view()
        request = default_request(view.scenario, 0)
        try:
            route = decide(swarm.routing, view, request).route
            predicted = route_time(view.scenario, route, request).per_token_s
        except BlockswarmError:
            predicted = None
    latencies = sorted(coordinator.route_ms)
    addresses = {r.id: r.address for r in swarm.servers.values()}
    return {
        "model": swarm.config.model, "policy": swarm.config.policy, "placement_policy": swarm.placement_name,
        "routing_policy": swarm.routing, "R": swarm.R_placed, "session_tokens": swarm.config.session_tokens,
        "servers": servers, "coverage": coverage, "missing": swarm.missing(),
        "predicted_per_token_s": predicted, "private": coordinator.private,
        "routes": [{"reservation": r.id, "client": r.client, "expected_end": r.expected_end,
                    "hops": [[addresses.get(h[0], h[0]), h[1], h[2]] for h in r.hops]}
                   for r in swarm.reservations.values()],
        "route_ms": {"count": len(latencies),
                     "median": latencies[len(latencies) // 2] if latencies else None,
                     "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None},
        "scenario": scenario_document(swarm) if with_scenario and swarm.shape and swarm.members() else None,
    }


def scenario_document(swarm: Swarm) -> dict:
    """The live swarm as a scenario file (YAML/JSON), for `blockswarm plan` and `simulate`."""
    scenario = swarm.scenario()
    model = scenario.model
    return {
        "name": "live",
        "model": {"name": model.name, "num_blocks": model.num_blocks, "d_model": model.d_model, "d_kv": model.d_kv,
                  "params_per_block": model.params_per_block, "weight_bytes_per_param": model.weight_bytes_per_param,
                  "kv_bytes": model.kv_bytes},
        "servers": [{"name": s.name, "location": s.location, "memory_gb": s.memory_bytes / 1e9,
                     "decode_ms": s.decode_s * 1e3, "prefill_ms_per_token": s.prefill_s_per_token * 1e3,
                     "prefill_base_ms": s.prefill_base_s * 1e3} for s in scenario.servers],
        "clients": [{"name": c.name, "location": c.location} for c in scenario.clients],
        "network": {"rtt_ms": _all_pairs_ms(scenario),
                    "decode_overhead_ms": scenario.network.decode_overhead_s * 1e3,
                    "prefill_overhead_ms": scenario.network.prefill_overhead_s * 1e3,
                    "prefill_ms_per_token": 0.0, "setup_ms": 0.0},
        "workload": {"rate": scenario.workload.rate, "requests": 1,
                     "prompt_tokens": scenario.workload.prompt_tokens,
                     "output_tokens": scenario.workload.output_tokens,
                     "max_prompt_tokens": scenario.workload.max_prompt_tokens,
                     "max_output_tokens": scenario.workload.max_output_tokens},
    }


def _all_pairs_ms(scenario) -> dict:
    """Every location pair, as a scenario file needs; pairs the coordinator never uses (server to
    server: hub-and-spoke relay) get the default RTT."""
    locations = sorted({s.location for s in scenario.servers} | {c.location for c in scenario.clients})
    rtt = scenario.network.rtt_s
    return {f"{a} {b}": rtt.get((a, b), rtt.get((b, a), DEFAULT_RTT_S)) * 1e3
            for i, a in enumerate(locations) for b in locations[i:]}


def run_coordinator(config: CoordinatorConfig) -> None:
    coordinator = Coordinator(config)

    def announce(c: Coordinator) -> None:
        print(f"READY {config.host}:{c.port} coordinator policy {config.swarm.policy} state {c.store.path}"
              f"{' private' if c.private else ''}", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: coordinator.stop())
    freeze_startup_objects()
    coordinator.serve(announce)
