"""One generation's sessions along a chain of servers, and how it repairs itself when one fails.

`InferenceSession` holds a session on every hop (each a `_Leg`: where, its connection, its
timings, every input it was sent) and relays hidden states through them. When a server fails
mid-generation, the hops from it on are replaced or reopened and the inputs they had been sent
are replayed exactly, so generation goes on with the same output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from blockswarm.core.errors import (
    BadPeer, BadRequest, BlockswarmError, CacheFull, Infeasible, PeerGone, ServerError, Timeout, UnknownSession,
)
from blockswarm.runtime.chain import Hop, describe
from blockswarm.runtime.connection import Connection, fetch_info
from blockswarm.runtime.protocol import duration


@dataclass
class HopTiming:
    address: str
    round_trip_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)  # request received to reply encoded, on the server
    host_s: list[float] = field(default_factory=list)  # an emulating server's own (real) compute; else compute_s
    open_s: float = 0.0  # connecting (handshake) and opening the session, before any replay

    @property
    def overhead_s(self) -> list[float]:
        """Time on the wire and in (de)serialization: round trip minus the server's compute time."""
        return [rt - c for rt, c in zip(self.round_trip_s, self.compute_s)]

    @property
    def server_overhead_s(self) -> list[float]:
        """The server's part of the overhead: decoding, checking and encoding around the compute."""
        return [s - c for s, c in zip(self.server_s, self.compute_s)]


# (first block of the failed hop, servers this session avoids, a server gone for good or None) -> new tail
Reroute = Callable[[int, frozenset[str], str | None], list[Hop]]
# failures a session repairs: a server gone or silent, one without cache room, one that lost the
# session (restart, idle expiry, a failed step), one that answered nonsense
REPAIRABLE = (PeerGone, Timeout, CacheFull, UnknownSession, ServerError, BadPeer)
PROBE_TIMEOUT_S = 1.0  # a server that does not answer `info` this fast after failing a step is gone
MAX_REOPENS_PER_SERVER = 2  # a server that keeps losing a session is passed over for it


@dataclass
class _Leg:
    """One hop of a session: where it runs, its connection, its timings, and every input it was
    sent, step by step (the hidden states entering block `hop.start`)."""

    hop: Hop
    connection: Connection
    timing: HopTiming
    sent: list[torch.Tensor]


