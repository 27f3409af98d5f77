"""The coordinator's decisions over live state: who holds which blocks, and which route each session takes.

No sockets here (the service feeds it messages, the benchmark drives it directly) and no torch.
Every decision goes through the planner's registry: placement with `PLACEMENTS[...]` and
`planner.live` (joins and repairs), routing with `registry.decide` on a `SwarmView` built from
live state — the servers' measured per-block times and memory, each client's measured RTT to
each server, and the cache slots held by reservations. One policy, two worlds: the simulator
builds the same view from simulated state.

Units follow the planner: a server's cache is counted in slots (block-sessions sized for
`session_tokens` tokens, s_c of the performance model); a hop over k blocks holds k slots.
Times are wall-clock seconds (`time.time()`), so they survive a restart in the state file.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from blockswarm.core.errors import BadRequest, CacheFull, ConfigError, Infeasible, TooLarge
from blockswarm.core.specs import (
    Placement, Request, Scenario, Span,
)
from blockswarm.perf.model import route_time
from blockswarm.planner import live
from blockswarm.planner.registry import QUEUE_ROUTERS, WAITING_ROUTERS, decide, parse_policy
from blockswarm.planner.routing import has_room
from blockswarm.planner.view import SwarmView
from blockswarm.runtime.coordinator.liveview import LiveView
from blockswarm.runtime.coordinator.placing import Placing
from blockswarm.runtime.coordinator.records import (  # noqa: F401  (re-exported for the service and tests)
    DEFAULT_RTT_S, GONE_KEPT_S, GRACE_S, HEARTBEAT_S, MISSES, SETTLE_S, STATES, TICKET_S, TYPICAL_TOKENS,
    MeasuredRtts, Reservation, ServerRecord, SwarmConfig, missing_blocks_text,
)
from blockswarm.runtime.coordinator.store import Store

from blockswarm.runtime.tickets import Ticket, new_secret

ENDED_KEPT = 1000  # reservations whose end is remembered, to say why an unknown one ended
SUSPECT_S = 1.5 * HEARTBEAT_S  # silent this long, and reported lost by a client: gone


@dataclass
class Swarm(LiveView, Placing):
    config: SwarmConfig
    store: Store | None = None
    clock: object = time.time
    servers: dict[str, ServerRecord] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    clients: dict[str, float] = field(default_factory=dict)  # client id -> last seen
    rtts: dict[tuple[str, str], float] = field(default_factory=dict)  # (client, server id) -> RTT
    shape: dict | None = None  # the model as the first server reported it
    R_placed: int | None = None
    last_join: float = 0.0
    log: list[str] = field(default_factory=list)  # decisions worth telling (the service prints them)
    arrivals: deque = field(default_factory=deque)
    ended: dict = field(default_factory=dict)  # reservation -> why it ended (the last ENDED_KEPT), for errors

    def __post_init__(self):
        self.placement_name, self.routing = parse_policy(self.config.policy)
        if self.routing in QUEUE_ROUTERS:
            raise ConfigError(f"policy {self.config.policy!r} dispatches from a central queue, which the coordinator "
                              "does not run yet; serve with petals, cgbprr or another PLACEMENT+ROUTING pair")
        self._cache: dict = {}  # scenario, indices, placement, view parts; cleared on any change
        self._cache_R: dict = {}  # when R was last checked and last acted on
        self._targets: dict[str, Span] = {}  # moves of a re-placement still to make
        self._said: dict[str, str] = {}  # topic -> the line last logged on it (placing.py's _say_once)
        if self.store is not None:
            self._restore()

    # -- persistence --------------------------------------------------------------------------
    def _restore(self) -> None:
        meta = self.store.load("meta")
        self.shape = meta.get("shape")
        self.R_placed = meta.get("R_placed")
        now = self.clock()
        for key, value in self.store.load("servers").items():
            record = ServerRecord(**value)
            if record.state != "gone":  # it must report within the grace period (see expire), and until
                record.last_seen = now + GRACE_S - HEARTBEAT_S * MISSES  # it does, no route uses it
                record.loaded, record.restored = False, True
            self.servers[key] = record
        for key, value in self.store.load("reservations").items():
            self.reservations[key] = Reservation(**value)
        for key, value in self.store.load("rtts").items():
            client, server = key.split(" ")
            self.rtts[(client, server)] = value
        if self.servers:
            self.log.append(f"restored {len(self.servers)} servers and {len(self.reservations)} reservations; "
                            f"servers have {GRACE_S:.0f} s to report back")

    def _save_server(self, record: ServerRecord) -> None:
        if self.store is not None:
            self.store.put("servers", record.id, asdict(record))

    def _save_meta(self) -> None:
        if self.store is not None:
            self.store.put("meta", "shape", self.shape)
            self.store.put("meta", "R_placed", self.R_placed)

    def _changed(self) -> None:
        self._cache.clear()

    # -- servers ------------------------------------------------------------------------------
    def register(self, info: dict, key: str | None = None) -> ServerRecord:
        """A server joins (or comes back): `info` is checked by the service; returns its record."""
        shape = {k: info[k] for k in ("model", "fingerprint", "num_blocks", "hidden_size", "d_kv",
                                      "params_per_block", "dtype", "itemsize", "kv_bytes",
                                      "weight_bytes_per_param", "weight_overhead") if k in info}
        if shape["model"] != self.config.model:
            raise ConfigError(f"this coordinator serves model {self.config.model!r}; the server holds "
                              f"{shape['model']!r}")
        if self.shape is None:
            self.shape = shape
            self._save_meta()
        elif shape != self.shape:
            raise ConfigError(f"the server's model ({shape['fingerprint']}, {shape['dtype']}) differs from the "
                              f"swarm's ({self.shape['fingerprint']}, {self.shape['dtype']}); run the same model "
                              "and --dtype everywhere")
        now = self.clock()
        for old in self.servers.values():  # the same address registering again: it restarted
            if old.address == info["address"] and old.state != "gone":
                self._mark_gone(old, "registered again (restarted)")
        record = ServerRecord(
            id=secrets.token_hex(8), address=info["address"], data_port=info["data_port"], device=info["device"],
            memory_bytes=info["memory_bytes"], block_decode_s=info["block_decode_s"],
            block_prefill_s_per_token=info["block_prefill_s_per_token"],
            block_prefill_base_s=info["block_prefill_base_s"], secret=new_secret(), key=key,
            joined=now, last_seen=now, sequence=1 + max((r.sequence for r in self.servers.values()), default=0))
        if info.get("start") is not None:  # it already serves a span (the coordinator lost its state)
            self._adopt(record, info["start"], info["end"])
        self.servers[record.id] = record
        self.last_join = now
        self._save_server(record)
        self._changed()
        self.log.append(f"server {record.address} joined: {record.memory_bytes / 2**30:.2f} GiB, {record.device}, "
                        f"{record.block_decode_s * 1e3:.3f} ms/block/token")
        return record

    def heartbeat(self, server_id: str, report: dict) -> ServerRecord | None:
        """A server's report; None if the coordinator does not know it (it must register again)."""
        record = self.servers.get(server_id)
        if record is None or record.state == "gone":
            return None
        record.last_seen = self.clock()
        record.restored = False
        record.free_cache_tokens, record.sessions = report["free_cache_tokens"], report["sessions"]
        serving = report["state"] == "serving"
        span_ok = record.start is not None and (report.get("start"), report.get("end")) == (record.start, record.end)
        if report["state"] == "draining" and record.state == "serving" and span_ok:
            record.state = "draining"  # leaving: no new routes through it
            self.log.append(f"server {record.address} is draining")
            self._changed()
            self._save_server(record)
        elif serving and span_ok and (record.state == "loading" or not record.loaded):
            record.state, record.loaded = "serving", True
            self.log.append(f"server {record.address} serves blocks {record.start}:{record.end}")
            self._changed()
            self._save_server(record)
        return record

    def assignment(self, record: ServerRecord) -> dict | None:
        if record.start is None:
            return None
        return {"start": record.start, "end": record.end, "cache_tokens": record.cache_tokens,
                "session_tokens": self.config.session_tokens}

    def _adopt(self, record: ServerRecord, start: int, end: int) -> None:
        scenario = self._scenario_with(record)
        index = len(scenario.servers) - 1
        self._assign(record, live.span_for(self.placement_name, scenario, index, start, end - start), scenario)
        record.loaded = True
        record.state = "serving"

    def _assign(self, record: ServerRecord, span: Span, scenario: Scenario) -> None:
        record.start, record.end = span.start, span.end
        record.cache_tokens = self._cache_tokens(scenario, record, span.length)
        # never more sessions than the server's cache holds: a policy's slots (PETALS' fixed cache)
        # assume its own block count, which a moved or pinned span may exceed
        record.slots = min(span.slots, span.length * (record.cache_tokens // self.config.session_tokens))
        record.loaded, record.state = False, "loading"
        self._save_server(record)

    def _cache_tokens(self, scenario: Scenario, record: ServerRecord, blocks: int) -> int:
        """What the server's memory leaves after its weights, in tokens per block of its span."""
        free = record.memory_bytes - scenario.model.block_bytes * blocks
        per_token_block = 2 * scenario.model.d_kv * scenario.model.kv_bytes
        return max(0, int(free // (per_token_block * blocks)))

    def _mark_gone(self, record: ServerRecord, why: str) -> None:
        record.state, record.loaded = "gone", False
        record.last_seen = self.clock()
        self._save_server(record)
        self._changed()
        self.log.append(f"server {record.address} is gone ({why})")

    def suspect(self, address: str) -> None:
        """A client lost its connection to `address`. If the server also missed a heartbeat, it is
        gone now, not at the third miss: the repair starts sooner. (One client's word alone moves
        nothing: a server that reports on time is kept.)"""
        for record in self.members():
            if record.address == address and self.clock() - record.last_seen > SUSPECT_S:
                self._mark_gone(record, f"a client lost it and it missed a heartbeat "
                                        f"({self.clock() - record.last_seen:.1f} s silent)")

    def leave(self, server_id: str) -> None:
        record = self.servers.get(server_id)
        if record is not None and record.state != "gone":
            self._mark_gone(record, "left")

    def expire(self) -> None:
        """Servers that missed their heartbeats are gone; vanished clients' reservations are dropped."""
        now = self.clock()
        for record in list(self.servers.values()):
            if record.state != "gone" and now - record.last_seen > HEARTBEAT_S * MISSES:
                self._mark_gone(record, f"no heartbeat for {now - record.last_seen:.1f} s")
            elif record.state == "gone" and now - record.last_seen > GONE_KEPT_S:
                del self.servers[record.id]
                if self.store is not None:
                    self.store.delete("servers", record.id)
        for reservation in [r for r in self.reservations.values() if r.lease_until < now]:
            self.release(reservation.id, "its lease ran out (the client stopped asking)")

    def route(self, client: str, prompt_tokens: int, max_new_tokens: int, avoid: tuple[str, ...] = (),
              reservation_id: str | None = None, start: int = 0) -> tuple[Reservation, float]:
        """Choose and reserve a route (or, with `reservation_id` and `start`, the tail of one from
        block `start`, avoiding `avoid`); returns the reservation and when it may start."""
        length = prompt_tokens + max_new_tokens
        if length > self.config.session_tokens:
            raise TooLarge(f"{prompt_tokens} prompt + {max_new_tokens} new tokens exceed the {self.config.session_tokens} "
                           "tokens this swarm sizes a session's cache for (coordinator --session-tokens)")
        previous = self.reservations.get(reservation_id) if reservation_id else None
        if reservation_id and (previous is None or previous.client != client):
            why = self.ended.get(reservation_id, "never issued to this client") if previous is None else \
                "it belongs to another client"
            raise BadRequest(f"no such reservation for this client ({why}); ask for a new route")
        missing = self.missing()
        if missing and start == 0:
            raise Infeasible(f"the swarm does not cover the model: {missing}")
        request = Request(self.client_position(client), prompt_tokens, max_new_tokens)
        if previous is not None:
            self._drop_hops(previous, start)
        view = self.view()
        if avoid:
            view = self._without(view, set(avoid))
        try:
            decision = decide(self.routing, view, request, start)
        except Infeasible as exc:
            if previous is not None:  # it keeps its head: the client may ask again once blocks are back
                self._save_reservation(previous)
            raise Infeasible(f"no route from block {start}: {exc}") from None
        now = view.now
        if decision.start_s - now > self.config.hold_s:
            if previous is not None:
                self._save_reservation(previous)
            raise CacheFull(f"every route is full for the next {decision.start_s - now:.0f} s; retry later")
        if self.routing not in WAITING_ROUTERS and not has_room(view, decision.route):
            # a router that does not wait (PETALS') chose a route some server of which has no slot
            # left: the client backs off and asks again, as PETALS' clients (and the simulator) do
            if previous is not None:
                self._save_reservation(previous)
            raise CacheFull("the route's servers have no cache slot left for this session; retry in a moment")
        if start == 0:
            self.arrivals.append(now)
        members = self.members()
        timing = route_time(view.scenario, decision.route, request)
        hops = [[members[h.server].id, h.start, h.end] for h in decision.route.hops]
        if previous is not None:
            reservation = previous
            reservation.hops = [hop for hop in previous.hops if hop[1] < start] + hops
        else:
            reservation = Reservation(secrets.token_hex(8), client, hops, length, decision.start_s,
                                      decision.start_s + timing.completion_s, 0.0)
            self.reservations[reservation.id] = reservation
        reservation.lease_until = max(reservation.lease_until, now + 2 * (reservation.expected_end - now) + 60.0)
        self._add_load(reservation, hops)  # (the view above built the load it adds to)
        self._save_reservation(reservation)
        return reservation, decision.start_s

    def _save_reservation(self, reservation: Reservation) -> None:
        if self.store is not None:
            self.store.put("reservations", reservation.id, asdict(reservation))

    def _without(self, view: SwarmView, avoid: set[str]) -> SwarmView:
        members = self.members()
        spans = tuple(s for s in view.placement.spans
                      if members[s.server].address not in avoid and members[s.server].id not in avoid)
        placement = Placement(spans, view.placement.num_blocks)
        return SwarmView(view.scenario, placement, view.now, view.active, None, view.used, None)

    def _drop_hops(self, reservation: Reservation, start: int) -> None:
        """Forget the hops from block `start` on (a tail being replaced); the head keeps its slots."""
        self._remove_load(reservation, [hop for hop in reservation.hops if hop[1] >= start])
        reservation.hops = [hop for hop in reservation.hops if hop[1] < start]

    def release(self, reservation_id: str, why: str = "its client released it") -> bool:
        reservation = self.reservations.pop(reservation_id, None)
        if reservation is None:
            return False
        self.ended[reservation_id] = why
        if len(self.ended) > ENDED_KEPT:
            del self.ended[next(iter(self.ended))]
        if self.store is not None:
            self.store.delete("reservations", reservation_id)
        self._remove_load(reservation, reservation.hops)
        return True

    def tickets(self, reservation: Reservation) -> list[dict]:
        """Each hop's address, span, key and ticket, for the route reply."""
        expires = self.clock() + TICKET_S
        hops = []
        for server, start, end in reservation.hops:
            record = self.servers[server]
            ticket = Ticket(reservation.id, start, reservation.max_length, expires).mint(record.secret)
            hops.append({"address": record.address, "start": start, "end": end, "ticket": ticket,
                         "key": record.key})
        return hops

    def report_rtts(self, client: str, rtts: dict[str, float]) -> None:
        by_address = {r.address: r.id for r in self.members()}
        for address, rtt in rtts.items():
            server = by_address.get(address)
            if server is not None:
                self.rtts[(client, server)] = rtt
                if self.store is not None:
                    self.store.put("rtts", f"{client} {server}", rtt)
        self.client_position(client)
        if "memo" in self._cache:
            self._cache["memo"].clear()  # remembered routes were priced with the old RTTs
