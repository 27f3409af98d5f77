"""Where each model family keeps its parts, so one span runner serves them all.

Only names live here; the layers themselves are transformers' own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from blockswarm.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    layers: str  # attribute path of the ModuleList of decoder blocks
    embed: str  # token embedding
    final_norm: str
    head: str = "lm_head"
    position_embed: str | None = None  # learned absolute positions (GPT-2)
    rotary: str | None = None  # rotary embedding module built from the config (Llama-style)
    embed_norm: str | None = None  # a norm right after the token embedding (BLOOM)
    alibi: bool = False  # attention biased by key position (BLOOM) instead of rotary/learned positions
    cache_kwarg: str = "past_key_values"  # how a block is handed the session's cache


LLAMA_STYLE = Family(
    name="llama-style",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    rotary="model.rotary_emb",
)
GPT2 = Family(
    name="gpt2",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    position_embed="transformer.wpe",
)

BLOOM = Family(
    name="bloom",
    layers="transformer.h",
    embed="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    embed_norm="transformer.word_embeddings_layernorm",
    alibi=True,
    cache_kwarg="layer_past",
)

FAMILIES: dict[str, Family] = {
    "bloom": BLOOM,
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "gpt2": GPT2,
}


def family_for(config: PretrainedConfig) -> Family:
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise ConfigError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def num_blocks(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def get_module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root
