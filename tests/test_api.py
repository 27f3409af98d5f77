"""The API's pure parts: stop strings on a stream, incremental detokenizing, request checking,
derived seeds, and who may listen where. (Real swarms behind the API: test_api_e2e.py.)"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockswarm.api.engine import derived_seed
from blockswarm.api.errors import APIError
from blockswarm.api.schema import ChatRequest, CompletionRequest, parse
from blockswarm.api.serving import APIConfig, is_loopback
from blockswarm.api.stops import StopMatcher
from blockswarm.core.errors import ConfigError

ALPHABET = "ab\n "


def run_matcher(pieces: list[str], stops: list[str]) -> tuple[str, bool, list[str]]:
    matcher, sent, hit = StopMatcher(stops), [], False
    for piece in pieces:
        out, hit = matcher.feed(piece)
        sent.append(out)
        if hit:
            break
    if not hit:
        sent.append(matcher.flush())
    return "".join(sent), hit, sent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(ALPHABET, max_size=4), max_size=12), st.lists(st.text(ALPHABET, min_size=1, max_size=3),
                                                                      max_size=3))
def test_stop_strings_cut_the_text_exactly_where_the_first_one_begins(pieces, stops):
    """However the text is split into tokens: what is sent is the text before the stop string that
    is complete first, character by character (of two complete at once, the one that begins first;
    all of the text when none occurs), and nothing that was sent is ever taken back."""
    text = "".join(pieces)
    found = [(text.find(stop) + len(stop), text.find(stop)) for stop in stops if stop in text]
    sent, hit, _ = run_matcher(pieces, stops)
    if found:
        assert hit and sent == text[:min(found)[1]]
    else:
        assert not hit and sent == text


def test_a_stop_string_complete_first_wins_over_a_longer_one_that_began_earlier():
    """Generation stops as soon as any stop string is complete: ' ' is, at "\n ", before "\n b"
    could be, whether the tokens are "\n " and "b" or "\n" and " b" (hypothesis found the first)."""
    assert run_matcher(["\n ", "b"], [" ", "\n b"])[:2] == ("\n", True)
    assert run_matcher(["\n", " b"], [" ", "\n b"])[:2] == ("\n", True)
    assert run_matcher(["x\n b"], ["\n b", " "])[:2] == ("x\n", True)


def test_stop_text_split_across_tokens_is_held_back_then_released():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("Hello\n") == ("Hello", False)  # "\n" may start the stop string: held
    assert matcher.feed("world") == ("\nworld", False)  # it did not: released
    assert matcher.feed("\n") == ("", False)
    assert matcher.feed("\nrest") == ("", True)


def test_incremental_decoding_equals_decoding_the_whole_output(smollm2_dir):
    """Token by token through the window, multi-byte characters split across tokens included."""
    from transformers import AutoTokenizer

    from blockswarm.model.detokenize import IncrementalDecoder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Blockswarm — 分散推論 🐝🐝! Ünïcode, spaces   and\nnew lines: 3.14159 ≈ π. The end."
    ids = tokenizer(text)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(token) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "" in pieces  # some token ended inside a character and was held back


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
    (b'{"model": "m", "messages": []}', 400, "messages"),
    (b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', 400, "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, "top_p"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', 400, "stop"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400,
     "tools"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400, "logprobs"),
])
def test_malformed_chat_requests_are_400s_naming_the_field(body, status, param):
    with pytest.raises(APIError) as caught:
        parse(ChatRequest, body)
    error = caught.value
    assert error.status == status and error.param == param
    assert set(error.body()["error"]) >= {"message", "type", "param", "code"}
    json.dumps(error.body())  # (serializable as it is)


def test_what_openai_clients_send_is_accepted():
    req = parse(ChatRequest, json.dumps({
        "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                                                 "text": "there"}]}],
        "stream": True, "stream_options": {"include_usage": True}, "stop": "\n", "user": "u1", "tools": [],
        "frequency_penalty": 0, "max_completion_tokens": 7}).encode())
    assert req.stop == ["\n"] and req.include_usage and req.token_limit == 7
    assert req.messages[1].as_template_input() == {"role": "user", "content": "hi there"}
    assert parse(CompletionRequest, b'{"model": "m", "prompt": [1, 2, 3]}').prompt == [1, 2, 3]
    assert parse(CompletionRequest, b'{"model": "m", "prompt": "x"}').stop == []


def test_choices_get_their_own_reproducible_seeds():
    seeds = [derived_seed(7, i) for i in range(16)]
    assert seeds[0] == 7 and len(set(seeds)) == 16 and seeds == [derived_seed(7, i) for i in range(16)]
    assert derived_seed(None, 3) is None
    assert all(0 <= s < 2**63 for s in seeds)


def test_serving_beyond_loopback_needs_keys_or_insecure():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ConfigError, match="--api-keys"):
        APIConfig(servers=["a:1"], host="0.0.0.0").check()
    APIConfig(servers=["a:1"], host="0.0.0.0", insecure=True).check()
    APIConfig(servers=["a:1"], host="0.0.0.0", api_keys={"k"}).check()
    with pytest.raises(ConfigError, match="not both"):
        APIConfig(servers=["a:1"], coordinator="b:2").check()
