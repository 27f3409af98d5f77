"""Generations for the API: each on the event loop, in a greenlet whose waits park, admitted
through a bounded queue.

Each choice runs the Python API's own synchronous code (`DistributedModel.stream`) on the event
loop's thread through `runtime.cooperative`: where it waits for a server's reply, it parks and the
loop serves everything else; its text goes straight into the request's queue. No thread is woken
on the way (each wake-up costs 0.2-0.5 ms on a VM, and a generation in a worker thread paid two
before its first token); a model whose LM head is heavy picks its tokens in a thread
(`DistributedModel.offload_head_macs`). A request takes one slot per choice; when all `slots` are
busy it waits in a queue of at most `queue` requests, beyond which it is refused (429). A swarm
that answers `cache_full` is retried with back-off for up to `full_wait_s` before the first
token, and only then becomes a 429. Closing a generation (the client went away) stops it at the
next token, which closes the sessions on every server of its route.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from blockswarm.api.errors import APIError, from_swarm
from blockswarm.api.stops import StopMatcher
from blockswarm.core.errors import BlockswarmError, CacheFull
from blockswarm.model.sampling import SamplingParams
from blockswarm.runtime import cooperative

log = logging.getLogger("blockswarm.api")
INLINE_TEXT_CHARS = 4096


@dataclass(frozen=True)
class Choice:
    """What one choice generates: its prompt's token ids, and how."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]


@dataclass(frozen=True)
class Event:
    """A choice's news: `text` to send, or its end (`finish` is "stop" or "length", with `tokens`
    generated), or the error it failed with."""

    index: int
    text: str = ""
    finish: str | None = None
    tokens: int = 0
    error: APIError | None = None


