"""The client: `DistributedModel` generates text through a chain of servers, as transformers does locally.

The client keeps the tokenizer, embeddings, final norm and LM head, and relays hidden states
hop by hop (hub and spoke). `InferenceSession` is the explicit step-by-step object; `generate`
is the loop most users want. Timings per token and per hop are kept for reports. When a server
fails mid-generation, its blocks move to other servers holding them and the session replays
what they had been sent, so generation goes on with the same output.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import zmq

from blockswarm.core.errors import (
    BadPeer, BadRequest, BlockswarmError, CacheFull, Infeasible, PeerGone, Refused, ServerError, Timeout,
    UnknownSession,
)
from blockswarm.model.sampling import SamplingParams, next_token
from blockswarm.runtime.chain import Hop, choose_chain, describe
from blockswarm.runtime.connection import Connection, client_context, fetch_info
from blockswarm.runtime.protocol import DTYPE_NAMES, DTYPES, ServerInfo

if TYPE_CHECKING:  # the head needs transformers (~5 s to import): loaded once servers have answered
    from blockswarm.model.head import ClientHead

log = logging.getLogger("blockswarm.client")


@dataclass
class HopTiming:
    address: str
    round_trip_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)  # request received to reply encoded, on the server

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
                 keys=None):
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
            leg.timing.compute_s.append(_seconds(header.get("compute_s")))
            leg.timing.server_s.append(_seconds(header.get("server_s"), leg.timing.compute_s[-1]))
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
            connection = self._connection_for(hop.address)
            self.legs.append(_Leg(hop, connection, HopTiming(hop.address), inputs))
            connection.open(hop.start, self.max_length, self._step_bytes)
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _seconds(value, default: float = 0.0) -> float:
    """A duration a server reported, for timings only: anything odd counts as the default."""
    return float(value) if isinstance(value, (int, float)) and 0 <= value < 86400 else default


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    chain: list[Hop]
    ttft_s: float
    token_latencies_s: list[float]  # per decoded token after the first
    hops: list[HopTiming]
    repairs: list[str] = field(default_factory=list)  # servers that failed mid-generation, and where their blocks went
    reopens: list[str] = field(default_factory=list)  # servers that lost the session and got it back

    @property
    def median_token_s(self) -> float:
        return statistics.median(self.token_latencies_s) if self.token_latencies_s else float("nan")


class DistributedModel:
    """Mirrors a transformers causal LM, but its blocks run on servers.

    A server that fails is dropped from `infos` for good; sessions then continue over the others
    (see `InferenceSession`) and new sessions start on a chain without it."""

    def __init__(self, head: ClientHead, infos: dict[str, ServerInfo], context: zmq.Context | None = None,
                 timeout_s: float = 60.0, keys=None):
        """`keys`: a private swarm's `security.ClientKeys` (None for an open swarm)."""
        self.head, self.infos = head, dict(infos)
        self._owns_context = context is None
        self.context = context or client_context()
        self.timeout_s = timeout_s
        self.keys = keys
        self._check_servers()
        self.chain = choose_chain(self.infos, head.num_blocks)
        self._lock = threading.Lock()  # sessions in several threads may report failures at once

    @classmethod
    def from_servers(cls, addresses: list[str], model: str = "smollm2", timeout_s: float = 60.0,
                     dtype: str = "float32", keys=None) -> "DistributedModel":
        """`dtype`: the servers' dtype (float32, float16 or bfloat16); the client's head runs in it too.
        `keys`: a private swarm's `security.ClientKeys`. Servers that do not answer, or answer
        nonsense, are skipped with a warning while the others cover the model."""
        if not addresses:
            raise BadRequest("give at least one server address (host:port)")
        if dtype not in DTYPES:
            raise BadRequest(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        context = client_context()
        try:
            infos, down = {}, {}  # asked before the model loads: a refusal or a dead swarm is said at once
            for address in addresses:
                try:
                    infos[address] = fetch_info(context, address, min(timeout_s, 10.0), keys)
                except (PeerGone, BadPeer, Refused) as exc:
                    down[address] = exc
            if not infos:
                kind = Refused if all(isinstance(e, Refused) for e in down.values()) else PeerGone
                raise kind("no server answers: " + "; ".join(map(str, down.values())))
            for reason in down.values():  # the others may still cover the model
                log.warning("skipping a server: %s", reason)
            from blockswarm.model.head import ClientHead

            head = ClientHead.load(model, dtype=DTYPES[dtype])
            try:
                built = cls(head, infos, context, timeout_s, keys)
            except Infeasible as exc:
                raise Infeasible(f"{exc}; not answering: {', '.join(down)}" if down else str(exc)) from None
        except BaseException:
            context.destroy(linger=0)
            raise
        built._owns_context = True
        return built

    def close(self) -> None:
        """Release the ZeroMQ context this model made (close its sessions first)."""
        if self._owns_context and not self.context.closed:
            self.context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_servers(self) -> None:
        dtype = DTYPE_NAMES[self.head.dtype]
        for address, info in self.infos.items():
            if info.model != self.head.fingerprint or info.num_blocks != self.head.num_blocks:
                raise BadRequest(f"{address} serves another model ({info.model}, {info.num_blocks} blocks) "
                                 f"than the client loaded ({self.head.fingerprint}, {self.head.num_blocks} blocks)")
            if info.dtype != dtype:
                raise BadRequest(f"{address} runs {info.dtype}; the client runs {dtype}")

    def session(self, max_length: int) -> InferenceSession:
        step_bytes = max_length * self.head.hidden_size * self.head.embed.weight.element_size()
        return InferenceSession(self.context, self.chain, max_length, self.timeout_s, reroute=self._reroute,
                                step_bytes=step_bytes, keys=self.keys)

    def _reroute(self, start: int, avoid: frozenset[str], gone: str | None) -> list[Hop]:
        """Forget a server that is gone; the best tail of a chain from block `start` over the
        servers left, less those the asking session avoids."""
        with self._lock:
            if gone is not None:
                self.infos.pop(gone, None)
                try:
                    self.chain = choose_chain(self.infos, self.head.num_blocks)
                except Infeasible:
                    pass  # the tail below may still exist; new sessions will report what is missing
            usable = {address: info for address, info in self.infos.items() if address not in avoid}
            return choose_chain(usable, self.head.num_blocks, start=start)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
                 chat_template: bool = True, stop_at_eos: bool = True,
                 on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens; on_token(token_id, text_so_far_delta) streams as tokens arrive."""
        ids = self.head.encode(prompt, chat_template) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        if max_new_tokens < 1:
            raise BadRequest("max_new_tokens must be at least 1")
        generator = sampling.generator()
        stops = self.head.stop_token_ids() if stop_at_eos else set()
        new, latencies, text = [], [], ""
        begin = time.perf_counter()
        with self.session(len(ids) + max_new_tokens) as session:
            inputs = torch.tensor([ids])
            ttft = 0.0
            for index in range(max_new_tokens):
                started = time.perf_counter()
                hidden = session.step(self.head.embed_tokens(inputs, session.position))
                token = next_token(self.head.logits(hidden[:, -1:])[0, -1], sampling, generator)
                if index == 0:
                    ttft = time.perf_counter() - begin
                else:
                    latencies.append(time.perf_counter() - started)
                new.append(token)
                if on_token is not None:
                    full = self._decode(new)
                    on_token(token, full[len(text):])
                    text = full
                if token in stops:
                    break
                inputs = torch.tensor([[token]])
            chain, hops = list(session.chain), list(session.timings)
            repairs, reopens = list(session.repairs), list(session.reopens)
        final = text if on_token is not None else self._decode(new)  # streaming already decoded it
        return GenerationResult(new, final, chain, ttft, latencies, hops, repairs, reopens)

    def _decode(self, ids: list[int]) -> str:
        if not self.head.has_tokenizer:  # token ids in, token ids out
            return ""
        return self.head.tokenizer.decode(ids, skip_special_tokens=True)
