"""Measure a span's own speed: per-block decode time and the affine prefill time (they feed the planner)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blockswarm.model.span import Span


@dataclass(frozen=True, slots=True)
class SpanProfile:
    block_decode_s: float  # seconds per token per block
    block_prefill_s_per_token: float  # prefill per block = slope * prompt_tokens + base
    block_prefill_base_s: float


def _median_seconds(fn, repeats: int, synchronize) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def measure(span: Span, repeats: int = 5, short: int = 16, long: int = 64) -> SpanProfile:
    """Time decode steps after a short prefill, and prefills of two lengths, on a scratch cache."""
    blocks = span.end - span.start
    hidden = torch.randn(1, long, span.hidden_size, dtype=span.dtype,
                         generator=torch.Generator().manual_seed(0)).to(span.device)

    def prefill(n: int):
        span.forward(hidden[:, :n], span.new_cache())

    prefill(short)  # warm up kernels and allocator
    t_short = _median_seconds(lambda: prefill(short), repeats, span.synchronize)
    t_long = _median_seconds(lambda: prefill(long), repeats, span.synchronize)
    cache = span.new_cache()
    span.forward(hidden[:, :short], cache)
    token = hidden[:, :1]
    decode = _median_seconds(lambda: span.forward(token, cache), repeats * 2, span.synchronize)
    slope = max(t_long - t_short, 0.0) / (long - short)
    base = max(t_short - slope * short, 0.0)
    return SpanProfile(decode / blocks, slope / blocks, base / blocks)