def derived_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 uses the request's seed itself (so n=1 and the first of n agree); choice i another
    seed drawn from (seed, i), so choices are independent yet reproducible."""
    if seed is None or index == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(2, np.uint64)[0] % 2**63)


class Engine:
    def __init__(self, model, name: str, slots: int = 16, queue: int = 64, full_wait_s: float = 30.0,
                 missing=lambda: None):
        """`model`: a `DistributedModel`; `name`: the model's id in the API; `missing`: a callable
        saying which blocks the swarm lacks (for 503s)."""
        self.model, self.name = model, name
        self.slots, self.queue, self.full_wait_s = slots, queue, full_wait_s
        self.missing = missing
        self._tasks: set[asyncio.Task] = set()  # the generations running
        self._free: asyncio.Semaphore | None = None
        self._admitting: asyncio.Lock | None = None
        self.waiting = 0  # requests queued for slots
        self.running = 0  # slots taken
        self.flights: dict[str, object] = {}  # choice id -> its InferenceSession, for the page's routes
        self.finished: collections.Counter[str] = collections.Counter()  # choices by how they ended
        self._ids = itertools.count()

    @property
    def context_length(self) -> int:
        return self.model.head.context_length

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self._off_loop(sum(len(m["content"]) for m in messages), self.model.head.encode_chat, messages)

    async def encode_text(self, text: str) -> list[int]:
        return await self._off_loop(len(text), self.model.head.encode, text, False)

    @staticmethod
    async def _off_loop(size: int, function, *args):
        """Short texts are tokenized on the event loop (a fraction of a millisecond; handing them to
        a thread and back costs more than that here, in thread wake-ups); long ones in asyncio's own
        threads (the pool's may all be generating), so that no stream waits on them."""
        if size <= INLINE_TEXT_CHARS:
            return function(*args)
        return await asyncio.to_thread(function, *args)

    async def run(self, choices: list[Choice], cancelled: threading.Event) -> AsyncIterator[Event]:
        """Events of all `choices` as they come; ends when every choice has ended or failed. Setting
        `cancelled` (the client went away) stops every choice at its next token."""
        if len(choices) > self.slots:
            raise APIError(400, f"{len(choices)} choices at once is more than this API runs together "
                                f"({self.slots}); ask for fewer", param="n")
        await self._admit(len(choices))
        events: asyncio.Queue[Event] = asyncio.Queue()
        for choice in choices:
            task = cooperative.start(self._generate, choice, events, cancelled, may_spin=self._alone)
            self._tasks.add(task)  # (the loop keeps only weak references to tasks)
            task.add_done_callback(self._tasks.discard)
        try:
            running = len(choices)
            while running:
                event = await events.get()
                running -= event.finish is not None or event.error is not None
                yield event
        finally:
            cancelled.set()  # (the threads give their slots back as they end, within one token)

    async def _admit(self, needed: int) -> None:
        if self._free is None:  # made here: they belong to the event loop that serves
            self._free, self._admitting = asyncio.Semaphore(self.slots), asyncio.Lock()
        if self.waiting >= self.queue and (self._admitting.locked() or self.slots - self.running < needed):
            raise APIError(429, f"the API is at capacity ({self.slots} generations running, {self.waiting} "
                                "waiting); retry shortly", "rate_limit_error", code="queue_full", retry_after_s=1)
        self.waiting += 1
        taken = 0
        try:
            async with self._admitting:  # one request takes its slots at a time: no two half-admitted
                for _ in range(needed):
                    await self._free.acquire()
                    taken += 1
                    self.running += 1
        except BaseException:
            for _ in range(taken):
                self._release()
            raise
        finally:
            self.waiting -= 1

    def _alone(self) -> bool:
        """Whether one generation runs and no request waits: its waits may then spin for replies
        due any moment, as the Python API's do (waking the loop costs more than a short spin)."""
        return self.running == 1 and not self.waiting

    def _release(self) -> None:
        """(On the event loop.) A slot is free again."""
        self.running -= 1
        self._free.release()

    def _generate(self, choice: Choice, events: asyncio.Queue, cancelled: threading.Event) -> None:
        """On the event loop, in a greenlet whose waits park (`cooperative`): one choice from its
        first token to its end."""
        flight = f"{next(self._ids)}-{secrets.token_hex(3)}"

        ended = False

        def send(event: Event) -> None:
            nonlocal ended
            if ended:  # (closing the sessions failed after the end went out: the client has its answer)
                log.warning("after choice %d ended: %s", choice.index, event.error.message if event.error else event)
                return
            ended = event.finish is not None or event.error is not None
            events.put_nowait(event)

        try:
            self.finished[self._tokens(choice, cancelled, send, flight)] += 1
        except APIError as exc:
            send(Event(choice.index, error=exc))
        except BlockswarmError as exc:
            send(Event(choice.index, error=from_swarm(exc, self.missing())))
        except Exception as exc:  # a bug: the request fails, the API goes on
            log.exception("generation failed")
            send(Event(choice.index, error=APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                    "server_error", code="internal_error")))
        finally:
            self.flights.pop(flight, None)
            self._release()

    def _tokens(self, choice: Choice, cancelled: threading.Event, send, flight: str) -> str:
        """Stream one choice's text and then its end through `send`; how it ended. The end is sent
        before the sessions close (closing is a round trip to every server, which the client need
        not wait for). A full swarm is waited out (before the first token) for up to `full_wait_s`."""
        deadline, pause = time.monotonic() + self.full_wait_s, 0.1
        while True:
            stops, count, finish, spoken = StopMatcher(choice.stops), 0, "length", False
            stream = self.model.stream(choice.prompt, choice.max_tokens, choice.sampling, stop_at_eos=True)
            try:
                for streamed in stream:
                    if not count:  # (one session per stream: the page reads its route, repairs included)
                        self.flights[flight] = streamed.session
                    count += 1
                    text, stopped = stops.feed(streamed.text)
                    if text:
                        send(Event(choice.index, text=text))
                        if not spoken:  # the first text goes out before the next token's work begins;
                            spoken = True  # later ones while the swarm computes the next (every wait
                            cooperative.let_loop_run()  # parks or gives the loop a turn first)
                    if stopped or streamed.last or cancelled.is_set():
                        finish = "cancelled" if cancelled.is_set() else "stop"
                        break
                else:
                    rest = stops.flush()
                    if rest:
                        send(Event(choice.index, text=rest))
                send(Event(choice.index, finish=finish, tokens=count))
                return finish
            except CacheFull:
                if count or time.monotonic() + pause > deadline or cancelled.is_set():
                    raise
                cooperative.sleep(pause)
                pause = min(2 * pause, 2.0)
            finally:
                stream.close()  # closes the sessions now, not when the generator is collected

    def close(self) -> None:
        """(After the event loop has stopped: asyncio cancelled the generations still running, which
        closed their sessions.)"""
        self.model.close()
