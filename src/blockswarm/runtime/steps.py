"""The compute thread's queue of steps: long prompts in slices, other sessions' steps in between.

A step may carry a whole prompt. Run in one go, a 16k-token prefill would hold the compute
thread for seconds while every other session's decode step waited behind it. Instead each step
is a job; the thread runs one slice of at most `budget` tokens from the job at the head of a
round robin over sessions, then moves to the next session. A decode step therefore waits for the
slice that is running and at most one slice per other session with work, and a session's own
steps stay in order. Torch-free:
the caller runs the slices.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class StepJob:
    identity: bytes  # where the reply goes (the ROUTER's routing id)
    rid: int | None
    number: int  # the session's step number
    session: Any  # sessions.Session
    hidden: Any  # (1, n, hidden_size) entering the server
    received: float  # perf_counter when it arrived (for the reply's server_s)
    tokens: int = 0  # tokens it carries (hidden.shape[1]; kept, as it is asked several times per step)
    done: int = 0  # tokens computed so far
    outputs: list = field(default_factory=list)  # one tensor per slice
    compute_s: float = 0.0

    def __post_init__(self):
        self.tokens = int(self.hidden.shape[1])

    def next_slice(self, budget: int) -> tuple[int, int]:
        return self.done, min(self.tokens, self.done + budget)


class StepQueue:
    def __init__(self, budget_tokens: int, max_jobs: int):
        if budget_tokens < 1:
            raise ValueError("the slice budget must be at least one token")
        self.budget, self.max_jobs = budget_tokens, max_jobs
        self._jobs: dict[str, deque[StepJob]] = {}  # per session token, in arrival order
        self._turns: deque[str] = deque()  # sessions with work, in round-robin order
        self._last: str | None = None  # the session that just had its turn and has more work
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def full(self) -> bool:
        return self.size >= self.max_jobs

    def push(self, job: StepJob) -> None:
        token = job.session.token
        queue = self._jobs.get(token)
        if queue is None:  # (a session waiting to rejoin, `_last`, still has its queue)
            queue = self._jobs[token] = deque()
            self._turns.append(token)
        queue.append(job)
        self.size += 1

    def head(self) -> StepJob | None:
        """The job whose turn it is (None when idle); call `advance` after running its slice."""
        if self._last is not None:  # back in line behind the sessions that arrived during its slice
            self._turns.append(self._last)
            self._last = None
        return self._jobs[self._turns[0]][0] if self._turns else None

    def advance(self, finished: bool) -> None:
        """After a slice of the head job: drop it if finished, and pass the turn to the next session.
        A session with more work rejoins the round at the next `head`, after any session whose step
        arrived meanwhile: a decode step waits for the slice that was running, not for one more."""
        token = self._turns.popleft()
        queue = self._jobs[token]
        if finished:
            queue.popleft()
            self.size -= 1
        if queue:
            self._last = token
        else:
            del self._jobs[token]

    def remove_session(self, token: str) -> list[StepJob]:
        """Take out every job of a session (it was dropped); returns them so each can be answered."""
        queue = self._jobs.pop(token, None)
        if queue is None:
            return []
        if self._last == token:
            self._last = None
        else:
            self._turns.remove(token)
        self.size -= len(queue)
        return list(queue)
