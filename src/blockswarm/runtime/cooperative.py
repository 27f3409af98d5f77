"""Waits that an event loop can take over: synchronous client code, run on the loop's own thread.

The API runs each generation's ordinary, synchronous code (`DistributedModel.stream`, its
`InferenceSession` and `Connection`s) in a greenlet on its event loop's thread (`start`). Where
that code waits for a server's reply (`poll`) or pauses (`sleep`), the greenlet parks and the
loop watches the sockets' file descriptors, so the loop goes on serving while the swarm computes
and resumes the generation when its reply is there. Outside such a greenlet (the Python API, the
CLI, servers, any thread) `poll` is ZeroMQ's own and `sleep` is `time.sleep`: one code path for
sessions, two ways to wait.

Why not a worker thread per generation: every hand-off between threads is a wake-up, which costs
0.2-0.5 ms on a VM, and threads that spin for their replies hold the GIL the loop needs. A
generation in a thread paid two before its first token (the pool's thread, then the loop) and
one more per token; on the loop it pays none. The work of a token on the client (embedding, the
LM head, sampling) then runs on the loop; callers hand heavy work to a thread with `offload`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import greenlet
import zmq


class _OnLoop(greenlet.greenlet):
    """A greenlet whose waits are awaited by the asyncio task that drives it (`start`)."""

    def __init__(self, function, may_spin):
        super().__init__(function)
        self.may_spin = may_spin


@dataclass(frozen=True)
class _Wait:
    fds: tuple[int, ...]  # wake when any is readable (ZeroMQ sockets' FDs signal any change of state)
    timeout_s: float | None  # ...or after this long (None: never)


_TURN = object()  # a wait for nothing: one turn of the loop (the cheapest: no future, no timer)


@dataclass(frozen=True)
class _Offload:
    function: object
    args: tuple


def parks() -> bool:
    """Whether waits here park a greenlet on an event loop (False: they block the thread)."""
    return isinstance(greenlet.getcurrent(), _OnLoop)


def may_spin() -> bool:
    """Whether a wait here may spin for a reply due any moment (holding its thread): anywhere but
    on an event loop, and there only while its owner says the loop has nothing else to serve."""
    current = greenlet.getcurrent()
    return not isinstance(current, _OnLoop) or current.may_spin()


def poll(poller: zmq.Poller, timeout_ms: int | None) -> list[tuple[object, int]]:
    """`poller.poll(timeout_ms)`; on an event loop, the greenlet parks until a socket has news."""
    if not parks():
        return poller.poll(timeout_ms)
    deadline = None if timeout_ms is None or timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
    fds = None  # (read only when it parks: most polls find the reply there already)
    while True:
        # ZeroMQ's FD only says that something changed; a zero-timeout poll says what (and
        # clears the FD's signal, so the next change signals again)
        events = poller.poll(0)
        if events:
            return events
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return []
        if fds is None:
            fds = tuple(socket if isinstance(socket, int) else socket.FD for socket, _ in poller.sockets)
        _park(_Wait(fds, left))


def poll_socket(socket: zmq.Socket, flags: int, timeout_ms: int) -> bool:
    """Whether `socket` is ready for `flags` within `timeout_ms` (parking on an event loop)."""
    poller = zmq.Poller()
    poller.register(socket, flags)
    return bool(poll(poller, timeout_ms))


def sleep(seconds: float) -> None:
    if parks():
        _park(_Wait((), max(0.0, seconds)))
    else:
        time.sleep(seconds)


def let_loop_run() -> None:
    """On an event loop, let it run what is ready (e.g. send what was just produced) before going
    on; elsewhere nothing."""
    if parks():
        _park(_TURN)


def offload(function, *args):
    """`function(*args)` in one of the loop's worker threads when on an event loop (work heavy
    enough to hold the loop up), else here."""
    if not parks():
        return function(*args)
    return _park(_Offload(function, args))


def _park(request):
    return greenlet.getcurrent().parent.switch(request)


def start(function, *args, may_spin=lambda: False) -> asyncio.Task:
    """`function(*args)` on this event loop's thread, its waits awaited, as a task; it starts here and
    now and runs until it first waits (a task of its own would start one turn of the loop later).
    Cancelling the task raises CancelledError where the function waits, so its `finally` blocks
    (closing sessions) still run, their own waits awaited. `may_spin()`: whether its waits may spin
    now (see `may_spin`)."""
    child = _OnLoop(function, may_spin)
    return asyncio.get_running_loop().create_task(_drive(child, child.switch(*args)))


async def _drive(child: _OnLoop, request):
    """Await what `child` waits for, and resume it, until it ends; what it returned."""
    loop = asyncio.get_running_loop()
    while not child.dead:
        try:
            if request is _TURN:
                answer = await asyncio.sleep(0)
            elif isinstance(request, _Offload):
                answer = await loop.run_in_executor(None, request.function, *request.args)
            else:
                answer = await _until(loop, request)
        except BaseException as exc:  # (cancelled, or the offloaded function failed)
            request = child.throw(exc)
        else:
            request = child.switch(answer)
    return request


async def _until(loop: asyncio.AbstractEventLoop, wait: _Wait) -> None:
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    timer = loop.call_later(wait.timeout_s, wake) if wait.timeout_s is not None else None
    for fd in wait.fds:
        loop.add_reader(fd, wake)
    try:
        await woken
    finally:
        if timer is not None:
            timer.cancel()
        for fd in wait.fds:
            loop.remove_reader(fd)
