"""A span of transformer blocks `[start, end)` that runs one session at a time with its own cache.

The blocks are transformers' own decoder layers, built on the meta device and materialized
from the checkpoint one span at a time, so a server holds only its blocks. Positions are passed
explicitly: a server that does not hold block 0 still applies the right rotary angles and
causal mask because the session's cache length tells it where the new tokens stand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from blockswarm.core.errors import BadRequest
from blockswarm.model.checkpoint import WeightReader, load_config, resolve_model
from blockswarm.model.families import Family, family_for, get_module, num_blocks


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The whole model with no storage: a map of module names and shapes, built in milliseconds."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # transformers picks sdpa where the family has it


def materialize(module: nn.Module, prefix: str, weights: WeightReader, dtype: torch.dtype, device: str) -> nn.Module:
    """Give a meta-device submodule real storage and fill it from the checkpoint."""
    module = module.to_empty(device=device)
    state = {}
    for key, tensor in module.state_dict().items():
        name = f"{prefix}.{key}"
        if name in weights:
            state[key] = weights.get(name).to(dtype)
        elif tensor.dtype.is_floating_point:
            raise BadRequest(f"checkpoint has no weight {name!r}")
    module.load_state_dict(state, strict=False)
    return module.to(dtype=dtype)


def rebuild_buffers(module: nn.Module, config: PretrainedConfig, device: str) -> nn.Module:
    """Modules whose state is computed, not stored (rotary inverse frequencies), built anew."""
    return type(module)(config=config).to(device)


@dataclass
class SpanCache:
    """One session's KV cache on one span and how many tokens it already holds."""

    kv: DynamicCache
    length: int = 0


class Span:
    """Blocks `[start, end)` of a causal LM; `forward` advances one session by any number of tokens."""

    def __init__(self, config: PretrainedConfig, family: Family, start: int, end: int,
                 blocks: nn.ModuleList, rotary: nn.Module | None, dtype: torch.dtype, device: str):
        self.config, self.family = config, family
        self.start, self.end = start, end
        self.blocks, self.rotary = blocks, rotary
        self.dtype, self.device = dtype, device
        self._on_cuda = torch.device(device).type == "cuda"
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_blocks(config)
        self._layer_types = layer_types[start:end]

    @classmethod
    def load(cls, model: str | Path, start: int, end: int, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> "Span":
        path = resolve_model(model)
        config = load_config(path)
        total = num_blocks(config)
        if not 0 <= start < end <= total:
            raise BadRequest(f"span {start}:{end} is not inside the model's blocks 0:{total}")
        family = family_for(config)
        meta = skeleton(config)
        weights = WeightReader(path)
        all_blocks = get_module(meta, family.layers)
        blocks = nn.ModuleList(
            materialize(all_blocks[i], f"{family.layers}.{i}", weights, dtype, device) for i in range(start, end)
        )
        rotary = rebuild_buffers(get_module(meta, family.rotary), config, device) if family.rotary else None
        return cls(config, family, start, end, blocks.eval(), rotary, dtype, device)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def synchronize(self) -> None:
        """Wait until the device has finished queued work, so timings include it (no-op on CPU)."""
        if self._on_cuda:
            torch.cuda.synchronize(self.device)

    def new_cache(self) -> SpanCache:
        return SpanCache(DynamicCache(config=self.config))

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: SpanCache, first: int | None = None,
                between_blocks=None) -> torch.Tensor:
        """hidden: (1, n_new, hidden_size) for tokens at positions cache.length .. cache.length+n_new-1.

        `first` is the block to enter at (default: the span's start); a route may enter a server
        mid-span, and it always computes to the end of the span. `between_blocks`, if given, is
        called after each block (an emulating server sends replies that fell due meanwhile).
        """
        skip = 0 if first is None else first - self.start
        n_new = hidden.shape[1]
        positions = torch.arange(cache.length, cache.length + n_new, device=self.device).unsqueeze(0)
        masks = self._masks(hidden, cache.kv, positions, skip)
        extra = {self.family.cache_kwarg: cache.kv}
        if self.rotary is not None:
            extra.update(position_embeddings=self.rotary(hidden, positions), position_ids=positions)
        if self.family.alibi:
            extra["alibi"] = self._alibi(cache.length + n_new, hidden.dtype)
        for block, layer_type in zip(self.blocks[skip:], self._layer_types[skip:]):
            hidden = block(hidden, attention_mask=masks[layer_type], use_cache=True, **extra)
            if isinstance(hidden, tuple):  # BLOOM blocks return (hidden, ...)
                hidden = hidden[0]
            if between_blocks is not None:
                between_blocks()
        cache.length += n_new
        return hidden

    def _alibi(self, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
        """BLOOM's bias: one slope per head times each key's position, as BloomModel builds it."""
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        slopes = _get_alibi_slopes(self.config.num_attention_heads, self.device)
        return (slopes[:, None, None] * torch.arange(kv_length, device=self.device)).to(dtype)

    def _masks(self, hidden: torch.Tensor, kv: DynamicCache, positions: torch.Tensor, skip: int) -> dict:
        """transformers' own masks, sized against the first computed cache layer of each kind."""
        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        masks = {}
        computed = self._layer_types[skip:]
        for layer_type in set(computed):
            first = self.start + skip + computed.index(layer_type)
            masks[layer_type] = makers[layer_type](
                config=self.config, inputs_embeds=hidden, attention_mask=None,
                past_key_values=kv, position_ids=positions, layer_idx=first,
            )
        return masks
