"""End to end over real server processes on loopback, with a tiny random Llama model."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from blockswarm.core.errors import (
    BadRequest, CacheFull, Infeasible, LengthExceeded, PeerGone, TooLarge, UnknownSession,
)
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.connection import Connection
from blockswarm.runtime.launcher import local_swarm, server_processes

from conftest import reference_model, run_concurrently

pytestmark = pytest.mark.slow
SPANS = [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs):
    directory = tiny_model_dirs["llama"]
    with local_swarm(str(directory), SPANS, ["--threads", "1", "--cache-tokens", "2048"]) as addresses:
        yield directory, addresses


def reference_greedy(directory, prompt, new_tokens):
    model = reference_model(directory)
    ids = torch.tensor([prompt])  # explicit mask: token 0 is not padding here
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_through_three_servers_matches_transformers_generate(swarm):
    directory, addresses = swarm
    model = DistributedModel.from_servers(addresses[::-1], model=str(directory))  # order does not matter
    assert [(h.start, h.end) for h in model.chain] == SPANS
    prompt = [3, 14, 15, 92, 65, 35]
    result = model.generate(prompt, max_new_tokens=20)
    expected = reference_greedy(directory, prompt, 20)
    assert result.token_ids == expected
    assert len(result.hops) == 3 and all(len(h.round_trip_s) == len(expected) for h in result.hops)
    for hop in result.hops:  # the server's time covers its compute; the round trip covers both
        assert all(c <= s <= rt for c, s, rt in zip(hop.compute_s, hop.server_s, hop.round_trip_s))


def test_eight_concurrent_sessions_all_correct(swarm):
    directory, addresses = swarm
    model = DistributedModel.from_servers(addresses, model=str(directory))
    prompts = [[(7 * i + j) % 128 for j in range(3 + i)] for i in range(8)]
    expected = [reference_greedy(directory, p, 12) for p in prompts]
    results, errors = run_concurrently(
        [lambda i=i: model.generate(prompts[i], max_new_tokens=12, stop_at_eos=True).token_ids for i in range(8)])
    assert not errors
    assert results == expected


def raw(address, *frames, timeout_ms=10000):
    """Send arbitrary frames with a bare DEALER socket and return the decoded reply header."""
    host, port = address.rsplit(":", 1)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"tcp://{host}:{port}")
    socket.send_multipart(list(frames))
    assert socket.poll(timeout_ms), "server did not answer"
    reply = socket.recv_multipart()
    socket.close()
    return msgpack.unpackb(reply[0])


def still_serves(directory, addresses):
    model = DistributedModel.from_servers(addresses, model=str(directory))
    assert len(model.generate([1, 2, 3], max_new_tokens=3, stop_at_eos=False).token_ids) == 3


def free_address() -> str:
    import socket as sockets

    with sockets.socket() as probe:  # free a moment ago, so nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_client_holds_hundreds_of_sessions_at_once(swarm):
    """150 open sessions over 3 hops hold 1,800 sockets, past ZeroMQ's default cap of 1,023 per
    context; the client's context is sized for it. Each session then steps and closes."""
    directory, addresses = swarm
    model = DistributedModel.from_servers(addresses, model=str(directory))
    sessions = [model.session(8) for _ in range(150)]
    hidden = torch.zeros(1, 2, 64)
    for session in sessions:
        assert session.step(hidden).shape == hidden.shape
        session.close()
    model.close()
    assert model.context.closed


def test_servers_that_do_not_answer_are_skipped_while_the_others_cover_the_model(swarm):
    directory, addresses = swarm
    nobody = free_address()
    model = DistributedModel.from_servers([*addresses, nobody], model=str(directory))
    assert [h.address for h in model.chain] == addresses and nobody not in model.infos
    with pytest.raises(Infeasible, match=f"do not cover blocks 0:6 .*not answering: {nobody}"):
        DistributedModel.from_servers([addresses[0], nobody], model=str(directory))


