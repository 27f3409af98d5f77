"""Synchronous code run on an event loop (`runtime/cooperative.py`): its waits park, the loop goes on.

Real ZeroMQ sockets (inproc) and a real asyncio loop; nothing is mocked."""

import asyncio
import threading
import time

import pytest
import zmq

from blockswarm.runtime import cooperative


@pytest.fixture
def pair():
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.bind("inproc://pair")
    b.connect("inproc://pair")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    context.term()


def poller_of(socket) -> zmq.Poller:
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    return poller


def test_a_wait_parks_its_greenlet_and_the_loop_goes_on(pair):
    a, b = pair
    seen = {}

    def wait_for_a_message():
        seen["thread"] = threading.get_ident()
        events = cooperative.poll(poller_of(a), 5000)
        return a.recv() if events else None

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        counting = asyncio.create_task(ticker())
        task = cooperative.start(wait_for_a_message)
        await asyncio.sleep(0.1)  # the loop runs the ticker while the function waits
        b.send(b"hello")
        got = await task
        counting.cancel()
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got == b"hello"
    assert ticks >= 5, f"the loop ran {ticks} times while the function waited: the wait blocked it"
    assert seen["thread"] == threading.get_ident()  # (asyncio.run ran the loop here: no other thread)


def test_many_waits_at_once_each_resume_with_their_own_reply():
    context = zmq.Context()
    pairs = []
    for i in range(8):
        a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        a.bind(f"inproc://many-{i}")
        b.connect(f"inproc://many-{i}")
        pairs.append((a, b))

    def echo_twice(a):
        got = []
        for _ in range(2):
            assert cooperative.poll(poller_of(a), 5000)
            got.append(a.recv())
        return got

    async def main():
        tasks = [cooperative.start(echo_twice, a) for a, _ in pairs]
        for round_ in range(2):
            for i, (_, b) in reversed(list(enumerate(pairs))):
                b.send(f"{i}-{round_}".encode())
                await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
        assert results == [[f"{i}-0".encode(), f"{i}-1".encode()] for i in range(8)]
    finally:
        for a, b in pairs:
            a.close(linger=0)
            b.close(linger=0)
        context.term()


def test_a_wait_times_out_with_nothing(pair):
    a, _ = pair

    def wait():
        begin = time.monotonic()
        return cooperative.poll(poller_of(a), 60), time.monotonic() - begin

    events, waited = asyncio.run(_run(wait))
    assert events == [] and 0.055 <= waited < 1.0


def test_start_runs_the_function_at_once_until_it_first_waits(pair):
    a, b = pair
    steps = []

    def work():
        steps.append("before")
        cooperative.poll(poller_of(a), 5000)
        steps.append("after")

    async def main():
        task = cooperative.start(work)
        assert steps == ["before"]  # ran here, before any turn of the loop
        b.send(b"go")
        await task

    asyncio.run(main())
    assert steps == ["before", "after"]


def test_cancelling_raises_where_it_waits_and_its_finally_still_waits(pair):
    a, _ = pair
    ended = []

    def wait_forever():
        try:
            cooperative.poll(poller_of(a), None)
        finally:
            cooperative.sleep(0.02)  # (closing sessions: waits of its own, still awaited)
            ended.append(True)

    async def main():
        task = cooperative.start(wait_forever)
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert ended == [True]


def test_errors_come_out_of_the_task():
    def fail():
        cooperative.sleep(0.001)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(_run(fail))


def test_offload_runs_in_another_thread_only_on_a_loop():
    here = threading.get_ident()

    def where():
        return cooperative.offload(threading.get_ident)

    assert asyncio.run(_run(where)) != here
    assert where() == here


def test_outside_a_greenlet_waits_block_as_before(pair):
    a, b = pair
    assert not cooperative.parks()
    threading.Timer(0.05, b.send, [b"late"]).start()
    assert cooperative.poll(poller_of(a), 5000)
    assert a.recv() == b"late"
    begin = time.monotonic()
    cooperative.sleep(0.03)
    assert time.monotonic() - begin >= 0.03


async def _run(function, *args):
    return await cooperative.start(function, *args)


def test_a_wait_may_spin_only_where_its_owner_allows():
    """A thread may always spin for a reply due any moment; a greenlet on a loop only while its
    owner says so (the API: one generation and nobody waiting), since a spin holds the loop up."""
    assert cooperative.may_spin()
    allowed = []

    def ask():
        return cooperative.may_spin()

    async def main():
        first = await cooperative.start(ask)
        second = await cooperative.start(ask, may_spin=lambda: bool(allowed))
        allowed.append(True)
        third = await cooperative.start(ask, may_spin=lambda: bool(allowed))
        return first, second, third

    assert asyncio.run(main()) == (False, False, True)
