"""The compute thread's step queue: slices, turns, and order (torch-free, with fabricated jobs)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from blockswarm.runtime.steps import StepJob, StepQueue


def job(session: str, tokens: int, number: int = 1) -> StepJob:
    return StepJob(b"id", number, number, SimpleNamespace(token=session), SimpleNamespace(shape=(1, tokens, 8)), 0.0)


def run_slice(queue: StepQueue) -> tuple[str, int, int]:
    head = queue.head()
    first, last = head.next_slice(queue.budget)
    head.done = last
    queue.advance(head.done == head.tokens)
    return head.session.token, first, last


def test_a_decode_step_that_arrives_during_a_slice_runs_next():
    queue = StepQueue(budget_tokens=100, max_jobs=10)
    queue.push(job("prompt", 1000))
    assert run_slice(queue) == ("prompt", 0, 100)
    queue.push(job("decode", 1))  # arrived while the first slice ran
    assert run_slice(queue) == ("decode", 0, 1)
    assert run_slice(queue) == ("prompt", 100, 200)


def test_removing_a_session_takes_all_its_jobs_also_while_it_waits_to_rejoin():
    queue = StepQueue(budget_tokens=10, max_jobs=10)
    queue.push(job("a", 30, 1))
    queue.push(job("a", 1, 2))
    run_slice(queue)
    assert len(queue.remove_session("a")) == 2 and len(queue) == 0 and queue.head() is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 40)), min_size=1, max_size=12),
       st.integers(1, 16))
def test_every_job_runs_whole_in_slices_within_budget_and_each_sessions_steps_in_order(jobs, budget):
    queue = StepQueue(budget_tokens=budget, max_jobs=100)
    numbers: dict[str, int] = {}
    for session, tokens in jobs:
        numbers[session] = numbers.get(session, 0) + 1
        queue.push(job(session, tokens, numbers[session]))
    done: dict[str, list[int]] = {}
    computed: dict[tuple[str, int], int] = {}
    while queue.head() is not None:
        head = queue.head()
        session, first, last = run_slice(queue)
        assert last - first <= budget and first == computed.get((session, head.number), 0)
        computed[(session, head.number)] = last
        if last == head.tokens:
            done.setdefault(session, []).append(head.number)
    assert len(queue) == 0
    assert all(steps == sorted(steps) for steps in done.values())
    assert sum(len(s) for s in done.values()) == len(jobs)