def test_info_command_lists_what_each_server_holds_and_who_is_down(swarm, tmp_path):
    import json
    import sys

    _, addresses = swarm
    nobody = free_address()
    run = subprocess.run([sys.executable, "-m", "blockswarm", "info", "--servers", ",".join([*addresses, nobody]),
                          "--json", str(tmp_path / "info.json")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    for address, (start, end) in zip(addresses, SPANS):
        assert f"{address}  blocks {start}:{end} of 6" in run.stdout
    assert f"{nobody}  down: nothing accepts connections" in run.stdout
    written = json.loads((tmp_path / "info.json").read_text())
    assert sorted(written["up"]) == sorted(addresses) and list(written["down"]) == [nobody]
    assert all(v["free_cache_tokens"] <= v["cache_tokens"] == 2048 for v in written["up"].values())


def test_bad_input_never_kills_a_server(swarm):
    directory, addresses = swarm
    first = addresses[0]
    connection = Connection(zmq.Context.instance(), first, timeout_s=10)
    connection.open(0, 4, 2**20)
    token = connection.token
    good = torch.zeros(1, 1, 64)

    def step(tensors, number=1, session=token):
        return connection.request("step", tensors, session=session, step=number)

    cases = [
        (lambda: step((torch.zeros(1, 1, 32),)), BadRequest, "shape"),
        (lambda: step((good.double().float().half(),)), BadRequest, "float32"),
        (lambda: step(()), BadRequest, "exactly one tensor"),
        (lambda: step((good,), session="nope"), UnknownSession, "no open session"),
        (lambda: step((torch.zeros(1, 5, 64),)), LengthExceeded, "reserved 4"),
        (lambda: step((good,), number=2), BadRequest, "out of order"),
        (lambda: connection.request("open", start=2, max_length=4), BadRequest, "holds blocks 0:2"),
        (lambda: connection.request("open", start=0, end=1, max_length=4), BadRequest, "end of its span"),
        (lambda: connection.request("open", start=0, max_length=10**6), TooLarge, "allows for one session"),
        (lambda: connection.request("dance"), BadRequest, "unknown op"),
    ]
    for call, error, text in cases:
        with pytest.raises(error, match=text):
            call()
    # garbage that is not even our protocol
    assert raw(first, b"\xc1garbage")["code"] == "bad_request"
    assert raw(first, msgpack.packb({"op": "step", "session": "bad",
                                     "tensors": [{"dtype": "float32", "shape": [1, 1, 64]}]}), b"short")["code"] == "bad_request"
    # a full cache is retriable, and frees up when sessions close
    big = connection.request("open", start=0, max_length=230)[0]["session"]
    other = Connection(zmq.Context.instance(), first, timeout_s=10)
    for _ in range(8):
        other.request("open", start=0, max_length=226)
    with pytest.raises(CacheFull) as caught:
        other.request("open", start=0, max_length=226)
    assert caught.value.retriable
    connection.request("close", session=big)
    other.request("open", start=0, max_length=226)
    connection.close_session()
    connection.close()
    other.close()
    still_serves(directory, addresses)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_server_that_dies_or_freezes_mid_session_is_reported_not_awaited(tiny_model_dirs, how):
    """Killed: the dropped connection tells at once. Frozen (SIGSTOP, socket still open): the
    unanswered heartbeats tell. Either way PeerGone long before the request's own deadline."""
    with server_processes(str(tiny_model_dirs["llama"]), [(0, 3)], ["--threads", "1"]) as servers:
        (address, process), = servers.items()
        connection = Connection(zmq.Context.instance(), address, timeout_s=30, heartbeat_s=0.5)
        connection.open(0, 8, 2**20)
        hidden = torch.zeros(1, 1, 64)
        connection.step(hidden)
        process.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        if how == "frozen":  # (a stop is delivered a moment later: a step sent before it is answered)
            deadline = time.monotonic() + 5
            while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "Tt" \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            with pytest.raises(PeerGone, match=f"lost the connection to {address} while waiting for 'step'") as caught:
                connection.step(hidden)  # a Timeout here would mean 30 s of waiting
        finally:
            process.send_signal(signal.SIGCONT)  # a frozen server must wake to be stopped
        assert caught.value.retriable
        connection.close()


def test_generation_survives_a_server_killed_mid_way_with_the_same_output(tiny_model_dirs):
    """A[0:2] then B[2:6] or C[1:6]: kill whichever the chain uses after a few tokens. The other
    takes blocks 2:6 (C entering mid-span), the steps so far are replayed, and the tokens equal
    transformers' greedy output. With no server left for those blocks, the error says so."""
    directory = tiny_model_dirs["llama"]
    with server_processes(str(directory), [(0, 2), (2, 6), (1, 6)], ["--threads", "1"]) as by_address:
        model = DistributedModel.from_servers(list(by_address), model=str(directory))
        victim = model.chain[1].address
        prompt = [3, 14, 15, 92, 65, 35]

        def kill_after_five():
            tokens = iter(range(100))
            return lambda _token, _text: next(tokens) == 4 and by_address[victim].kill()

        result = model.generate(prompt, max_new_tokens=16, stop_at_eos=False, on_token=kill_after_five())
        assert result.token_ids == reference_greedy(directory, prompt, 16)
        assert len(result.repairs) == 1 and result.repairs[0].startswith(f"{victim} failed")
        survivor = result.chain[1]
        assert survivor.address != victim and (survivor.start, survivor.end) == (2, 6)
        assert victim not in model.infos and model.chain == result.chain  # new sessions avoid it

        victim = survivor.address
        with pytest.raises(PeerGone, match="no other chain is left for blocks 2 on"):
            model.generate(prompt, max_new_tokens=16, stop_at_eos=False, on_token=kill_after_five())


def test_a_session_that_expired_while_idle_is_rebuilt_with_the_same_output(tiny_model_dirs):
    """Servers that forget sessions idle for 1 s; the generation pauses 2 s after a few tokens.
    The servers answer `unknown session`; the client reopens and replays, and the tokens are right."""
    directory = tiny_model_dirs["llama"]
    with local_swarm(str(directory), [(0, 3), (3, 6)], ["--threads", "1", "--session-timeout", "1"]) as addresses:
        model = DistributedModel.from_servers(addresses, model=str(directory))
        prompt = [3, 14, 15, 92, 65, 35]
        tokens = iter(range(100))
        result = model.generate(prompt, max_new_tokens=12, stop_at_eos=False,
                                on_token=lambda *_: next(tokens) == 3 and time.sleep(2.0))
        assert result.token_ids == reference_greedy(directory, prompt, 12)
        assert not result.repairs  # counted apart from real repairs: nothing failed
        assert len(result.reopens) == 2 and all("no longer had the session" in r for r in result.reopens)
        assert [h.address for h in result.chain] == addresses  # the same servers, not a failover


def test_a_full_server_is_passed_over_for_another_holding_the_same_blocks(tiny_model_dirs):
    """Two servers hold blocks 0:3 with room for one 20-token session each. The second session
    finds the first choice full and opens on the other; a third finds both full and gets a
    retriable cache_full that says so. Once a session closes, there is room again."""
    directory = tiny_model_dirs["llama"]
    small = ["--threads", "1", "--cache-tokens", "32"]
    with server_processes(str(directory), [(0, 3), (0, 3)], small) as front, \
            local_swarm(str(directory), [(3, 6)], ["--threads", "1"]) as back:
        model = DistributedModel.from_servers([*front, *back], model=str(directory))
        first = model.session(20)
        second = model.session(20)
        assert first.chain[0].address != second.chain[0].address
        assert len(second.repairs) == 1 and "had no cache room" in second.repairs[0]
        with pytest.raises(CacheFull, match="no other server holding blocks 0 on has room now; retry later") as full:
            model.session(20)
        assert full.value.retriable
        first.close()
        third = model.session(20)
        hidden = torch.zeros(1, 3, 64)
        assert third.step(hidden).shape == hidden.shape
        third.close()
        second.close()
        assert len(model.infos) == 3  # nobody was forgotten: full is not gone


def test_concurrent_sessions_all_recover_from_one_failure(tiny_model_dirs):
    """Four generations in threads share the model; a server they all use is killed mid-way.
    Each one repairs itself (one shared reroute, under a lock) and ends with its correct tokens."""
    directory = tiny_model_dirs["llama"]
    with server_processes(str(directory), [(0, 3), (3, 6), (3, 6)], ["--threads", "1"]) as by_address:
        model = DistributedModel.from_servers(list(by_address), model=str(directory))
        victim = by_address[model.chain[1].address]
        prompts = [[(5 * i + j) % 128 for j in range(4 + i)] for i in range(4)]
        expected = [reference_greedy(directory, p, 14) for p in prompts]
        started = threading.Barrier(5)
        results, errors = [None] * 4, []

        def run(i):
            tokens = iter(range(100))
            try:
                results[i] = model.generate(prompts[i], max_new_tokens=14, stop_at_eos=False,
                                            on_token=lambda *_: next(tokens) == 3 and started.wait(60))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(60)  # every generation is 4 tokens in
        victim.kill()
        for t in threads:
            t.join(120)
        assert not errors
        assert [r.token_ids for r in results] == expected
        assert all(len(r.repairs) == 1 for r in results) and len(model.infos) == 2


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "bloom"])
def test_other_families_generate_exactly_over_two_servers(tiny_model_dirs, family):
    directory = tiny_model_dirs[family]
    with local_swarm(str(directory), [(0, 3), (3, 6)], ["--threads", "1"]) as addresses:
        model = DistributedModel.from_servers(addresses, model=str(directory))
        prompt = [5, 9, 2, 77, 31]
        assert model.generate(prompt, max_new_tokens=10).token_ids == reference_greedy(directory, prompt, 10)


def test_a_fixed_data_port_is_used_and_reported(tiny_model_dirs):
    import socket as sockets

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    directory = tiny_model_dirs["llama"]
    with local_swarm(str(directory), [(0, 6)], ["--threads", "1", "--data-port", str(free)]) as (address,):
        model = DistributedModel.from_servers([address], model=str(directory))
        assert model.infos[address].data_port == free
        assert len(model.generate([1, 2, 3], max_new_tokens=2, stop_at_eos=False).token_ids) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_serve_on_a_missing_gpu_is_a_clear_error(tiny_model_dirs):
    import sys

    for device, message in [("cuda", "sees no CUDA GPU; use --device cpu"), ("gpu", "is not a torch device")]:
        run = subprocess.run([sys.executable, "-m", "blockswarm", "serve", "--model", str(tiny_model_dirs["llama"]),
                              "--blocks", "0:2", "--device", device], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