class InferenceSession:
    """One generation's sessions on every hop of a chain; `step` runs new tokens' hidden states through all.

    Every hop's inputs are kept, step by step. When a server fails, the session repairs itself
    and the step goes on:
    - gone (its connection dropped and `info` no longer answers) or misbehaving (a malformed,
      NaN or Inf reply, an internal error): its blocks move to a new tail of the chain from its
      first block (`reroute`), and the model forgets it for new sessions;
    - silent (a timeout) but still answering `info`: suspect, not dead; this session moves away;
    - no cache room: this session moves away; it is busy, not gone;
    - it lost the session (it restarted, expired the session while idle, or failed a step) but
      answers: the session is reopened there. These reopenings are counted apart (`reopens`).
    Only hops that changed are opened anew, and the inputs they had been sent are replayed into
    them exactly as first sent, so their caches (and hence every later token) are bit for bit
    what they would have been. A session never moves back onto a server that failed it, and
    gives up after `max_repairs` moves (by default twice the chain's hops, plus two), saying so."""

    def __init__(self, context: zmq.Context, chain: list[Hop], max_length: int, timeout_s: float = 60.0,
                 reroute: Reroute | None = None, max_repairs: int | None = None, step_bytes: int = 2**26,
                 keys=None, on_close: Callable[[], None] | None = None):
        """`on_close`: called once when the session closes (a coordinated client releases its reservation)."""
        self.max_length = max_length
        self.legs: list[_Leg] = []
        self.repairs: list[str] = []  # servers that failed or were full, and where their blocks went
        self.reopens: list[str] = []  # servers that lost the session and got it back, replayed
        self.position = 0
        self._context, self._timeout_s, self._keys = context, timeout_s, keys
        self._step_bytes = step_bytes
        self._reroute = reroute
        self._max_repairs = max_repairs if max_repairs is not None else 2 * len(chain) + 2
        self._avoid: set[str] = set()  # servers that failed this session or had no cache room for it
        self._reopened: dict[str, int] = {}
        self._spare: list[_Leg] = []  # legs taken out of the chain during a repair, reusable until it ends
        self._on_close = on_close
        try:
            try:
                self._splice(0, chain)
            except REPAIRABLE as failure:
                self._recover(len(self.legs) - 1, failure)
        except BaseException:
            self.close()
            raise

    @property
    def chain(self) -> list[Hop]:
        return [leg.hop for leg in self.legs]

    @property
    def timings(self) -> list[HopTiming]:
        return [leg.timing for leg in self.legs]

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (1, n_new, d) entering block 0 -> (1, n_new, d) leaving the last block."""
        index = 0
        while index < len(self.legs):
            leg = self.legs[index]
            begin = time.perf_counter()
            try:
                header, out = leg.connection.step(hidden)
            except REPAIRABLE as failure:
                self._recover(index, failure)
                continue  # the same step, on the hop that replaced the failed one
            leg.timing.round_trip_s.append(time.perf_counter() - begin)
            leg.timing.compute_s.append(_seconds(header, "compute_s"))
            leg.timing.server_s.append(_seconds(header, "server_s", leg.timing.compute_s[-1]))
            leg.timing.host_s.append(_seconds(header, "host_s", leg.timing.compute_s[-1]))
            leg.sent.append(hidden)
            hidden = out
            index += 1
        self.position += hidden.shape[1]
        return hidden

    def _recover(self, index: int, failure: BlockswarmError) -> None:
        """Rebuild the chain from the failed hop at `index` on, or raise why it cannot be."""
        while True:
            tail = self._repair_plan(index, failure)
            try:
                self._splice(index, tail)
                return
            except REPAIRABLE as again:
                index, failure = len(self.legs) - 1, again

    def _repair_plan(self, index: int, failure: BlockswarmError) -> list[Hop]:
        """What replaces the chain from `index` on, after `failure` there; records why."""
        leg = self.legs[index]
        failed = leg.hop
        steps = len(leg.sent)
        if isinstance(failure, (PeerGone, Timeout)):
            failure = self._probe(failed.address, failure)
        if isinstance(failure, (UnknownSession, ServerError)) and \
                self._reopened.get(failed.address, 0) < MAX_REOPENS_PER_SERVER:
            self._reopened[failed.address] = self._reopened.get(failed.address, 0) + 1
            self.reopens.append(f"{failed.address} no longer had the session ({failure}); reopened there, "
                                f"{steps} step(s) replayed")
            leg.connection.token = None  # the server forgot it: nothing to close
            self._spare.append(self.legs.pop(index))  # its connection is reused by the new session
            return [failed] + self.chain[index:]
        if self._reroute is None:
            raise failure
        if len(self.repairs) >= self._max_repairs:
            raise type(failure)(f"{failure}; gave up: this session already moved {len(self.repairs)} times, the cap "
                                f"for its chain (max_repairs={self._max_repairs})") from None
        full = isinstance(failure, CacheFull)
        gone = isinstance(failure, (PeerGone, BadPeer))
        self._avoid.add(failed.address)
        try:
            tail = self._reroute(failed.start, frozenset(self._avoid), failed.address if gone else None)
        except Infeasible as exc:
            if full:
                raise CacheFull(f"{failure}; no other server holding blocks {failed.start} on has room now; "
                                "retry later") from None
            raise PeerGone(f"{failure}; no other chain is left for blocks {failed.start} on "
                           f"(servers passed over by this session: {', '.join(sorted(self._avoid))}; {exc})") from None
        why = {CacheFull: "had no cache room", BadPeer: "misbehaved", Timeout: "did not answer in time"}
        self.repairs.append(f"{failed.address} {why.get(type(failure), 'failed')} ({failure}); blocks from "
                            f"{failed.start} on moved to {describe(tail)}, {steps} step(s) replayed")
        dropped = self.legs.pop(index)
        if gone:
            dropped.connection.token = None  # no goodbye to a server that is gone
        self._spare.append(dropped)
        return tail

    def _probe(self, address: str, failure: BlockswarmError) -> BlockswarmError:
        """A server that dropped a step's connection or let it time out: still there? One that
        answers `info` lost the session (it restarted) or is slow; one that does not is gone."""
        try:
            fetch_info(self._context, address, PROBE_TIMEOUT_S, self._keys)
        except BlockswarmError:
            return failure if isinstance(failure, PeerGone) else PeerGone(f"{failure}, and it no longer answers")
        if isinstance(failure, PeerGone):
            return UnknownSession(f"its connection dropped but it answers again (restarted?): {failure}")
        return failure  # slow but alive: suspect, avoided by this session only

    def _splice(self, index: int, hops: list[Hop]) -> None:
        """Make `hops` the chain from position `index` on. A hop this session already has a live
        session on (taken out of the chain by this repair) keeps it; every other hop is opened and
        the inputs that reach its first block are replayed into it. Raises a REPAIRABLE failure if
        a hop fails; the failed hop is then the last one in the chain."""
        self._spare.extend(self.legs[index:])
        del self.legs[index:]
        carried = None  # outputs of the last replay: the inputs of the next hop, if it is new
        for hop in hops:
            reused = next((leg for leg in self._spare if leg.hop == hop and leg.connection.token), None)
            if reused is not None:
                self._spare.remove(reused)
                self.legs.append(reused)
                carried = None
                continue
            inputs = next((leg.sent for leg in [*self._spare, *self.legs] if leg.hop.start == hop.start), None)
            inputs = list(inputs if inputs is not None else carried or [])
            begin = time.perf_counter()
            connection = self._connection_for(hop.address)
            timing = HopTiming(hop.address)
            self.legs.append(_Leg(hop, connection, timing, inputs))
            connection.open(hop.start, self.max_length, self._step_bytes, hop.ticket)
            timing.open_s = time.perf_counter() - begin
            carried = connection.replay(inputs) if inputs else []
        for leg in self._spare:  # hops this session left: free their cache now, not at expiry
            self._close_leg(leg)
        self._spare.clear()

    def _connection_for(self, address: str) -> Connection:
        """A spare leg's connection to `address` whose session is gone is reused (no new sockets)."""
        for leg in self._spare:
            if leg.hop.address == address and leg.connection.token is None and not leg.connection.closed:
                self._spare.remove(leg)
                return leg.connection
        return Connection(self._context, address, self._timeout_s, keys=self._keys)

    @staticmethod
    def _close_leg(leg: _Leg) -> None:
        leg.connection.close_session()
        leg.connection.close()

    def close(self) -> None:
        for leg in [*self.legs, *self._spare]:
            self._close_leg(leg)
        self.legs.clear()
        self._spare.clear()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _seconds(header: dict, name: str, default: float = 0.0) -> float:
    """A duration a server reported, for timings only: anything odd counts as the default."""
    try:
        return duration(header, name)
    except BadRequest:
        return default
