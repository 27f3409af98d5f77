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
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from blockswarm.core.errors import (
    BadRequest, BlockswarmError, CacheFull, Infeasible, PeerGone, Timeout, UnknownSession,
)
from blockswarm.model.head import ClientHead
from blockswarm.model.sampling import SamplingParams, next_token
from blockswarm.runtime.chain import Hop, choose_chain, describe
from blockswarm.runtime.connection import Connection, client_context, fetch_info
from blockswarm.runtime.protocol import DTYPE_NAMES, ServerInfo

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
# failures a session repairs: a server gone or silent, one without cache room, one that lost the session
REPAIRABLE = (PeerGone, Timeout, CacheFull, UnknownSession)


class InferenceSession:
    """One generation's sessions on every hop of a chain; `step` runs new tokens' hidden states through all.

    Every hop's inputs are kept, step by step. When a server dies or stops answering and the
    session can `reroute`, the hops from the failed one on are replaced by a new tail of the chain
    and those inputs are replayed into it exactly as first sent, so the caches (and hence every
    later token) are bit for bit what they would have been; the step then goes on."""

    def __init__(self, context: zmq.Context, chain: list[Hop], max_length: int, timeout_s: float = 60.0,
                 reroute: Reroute | None = None, max_repairs: int = 3):
        self.max_length = max_length
        self.session_id = uuid.uuid4().hex
        self.chain: list[Hop] = []
        self.connections: list[Connection] = []
        self.timings: list[HopTiming] = []
        self.sent: list[list[torch.Tensor]] = []  # per hop: the hidden states it was sent, step by step
        self.repairs: list[str] = []  # what failed and where its blocks went, for the report
        self.position = 0
        self._context, self._timeout_s = context, timeout_s
        self._reroute, self._max_repairs = reroute, max_repairs
        self._avoid: set[str] = set()  # servers that failed this session or had no cache room for it
        self._step_id = 0
        try:
            try:
                self._attach(0, chain, replay=[])
            except REPAIRABLE as failure:
                self._recover(len(self.chain) - 1, failure)
        except BaseException:
            self.close()
            raise

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (1, n_new, d) entering block 0 -> (1, n_new, d) leaving the last block."""
        self._step_id += 1
        index = 0
        while index < len(self.chain):
            connection, timing = self.connections[index], self.timings[index]
            begin = time.perf_counter()
            try:
                header, out = connection.request("step", (hidden,), session=self.session_id, step=self._step_id)
            except REPAIRABLE as failure:
                self._recover(index, failure)
                continue  # the same step, on the hop that replaced the failed one
            timing.round_trip_s.append(time.perf_counter() - begin)
            timing.compute_s.append(float(header.get("compute_s", 0.0)))
            timing.server_s.append(float(header.get("server_s", timing.compute_s[-1])))
            if len(out) != 1 or out[0].shape != hidden.shape:
                raise BadRequest(f"{connection.address} answered a step with a malformed tensor")
            self.sent[index].append(hidden)
            hidden = out[0]
            index += 1
        self.position += hidden.shape[1]
        return hidden

    def _attach(self, index: int, hops: list[Hop], replay: list[torch.Tensor]) -> None:
        """Make `hops` the chain from position `index` on: open their sessions and replay into
        them what that part of the chain was sent so far. Raises a REPAIRABLE failure if a hop
        fails; the failed hop is then the last one in the chain."""
        self._drop_from(index)
        for hop in hops:
            self.chain.append(hop)
            self.connections.append(Connection(self._context, hop.address, self._timeout_s))
            self.timings.append(HopTiming(hop.address))
            self.sent.append(list(replay))  # its own list: later steps are appended per hop
            connection = self.connections[-1]
            connection.request("open", session=self.session_id, start=hop.start, end=hop.end,
                               max_length=self.max_length)
            if replay:
                replay = connection.replay(replay, session=self.session_id)

    def _recover(self, index: int, failure: BlockswarmError) -> None:
        """Rebuild the chain from the failed hop at `index` on, or re-raise the failure. A server
        that is gone is replaced (and forgotten), one with no cache room for the session is
        avoided by it, and one that answers but no longer knows the session (it restarted, or the
        session sat idle past its timeout) gets the session back, replayed."""
        while True:
            failed = self.chain[index]
            if len(self.repairs) >= self._max_repairs:
                raise failure
            if isinstance(failure, UnknownSession):
                tail = self.chain[index:]
                self.repairs.append(f"{failed.address} no longer had the session ({failure}); reopened from there, "
                                    f"{len(self.sent[index])} step(s) replayed")
            else:
                if self._reroute is None:
                    raise failure
                full = isinstance(failure, CacheFull)
                self._avoid.add(failed.address)
                try:
                    tail = self._reroute(failed.start, frozenset(self._avoid), None if full else failed.address)
                except Infeasible as exc:
                    if full:
                        raise CacheFull(f"{failure}; no other server holding blocks {failed.start} on has room now; "
                                        "retry later") from None
                    raise PeerGone(f"{failure}; no other chain is left for blocks {failed.start} on ({exc})") from None
                self.repairs.append(
                    f"{failed.address} {'had no cache room' if full else 'failed'} ({failure}); "
                    f"blocks from {failed.start} on moved to {describe(tail)}, "
                    f"{len(self.sent[index])} step(s) replayed")
                self.connections[index].close()  # no goodbye to a server that is gone
            try:
                self._attach(index, tail, replay=self.sent[index])
                return
            except REPAIRABLE as again:
                index, failure = len(self.chain) - 1, again

    def _drop_from(self, index: int) -> None:
        for connection in self.connections[index:]:
            self._close_one(connection)
        del self.chain[index:], self.connections[index:], self.timings[index:], self.sent[index:]

    def _close_one(self, connection: Connection) -> None:
        if connection.closed:
            return
        try:
            connection.request("close", session=self.session_id, timeout_s=2.0)
        except Exception:  # closing is best effort; idle sessions expire on the server anyway
            pass
        connection.close()

    def close(self) -> None:
        self._drop_from(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    chain: list[Hop]
    ttft_s: float
    token_latencies_s: list[float]  # per decoded token after the first
    hops: list[HopTiming]
    repairs: list[str] = field(default_factory=list)  # servers that failed mid-generation, and where their blocks went

    @property
    def median_token_s(self) -> float:
        return statistics.median(self.token_latencies_s) if self.token_latencies_s else float("nan")


class DistributedModel:
    """Mirrors a transformers causal LM, but its blocks run on servers.

    A server that fails is dropped from `infos` for good; sessions then continue over the others
    (see `InferenceSession`) and new sessions start on a chain without it."""

    def __init__(self, head: ClientHead, infos: dict[str, ServerInfo], context: zmq.Context | None = None,
                 timeout_s: float = 60.0):
        self.head, self.infos = head, dict(infos)
        self._owns_context = context is None
        self.context = context or client_context()
        self.timeout_s = timeout_s
        self._check_servers()
        self.chain = choose_chain(self.infos, head.num_blocks)
        self._lock = threading.Lock()  # sessions in several threads may report failures at once

    @classmethod
    def from_servers(cls, addresses: list[str], model: str = "smollm2", timeout_s: float = 60.0) -> "DistributedModel":
        if not addresses:
            raise BadRequest("give at least one server address (host:port)")
        head = ClientHead.load(model)
        context = client_context()
        try:
            infos, down = {}, {}
            for address in addresses:
                try:
                    infos[address] = fetch_info(context, address)
                except PeerGone as exc:
                    down[address] = str(exc)
            if not infos:
                raise PeerGone("no server answers: " + "; ".join(down.values()))
            for reason in down.values():  # the others may still cover the model
                log.warning("skipping a server: %s", reason)
            try:
                built = cls(head, infos, context, timeout_s)
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
        return InferenceSession(self.context, self.chain, max_length, self.timeout_s, reroute=self._reroute)

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
            chain, hops, repairs = list(session.chain), list(session.timings), list(session.repairs)
        final = text if on_token is not None else self._decode(new)  # streaming already decoded it
        return GenerationResult(new, final, chain, ttft, latencies, hops, repairs)

    def _decode(self, ids: list[int]) -> str:
        if not self.head.has_tokenizer:  # token ids in, token ids out
            return ""
        return self.head.tokenizer.decode(ids, skip_special_tokens=True)
