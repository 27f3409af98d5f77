"""The client's share of the model: tokenizer, embeddings, final norm and LM head.

Servers run blocks; the client turns tokens into the hidden states that enter block 0 and turns
what leaves the last block into logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blockswarm.core.errors import ConfigError
from blockswarm.model.checkpoint import WeightReader, load_config, model_fingerprint, resolve_model
from blockswarm.model.families import family_for, get_module, num_blocks
from blockswarm.model.span import materialize, skeleton


class ClientHead:
    def __init__(self, path: Path, config, embed: nn.Module, position_embed: nn.Module | None,
                 final_norm: nn.Module, lm_head: nn.Module, dtype: torch.dtype, embed_norm: nn.Module | None = None):
        self.path, self.config = path, config
        self.embed, self.position_embed, self.embed_norm = embed, position_embed, embed_norm
        self.final_norm, self.lm_head = final_norm, lm_head
        self.dtype = dtype
        self.fingerprint = model_fingerprint(path)
        self._tokenizer = None

    @classmethod
    def load(cls, model: str | Path, dtype: torch.dtype = torch.float32) -> "ClientHead":
        path = resolve_model(model)
        config = load_config(path)
        family = family_for(config)
        meta = skeleton(config)
        weights = WeightReader(path)

        def part(name: str) -> nn.Module:
            return materialize(get_module(meta, name), name, weights, dtype, "cpu").eval()

        embed = part(family.embed)
        position_embed = part(family.position_embed) if family.position_embed else None
        embed_norm = part(family.embed_norm) if family.embed_norm else None
        final_norm = part(family.final_norm)
        if f"{family.head}.weight" in weights and not getattr(config, "tie_word_embeddings", False):
            lm_head = part(family.head)
        else:  # tied: the head is the embedding matrix
            lm_head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False)
            lm_head.weight = embed.weight
        return cls(path, config, embed, position_embed, final_norm, lm_head, dtype, embed_norm)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.config)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @torch.inference_mode()
    def embed_tokens(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """token_ids: (1, n) -> hidden states (1, n, hidden_size) entering block 0."""
        hidden = self.embed(token_ids)
        if self.position_embed is not None:
            positions = torch.arange(start_position, start_position + token_ids.shape[1]).unsqueeze(0)
            hidden = hidden + self.position_embed(positions)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden states leaving the last block (1, n, d) -> logits (1, n, vocab)."""
        return self.lm_head(self.final_norm(hidden))

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise ConfigError(f"{self.path} has no tokenizer; pass token ids instead of text")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def encode(self, prompt: str, chat_template: bool = True) -> list[int]:
        """Prompt -> token ids, through the chat template for instruct models when asked."""
        if chat_template and self.has_chat_template:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation ({"role", "content"} dicts) -> token ids, through the model's chat template,
        ending where the assistant's answer begins."""
        if not self.has_chat_template:
            raise ConfigError(f"{self.path.name} has no chat template; send a plain prompt instead")
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            # what transformers does with tokenize=True, less its batch machinery (~3x the cost)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return backend.encode(text, add_special_tokens=False).ids
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # a BatchEncoding or a list
        return list(ids)

    @property
    def context_length(self) -> int:
        """The most positions the model was built for (prompt and output together)."""
        for name in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048  # (BLOOM's ALiBi has no fixed limit; 2048 is what it was trained on)

    def stop_token_ids(self) -> set[int]:
        eos = self.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        tokenizer_eos = getattr(self._tokenizer, "eos_token_id", None) if self._tokenizer else None
        if tokenizer_eos is not None:
            ids.add(tokenizer_eos)
        return ids
