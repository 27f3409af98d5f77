"""The wire format: round trips, and every kind of malformed frame gives BadRequest (never a crash)."""

from __future__ import annotations

import socket

import msgpack
import pytest
import torch
import zmq

from blockswarm.core.errors import BadRequest, CacheFull, LengthExceeded, PeerGone, TooLarge, UnknownSession
from blockswarm.runtime.connection import fetch_info
from blockswarm.runtime.protocol import decode, encode, error_reply, raise_if_error
from blockswarm.runtime.sessions import SessionTable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    tensor = torch.randn(1, 5, 7).to(dtype)
    header, tensors = decode(encode({"op": "step", "rid": 3, "session": "s"}, (tensor,)))
    assert header["op"] == "step" and header["rid"] == 3
    assert tensors[0].dtype == dtype and torch.equal(tensors[0], tensor)


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xc1\xff garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a msgpack map"),
    ([msgpack.packb({"op": "step", "tensors": [{"dtype": "float32", "shape": [1, 2]}]})], "tensor frames arrived"),
    ([msgpack.packb({"op": "step", "tensors": [{"dtype": "int64", "shape": [1]}]}), b"x" * 8], "dtype must be"),
    ([msgpack.packb({"op": "step", "tensors": [{"dtype": "float32", "shape": [1, -2]}]}), b""], "shape must be"),
    ([msgpack.packb({"op": "step", "tensors": [{"dtype": "float32", "shape": [1, 4]}]}), b"x" * 15], "needs 16"),
    ([b"\x80" * 70000], "larger than"),
])
def test_malformed_messages_are_bad_requests(frames, reason):
    with pytest.raises(BadRequest, match=reason):
        decode(frames)


def test_error_replies_become_the_same_exception_on_the_client():
    with pytest.raises(CacheFull, match="full"):
        raise_if_error(error_reply(1, CacheFull("cache full")))


def test_cache_budget_counts_token_blocks():
    table = SessionTable(10, 20, cache_tokens=100)  # 1000 token-blocks
    table.open("a", 10, 20, 60, object)
    with pytest.raises(CacheFull):
        table.open("b", 10, 20, 50, object)
    table.open("c", 15, 20, 80, object)  # a sub-span needs only 400 token-blocks
    assert table.free_cache_tokens == 0
    table.close("a")
    table.open("b", 10, 20, 50, object)
    with pytest.raises(TooLarge):
        table.open("huge", 10, 20, 101, object)
    with pytest.raises(BadRequest, match="holds blocks 10:20"):
        table.open("x", 0, 10, 5, object)
    with pytest.raises(UnknownSession):
        table.get("nope")
    session = table.get("b")
    with pytest.raises(LengthExceeded):
        table.check_step(session, 49, 2)


def test_idle_sessions_expire():
    now = [0.0]
    table = SessionTable(0, 4, cache_tokens=10, clock=lambda: now[0])
    table.open("a", 0, 4, 5, object)
    now[0] = 5.0
    table.open("b", 0, 4, 5, object)
    now[0] = 11.0
    assert table.expire(10.0) == ["a"]
    assert list(table.sessions) == ["b"]


def test_an_address_where_nothing_listens_is_reported_not_awaited():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(PeerGone, match=f"nothing accepts connections at {address}.*is the server running"):
        fetch_info(zmq.Context.instance(), address, timeout_s=30)
