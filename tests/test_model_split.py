"""Splitting is exact: a model run span by span, each with its own cache, equals the whole model."""

from __future__ import annotations

import pytest
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
