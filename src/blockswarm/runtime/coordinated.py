"""A client in a coordinated swarm: every session asks the coordinator for its route.

`DistributedModel.from_coordinator` waits until the swarm covers the model, loads the model's
head, and returns a model whose `session` asks the coordinator for a route (giving the prompt
length and the most new tokens), opens each hop with the ticket the coordinator issued, asks it
for the tail of the route when a hop fails (reporting the server), and releases the reservation
when the session ends. In the background it measures its round trip to each server the
coordinator lists (one `info` each) and reports them, so the coordinator routes by distance too.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, Infeasible
from blockswarm.runtime import cooperative
from blockswarm.runtime.chain import Hop
from blockswarm.runtime.connection import Connection, client_context
from blockswarm.runtime.coordinator.link import CoordinatorLink
from blockswarm.runtime.inference import InferenceSession
from blockswarm.runtime.protocol import DTYPES

log = logging.getLogger("blockswarm.client")
ROUTE_WAIT_S = 60.0  # a route request may be held while its route's cache frees up (coordinator --hold)
RTT_EVERY_S = 60.0  # servers not measured yet are measured this often
RTT_PER_ROUND = 64


def connect(cls, address: str, model: str, timeout_s: float, dtype: str, keys, wait_s: float, on_wait,
            source: str | None = None):
    if dtype not in DTYPES:
        raise BadRequest(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    context = client_context(source)
    try:
        link = CoordinatorLink(context, address, keys)
        client = secrets.token_hex(8)
        hello = _wait_for_coverage(link, client, wait_s, on_wait)
        from blockswarm.model.head import ClientHead

        head = ClientHead.load(model, dtype=DTYPES[dtype])
        shape = hello["shape"]
        if shape["fingerprint"] != head.fingerprint or shape["num_blocks"] != head.num_blocks:
            raise BadRequest(f"the swarm at {address} serves another model ({shape['fingerprint']}, "
                             f"{shape['num_blocks']} blocks) than the client loaded ({head.fingerprint})")
        if shape["dtype"] != dtype:
            raise BadRequest(f"the swarm runs {shape['dtype']}; the client runs {dtype} (pass --dtype {shape['dtype']})")
        built = cls(head, {}, context, timeout_s, keys)
        built.coordinator = Coordinated(context, address, keys, client, hello["session_tokens"], wait_s)
        built.coordinator.learn_keys(hello.get("keys") or {})
        built.session = built.coordinator.bind(built)
        built.coordinator.start_measuring(hello["servers"])
        link.close()
    except BaseException:
        context.destroy(linger=0)
        raise
    built._owns_context = True
    return built


def _wait_for_coverage(link: CoordinatorLink, client: str, wait_s: float, on_wait) -> dict:
    deadline = time.monotonic() + wait_s
    said = None
    while True:
        hello = link.call("hello", client=client, timeout_s=max(1.0, min(10.0, deadline - time.monotonic())))
        missing = hello.get("missing")
        if missing is None:
            return hello
        if time.monotonic() >= deadline:
            raise Infeasible(f"the swarm at {link.address} does not cover the model after {wait_s:g} s: {missing}")
        if on_wait is not None and missing != said:
            on_wait(f"waiting for the swarm to cover the model ({missing}; up to {wait_s:g} s)")
            said = missing
        time.sleep(0.5)


class Coordinated:
    """The client's side of the coordinator: routes per session, tails on failure, RTT reports."""

    def __init__(self, context, address: str, keys, client: str, session_tokens: int, wait_s: float):
        self.context, self.address, self.keys, self.client = context, address, keys, client
        self.session_tokens, self.wait_s = session_tokens, wait_s
        self._stop = threading.Event()
        self._measured: dict[str, float] = {}

    def bind(self, model):
        """The model's `session`, routed by the coordinator."""

        def session(max_length: int, prompt_tokens: int | None = None) -> InferenceSession:
            prompt = prompt_tokens if prompt_tokens is not None else max(1, max_length // 2)
            link = CoordinatorLink(self.context, self.address, self.keys)  # one per session: sessions run in threads
            try:
                reply = link.call("route", timeout_s=ROUTE_WAIT_S + 10, client=self.client, prompt_tokens=prompt,
                                  max_new_tokens=max(1, max_length - prompt))
            except BaseException:
                link.close()
                raise
            reservation = reply["reservation"]
            chain = self._hops(reply)

            def reroute(start: int, avoid: frozenset[str], gone: str | None) -> list[Hop]:
                """The tail from block `start`. When no server holds some of its blocks, the
                coordinator may be moving an idle server onto them (once it sees the failed one
                gone): wait for that, up to the model's `wait_s`."""
                deadline = time.monotonic() + self.wait_s
                while True:
                    try:
                        extra = {"gone": gone} if gone else {}
                        tail = link.call("route", timeout_s=ROUTE_WAIT_S + 10, client=self.client,
                                         prompt_tokens=prompt, max_new_tokens=max(1, max_length - prompt),
                                         reservation=reservation, start=start,
                                         avoid=sorted(avoid | ({gone} if gone else set())), **extra)
                        return self._hops(tail)
                    except Infeasible:
                        if time.monotonic() >= deadline:
                            raise
                        cooperative.sleep(0.5)

            released = []

            def release() -> None:
                if released:  # (a session that failed while opening is closed, then released by us)
                    return
                released.append(True)
                try:
                    link.call("release", timeout_s=2.0, client=self.client, reservation=reservation)
                except (BlockswarmError, zmq.ZMQError) as exc:  # (the context may be closing)
                    log.warning("could not release a reservation (its lease will): %s", exc)
                finally:
                    link.close()

            step_bytes = max_length * model.head.hidden_size * model.head.dtype.itemsize
            try:
                return InferenceSession(self.context, chain, max_length, model.timeout_s, reroute=reroute,
                                        step_bytes=step_bytes, keys=self.keys, on_close=release)
            except BaseException:
                release()
                raise

        return session

    def learn_keys(self, keys: dict) -> None:
        """Servers' public keys, as the coordinator (which authenticated them) hands them out."""
        if self.keys is not None:
            for address, key in keys.items():
                if isinstance(address, str) and isinstance(key, str):
                    self.keys.servers.setdefault(address, key.encode())

    def _hops(self, reply: dict) -> list[Hop]:
        hops = reply.get("hops")
        if not isinstance(hops, list) or not hops:
            raise BadRequest("the coordinator answered a route without hops")
        chain = []
        for hop in hops:
            if self.keys is not None and isinstance(hop.get("key"), str):
                self.keys.servers.setdefault(hop["address"], hop["key"].encode())
            chain.append(Hop(str(hop["address"]), int(hop["start"]), int(hop["end"]), hop.get("ticket")))
        return chain

    def start_measuring(self, servers: list[str]) -> None:
        threading.Thread(target=self._measure, args=(list(servers),), name="rtt", daemon=True).start()

    def _measure(self, servers: list[str]) -> None:
        """One `info` round trip per server not measured yet, reported to the coordinator."""
        link = None
        try:
            while not self._stop.is_set():
                todo = [s for s in servers if s not in self._measured][:RTT_PER_ROUND]
                report = {}
                for address in todo:
                    rtt = _round_trip(self.context, address, self.keys)
                    if rtt is not None:
                        report[address] = self._measured[address] = rtt
                if link is None:
                    link = CoordinatorLink(self.context, self.address, self.keys)
                if report:
                    link.call("rtts", client=self.client, rtts=report)
                if self._stop.wait(RTT_EVERY_S):
                    break
                hello = link.call("hello", client=self.client)
                self.learn_keys(hello.get("keys") or {})
                servers = hello.get("servers", servers)
        except Exception as exc:  # the context closed under it, or the coordinator went away: measuring is optional
            log.debug("RTT measuring stopped: %s", exc)
        finally:
            if link is not None and not self.context.closed:
                link.close()

    def stop(self) -> None:
        self._stop.set()


def _round_trip(context, address: str, keys) -> float | None:
    """The second of two `info` round trips on one connection (the first also pays for connecting),
    less the time the server reports holding it."""
    connection = Connection(context, address, 2.0, keys=keys)
    try:
        connection.request("info")
        begin = time.perf_counter()
        header, _ = connection.request("info")
        elapsed = time.perf_counter() - begin
        held = header.get("server_s")
        return max(1e-6, elapsed - held) if isinstance(held, float) and 0 <= held < elapsed else elapsed
    except BlockswarmError:
        return None
    finally:
        connection.close()
