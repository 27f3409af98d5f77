"""A tiny random checkpoint that speaks a real model's tokens, for tests and benchmarks.

A llama of hidden size 64 with SmolLM2's tokenizer and chat template: text in and text out through
every layer of the system (tokenizer, chat template, servers, API) at a tiny model's speed, so
that what is measured or checked is the system, not the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_chat_model(directory: Path, tokenizer_dir: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """Write the checkpoint into `directory` (its name is the model's id) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, num_attention_heads=4,
                         num_hidden_layers=num_layers, vocab_size=49152, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tokenizer_dir) / name, directory)
    return Path(directory)
