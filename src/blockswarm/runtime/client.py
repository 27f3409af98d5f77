"""The client: `DistributedModel` generates text through a chain of servers, as transformers does locally.

The client keeps the tokenizer, embeddings, final norm and LM head, and relays hidden states
hop by hop (hub and spoke). `InferenceSession` is the explicit step-by-step object; `generate`
is the loop most users want. Timings per token and per hop are kept for reports.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from blockswarm.core.errors import BadRequest
from blockswarm.model.head import ClientHead
from blockswarm.model.sampling import SamplingParams, next_token
from blockswarm.runtime.chain import Hop, choose_chain
from blockswarm.runtime.connection import Connection, fetch_info
from blockswarm.runtime.protocol import DTYPE_NAMES, ServerInfo


@dataclass
class HopTiming:
    address: str
    round_trip_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)

    @property
    def overhead_s(self) -> list[float]:
        """Time on the wire and in (de)serialization: round trip minus the server's compute time."""
        return [rt - c for rt, c in zip(self.round_trip_s, self.compute_s)]


class InferenceSession:
    """One generation's sessions on every hop of a chain; `step` runs new tokens' hidden states through all."""

    def __init__(self, context: zmq.Context, chain: list[Hop], max_length: int, timeout_s: float = 60.0):
        self.chain, self.max_length = chain, max_length
        self.session_id = uuid.uuid4().hex
        self.connections: list[Connection] = []
        self.timings = [HopTiming(hop.address) for hop in chain]
        self.position = 0
        self._step_id = 0
        try:
            for hop in chain:
                connection = Connection(context, hop.address, timeout_s)
                self.connections.append(connection)
                connection.request("open", session=self.session_id, start=hop.start, end=hop.end,
                                   max_length=max_length)
        except BaseException:
            self.close()
            raise

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (1, n_new, d) entering block 0 -> (1, n_new, d) leaving the last block."""
        self._step_id += 1
        for connection, timing in zip(self.connections, self.timings):
            begin = time.perf_counter()
            header, out = connection.request("step", (hidden,), session=self.session_id, step=self._step_id)
            timing.round_trip_s.append(time.perf_counter() - begin)
            timing.compute_s.append(float(header.get("compute_s", 0.0)))
            if len(out) != 1 or out[0].shape != hidden.shape:
                raise BadRequest(f"{connection.address} answered a step with a malformed tensor")
            hidden = out[0]
        self.position += hidden.shape[1]
        return hidden

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.request("close", session=self.session_id, timeout_s=2.0)
            except Exception:  # closing is best effort; idle sessions expire on the server anyway
                pass
            connection.close()
        self.connections = []

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

    @property
    def median_token_s(self) -> float:
        return statistics.median(self.token_latencies_s) if self.token_latencies_s else float("nan")


class DistributedModel:
    """Mirrors a transformers causal LM, but its blocks run on servers."""

    def __init__(self, head: ClientHead, infos: dict[str, ServerInfo], context: zmq.Context | None = None,
                 timeout_s: float = 60.0):
        self.head, self.infos = head, infos
        self.context = context or zmq.Context.instance()
        self.timeout_s = timeout_s
        self._check_servers()
        self.chain = choose_chain(infos, head.num_blocks)

    @classmethod
    def from_servers(cls, addresses: list[str], model: str = "smollm2", timeout_s: float = 60.0) -> "DistributedModel":
        if not addresses:
            raise BadRequest("give at least one server address (host:port)")
        context = zmq.Context.instance()
        head = ClientHead.load(model)
        infos = {address: fetch_info(context, address) for address in addresses}
        return cls(head, infos, context, timeout_s)

    def _check_servers(self) -> None:
        dtype = DTYPE_NAMES[self.head.dtype]
        for address, info in self.infos.items():
            if info.model != self.head.fingerprint or info.num_blocks != self.head.num_blocks:
                raise BadRequest(f"{address} serves another model ({info.model}, {info.num_blocks} blocks) "
                                 f"than the client loaded ({self.head.fingerprint}, {self.head.num_blocks} blocks)")
            if info.dtype != dtype:
                raise BadRequest(f"{address} runs {info.dtype}; the client runs {dtype}")

    def session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self.context, self.chain, max_length, self.timeout_s)

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
            hops = session.timings
        final = text if on_token is not None else self._decode(new)  # streaming already decoded it
        return GenerationResult(new, final, self.chain, ttft, latencies, hops)

    def _decode(self, ids: list[int]) -> str:
        if not self.head.has_tokenizer:  # token ids in, token ids out
            return ""
        return self.head.tokenizer.decode(ids, skip_special_tokens=True)
