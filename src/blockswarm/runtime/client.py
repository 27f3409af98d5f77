"""The client: `DistributedModel` generates text through a chain of servers, as transformers does locally.

The client keeps the tokenizer, embeddings, final norm and LM head, and relays hidden states
hop by hop (hub and spoke). `InferenceSession` (`inference.py`) is the explicit step-by-step
object, with its repairs; `generate` is the loop most users want. Timings per token and per hop
are kept for reports.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import zmq

from blockswarm.core.errors import BadPeer, BadRequest, Infeasible, PeerGone, Refused
from blockswarm.model.detokenize import IncrementalDecoder
from blockswarm.model.sampling import SamplingParams, next_token
from blockswarm.runtime import cooperative
from blockswarm.runtime.chain import Hop, choose_chain
from blockswarm.runtime.connection import client_context, fetch_info
from blockswarm.runtime.inference import HopTiming, InferenceSession
from blockswarm.runtime.protocol import DTYPE_NAMES, DTYPES, ServerInfo

if TYPE_CHECKING:  # the head needs transformers (~5 s to import): loaded once servers have answered
    from blockswarm.model.head import ClientHead

log = logging.getLogger("blockswarm.client")
# The LM head's multiply-adds per token above which a generation on an event loop (the API) picks
# its tokens in a thread (`cooperative.offload`): ~64 M is several ms on a CPU core, far more than
# the hand-off costs, and would hold up every other stream. SmolLM2's head (28 M) runs inline.
OFFLOAD_HEAD_MACS = 1 << 26


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


@dataclass(frozen=True)
class Streamed:
    """One new token: its id, the text it completes ('' while a character is incomplete), whether
    it ends the generation (an end-of-sequence token), and the session it came through."""

    token: int
    text: str
    last: bool
    session: InferenceSession


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
        self.coordinator = None  # set by from_coordinator
        self._check_servers()
        self.chain = choose_chain(self.infos, head.num_blocks) if self.infos else []  # (coordinated: per session)
        self._lock = threading.Lock()  # sessions in several threads may report failures at once
        self._no_chain = ""  # why there is no chain for new sessions, once failures left a gap
        self.offload_head_macs = OFFLOAD_HEAD_MACS

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
        if self.coordinator is not None:
            self.coordinator.stop()
        if self._owns_context and not self.context.closed:
            self.context.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_servers(self) -> None:
        for address, info in self.infos.items():
            self._check_server(address, info)

    def _check_server(self, address: str, info: ServerInfo) -> None:
        dtype = DTYPE_NAMES[self.head.dtype]
        if info.model != self.head.fingerprint or info.num_blocks != self.head.num_blocks:
            raise BadRequest(f"{address} serves another model ({info.model}, {info.num_blocks} blocks) "
                             f"than the client loaded ({self.head.fingerprint}, {self.head.num_blocks} blocks)")
        if info.dtype != dtype:
            raise BadRequest(f"{address} runs {info.dtype}; the client runs {dtype}")

    def readmit(self, address: str, info: ServerInfo) -> bool:
        """Take back a server that answers again after it was dropped (it restarted, or it was only
        slow), so a long-lived client such as the API recovers; True if the chain for new sessions
        changed. A server of another model is refused with BadRequest."""
        self._check_server(address, info)
        with self._lock:
            known = self.infos.get(address)
            if known is not None and (known.start, known.end) == (info.start, info.end):
                return False
            self.infos[address] = info
            try:
                chain = choose_chain(self.infos, self.head.num_blocks)
            except Infeasible:
                return False  # still a gap: new sessions will say what is missing
            changed, self.chain = chain != self.chain, chain
            return changed

    @classmethod
    def from_coordinator(cls, address: str, model: str = "smollm2", timeout_s: float = 60.0,
                         dtype: str = "float32", keys=None, wait_s: float = 120.0,
                         on_wait: Callable[[str], None] | None = None, source: str | None = None) -> DistributedModel:
        """A model whose sessions each get their route from the coordinator at `address`. Waits up
        to `wait_s` until the swarm covers the model (`on_wait` hears what it waits for).
        `source`: the local address its connections leave from (an emulated host on the testbed)."""
        from blockswarm.runtime.coordinated import connect

        return connect(cls, address, model, timeout_s, dtype, keys, wait_s, on_wait, source)

    def session(self, max_length: int, prompt_tokens: int | None = None) -> InferenceSession:
        """A session for `max_length` tokens (`prompt_tokens` of them the prompt: a coordinator
        plans with it; a client without one ignores it)."""
        if not self.chain:
            raise Infeasible(f"the servers left do not cover the model: {self._no_chain}")
        step_bytes = max_length * self.head.hidden_size * self.head.dtype.itemsize
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
                except Infeasible as exc:  # the tail below may still exist; new sessions fail at once
                    self.chain, self._no_chain = [], str(exc)
            usable = {address: info for address, info in self.infos.items() if address not in avoid}
            return choose_chain(usable, self.head.num_blocks, start=start)

    def stream(self, prompt: str | list[int], max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
               chat_template: bool = True, stop_at_eos: bool = True) -> Iterator[Streamed]:
        """New tokens one by one as they are generated, each with the text it completes. Closing the
        iterator early (or breaking out of a loop over it) closes the sessions at once."""
        ids = self.head.encode(prompt, chat_template) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        if max_new_tokens < 1:
            raise BadRequest("max_new_tokens must be at least 1")
        generator = sampling.generator()
        stops = self.head.stop_token_ids() if stop_at_eos else set()
        decoder = IncrementalDecoder(self.head.tokenizer if self.head.has_tokenizer else None)

        def choose(hidden: torch.Tensor) -> int:
            return next_token(self.head.logits(hidden[:, -1:])[0, -1], sampling, generator)

        heavy = self.head.hidden_size * int(self.head.config.vocab_size) >= self.offload_head_macs
        with self.session(len(ids) + max_new_tokens, prompt_tokens=len(ids)) as session:
            inputs = torch.tensor([ids])
            for _ in range(max_new_tokens):
                hidden = session.step(self.head.embed_tokens(inputs, session.position))
                token = cooperative.offload(choose, hidden) if heavy else choose(hidden)
                yield Streamed(token, decoder.add(token), token in stops, session)
                if token in stops:
                    return
                inputs = torch.tensor([[token]])

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, sampling: SamplingParams = SamplingParams(),
                 chat_template: bool = True, stop_at_eos: bool = True,
                 on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
        """Generate up to max_new_tokens; on_token(token_id, text_delta) streams as tokens arrive."""
        new, latencies, ttft = [], [], 0.0
        begin = last = time.perf_counter()
        stream = self.stream(prompt, max_new_tokens, sampling, chat_template, stop_at_eos)
        try:
            for streamed in stream:
                now = time.perf_counter()
                if new:
                    latencies.append(now - last)
                else:
                    ttft = now - begin
                new.append(streamed.token)
                if on_token is not None:
                    on_token(streamed.token, streamed.text)
                last = time.perf_counter()  # (the callback's own time is not the swarm's)
                if streamed.last or len(new) == max_new_tokens:
                    session = streamed.session  # read before the sessions close, which empties them
                    result = GenerationResult(new, self._decode(new), list(session.chain), ttft, latencies,
                                              list(session.timings), list(session.repairs), list(session.reopens))
                    break
        finally:
            stream.close()
        return result

    def _decode(self, ids: list[int]) -> str:
        if not self.head.has_tokenizer:  # token ids in, token ids out
            return ""
        return self.head.tokenizer.decode(ids, skip_special_tokens=True)
