"""Known models: block counts and sizes used by scenarios (`model: {catalogue: NAME}`)."""

from __future__ import annotations

from blockswarm.core.specs import ModelSpec

# params_per_block: BLOOM-176B from the spec (§7); Llama-2-7B = attention 4·4096² + MLP 3·4096·11008
# + norms 2·4096; Llama-2-70B = attention (2·8192² + 2·8192·1024)
# + MLP (3·8192·28672) + norms; SmolLM2-135M = (2·576² + 2·576·192) + 3·576·1536 + norms.
MODELS: dict[str, ModelSpec] = {
    "bloom-176b": ModelSpec("bloom-176b", num_blocks=70, d_model=14336, d_kv=14336,
                            params_per_block=2_466_437_120),
    "llama-2-7b": ModelSpec("llama-2-7b", num_blocks=32, d_model=4096, d_kv=4096, params_per_block=202_383_360),
    "llama-2-70b": ModelSpec("llama-2-70b", num_blocks=80, d_model=8192, d_kv=1024,
                             params_per_block=855_654_400),
    "smollm2-135m": ModelSpec("smollm2-135m", num_blocks=30, d_model=576, d_kv=192,
                              params_per_block=3_540_096, weight_bytes_per_param=4.0, kv_bytes=4),
}
