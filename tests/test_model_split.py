"""Splitting is exact: a model run span by span, each with its own cache, equals the whole model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from blockswarm.core.errors import BadRequest
from blockswarm.model.head import ClientHead
from blockswarm.model.span import Span

from conftest import TINY_FAMILIES, reference_model


def whole_model_logits(directory, prompt_ids, decode_ids):
    from transformers import DynamicCache

    model = reference_model(directory)
    cache = DynamicCache(config=model.config)
    outputs = []
    with torch.inference_mode():
        out = model(prompt_ids, past_key_values=cache, use_cache=True)
        outputs.append(out.logits)
        for token in decode_ids:
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            outputs.append(out.logits)
    return outputs


def split_logits(directory, bounds, prompt_ids, decode_ids):
    head = ClientHead.load(directory)
    spans = [Span.load(directory, a, b) for a, b in zip(bounds, bounds[1:])]
    caches = [span.new_cache() for span in spans]
    outputs, position = [], 0
    for ids in [prompt_ids] + [torch.tensor([[t]]) for t in decode_ids]:
        hidden = head.embed_tokens(ids, position)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache)
        outputs.append(head.logits(hidden))
        position += ids.shape[1]
    return outputs


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("bounds", [(0, 2, 6), (0, 1, 4, 6)])
def test_split_matches_whole_model(tiny_model_dirs, family, bounds):
    directory = tiny_model_dirs[family]
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7, 8]])
    decode = [11, 64, 2, 90, 33]
    expected = whole_model_logits(directory, prompt, decode)
    got = split_logits(directory, bounds, prompt, decode)
    for want, have in zip(expected, got):
        assert want.shape == have.shape
        assert torch.max(torch.abs(want - have)).item() <= 1e-5


def test_multi_token_steps_after_prefill_match(tiny_model_dirs):
    """Several new tokens at once on top of a cache (not only prefill or one token)."""
    directory = tiny_model_dirs["llama"]
    head = ClientHead.load(directory)
    whole, spans = Span.load(directory, 0, 6), [Span.load(directory, 0, 3), Span.load(directory, 3, 6)]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    one_cache = whole.new_cache()
    expected = whole.forward(head.embed_tokens(ids, 0), one_cache)
    caches = [s.new_cache() for s in spans]
    pieces = []
    for lo, hi in [(0, 4), (4, 7), (7, 9)]:
        hidden = head.embed_tokens(ids[:, lo:hi], lo)
        for span, cache in zip(spans, caches):
            hidden = span.forward(hidden, cache)
        pieces.append(hidden)
    assert torch.max(torch.abs(torch.cat(pieces, dim=1) - expected)).item() <= 1e-5


def test_span_outside_model_is_a_clear_error(tiny_model_dirs):
    with pytest.raises(BadRequest, match="not inside the model"):
        Span.load(tiny_model_dirs["llama"], 4, 9)


@pytest.mark.slow
def test_smollm2_split_matches_whole_model(smollm2_dir):
    prompt = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    decode = [11173, 3365, 3511, 308]
    expected = whole_model_logits(smollm2_dir, prompt, decode)
    got = split_logits(smollm2_dir, (0, 10, 20, 30), prompt, decode)
    for want, have in zip(expected, got):
        assert torch.max(torch.abs(want - have)).item() <= 1e-5


@pytest.fixture(scope="module")
def chat_head(tmp_path_factory, smollm2_dir):
    from blockswarm.model.tiny import tiny_chat_model

    return ClientHead.load(str(tiny_chat_model(tmp_path_factory.mktemp("chat") / "chat", smollm2_dir)))


_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": st.text(max_size=60)}), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(messages=_messages)
def test_chat_encoding_is_what_transformers_tokenizes(chat_head, messages):
    """The chat template's text through the Rust tokenizer directly: the same ids as transformers'
    `apply_chat_template(tokenize=True)`, for any conversation (special tokens in a message too)."""
    expected = chat_head.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert chat_head.encode_chat(messages) == list(expected)


def test_chat_encoding_with_a_special_token_in_a_message(chat_head):
    messages = [{"role": "user", "content": "<|im_end|> then <|im_start|>assistant\nhello"}]
    test_chat_encoding_is_what_transformers_tokenizes.hypothesis.inner_test(chat_head, messages)
