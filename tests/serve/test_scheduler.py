"""The scheduler alone: queues, slots, token budget and prompt chunks, with no model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa.serve.requests import BadRequestError, OverloadedError
from moa.serve.scheduler import Scheduler


@dataclass(eq=False)
class FakeRow:
    prefill_total: int
    chunkable: bool = True
    width: int = 1
    prefilled: int = 0
    cancelled: bool = False
    names: tuple[str, ...] = ()
    followers: list = field(default_factory=list)

    def adapters(self) -> tuple[str, ...]:
        return self.names


def run_chunks(scheduler: Scheduler, plan) -> list:
    """Apply a plan as the engine does: advance chunks; rows whose prompt ended start running."""
    done = []
    for chunk in plan.chunks:
        chunk.row.prefilled = chunk.stop
        if chunk.last:
            done.append(chunk.row)
    scheduler.prefill_done(done, done)
    return done


def test_nothing_running_packs_whole_prompts_up_to_the_prefill_budget():
    s = Scheduler(max_batch_size=8, max_prefill_tokens=100)
    rows = [FakeRow(40), FakeRow(40), FakeRow(40)]
    s.enqueue(rows)
    plan = s.plan_prefill()
    assert plan.admitted == rows[:2]
    assert [(c.start, c.stop, c.last) for c in plan.chunks] == [(0, 40, True), (0, 40, True)]
    assert list(s.waiting) == rows[2:]
    assert s.prefilling == rows[:2]


def test_a_prompt_longer_than_the_prefill_budget_is_taken_alone():
    s = Scheduler(max_prefill_tokens=10)
    s.enqueue([FakeRow(50), FakeRow(5)])
    plan = s.plan_prefill()
    assert [c.size for c in plan.chunks] == [50]


def test_slots_bound_admission_and_groups_count_each_choice():
    s = Scheduler(max_batch_size=4)
    s.running = [FakeRow(1), FakeRow(1)]
    s.enqueue([FakeRow(3, width=3), FakeRow(3)])
    plan = s.plan_step()
    assert [r.prefill_total for r in plan.admitted] == []  # the group of 3 does not fit beside 2 running
    s.running = [FakeRow(1)]
    plan = s.plan_step()
    assert [r.width for r in plan.admitted] == [3]
    assert s.slots_used() == 4


def test_one_at_a_time_takes_a_single_request():
    s = Scheduler(max_batch_size=8, one_at_a_time=True)
    s.enqueue([FakeRow(2), FakeRow(2)])
    assert len(s.plan_prefill().admitted) == 1


def test_a_long_prompt_is_chunked_under_the_step_budget_while_rows_run():
    s = Scheduler(max_batch_size=32, max_step_tokens=64)
    s.running = [FakeRow(1) for _ in range(16)]
    long = FakeRow(1000)
    s.enqueue([long])
    sizes = []
    while long in s.prefilling or long in s.waiting:
        plan = s.plan_step()
        assert sum(c.size for c in plan.chunks) + len(s.running) <= 64
        sizes.append(plan.chunks[0].size)
        run_chunks(s, plan)
    assert sizes[:-1] == [48] * (len(sizes) - 1) and sum(sizes) == 1000
    assert s.running[-1] is long


def test_an_unchunkable_prompt_goes_whole_and_alone():
    s = Scheduler(max_batch_size=32, max_step_tokens=64)
    s.running = [FakeRow(1) for _ in range(16)]
    small, whole = FakeRow(10), FakeRow(200, chunkable=False)
    s.enqueue([small, whole])
    plan = s.plan_step()
    assert [c.row for c in plan.chunks] == [small]  # the whole one waits: it would exceed the budget
    run_chunks(s, plan)
    plan = s.plan_step()
    assert [(c.row, c.size) for c in plan.chunks] == [(whole, 200)]  # alone: progress every step


def test_a_prompt_in_progress_goes_first():
    s = Scheduler(max_batch_size=32, max_step_tokens=40)
    s.running = [FakeRow(1) for _ in range(8)]
    first, second = FakeRow(100), FakeRow(10)
    s.enqueue([first])
    run_chunks(s, s.plan_step())
    s.enqueue([second])
    plan = s.plan_step()
    assert [(c.row, c.start) for c in plan.chunks] == [(first, 32)]  # the budget went to the first


def test_cancelled_requests_leave_every_list():
    s = Scheduler()
    running, prefilling, waiting = FakeRow(1), FakeRow(50), FakeRow(5)
    s.running = [FakeRow(1), running]
    s.prefilling = [prefilling]
    s.enqueue([waiting])
    for row in (running, prefilling, waiting):
        row.cancelled = True
    assert s.take_cancelled() == ([1], [prefilling], [waiting])
    assert s.prefilling == [] and list(s.waiting) == []


def test_the_queue_is_bounded_and_counts_are_reported():
    s = Scheduler(max_queue=2)
    s.enqueue([FakeRow(1, names=("a",)), FakeRow(1, names=("a", "b"))])
    with pytest.raises(OverloadedError, match="--max-queue 2"):
        s.enqueue([FakeRow(1)])
    assert s.in_use() == {"a": 2, "b": 1}
    assert s.adapters_by_state() == ([], ["a", "b"])
    assert s.counts() == {"queued": 2, "prefilling": 0, "running": 0}


def test_bad_limits_are_refused():
    with pytest.raises(BadRequestError, match="max_step_tokens must be >= 1"):
        Scheduler(max_step_tokens=0)


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(1, 300), st.booleans(), st.integers(1, 3)), min_size=1, max_size=12),
       running=st.integers(0, 20), step=st.integers(1, 80), batch=st.integers(3, 24))
def test_every_request_is_prefilled_exactly_once_in_order(prompts, running, step, batch):
    """Whatever the load: every prompt's chunks cover it exactly, in order; the batch never
    overflows; every step makes progress; a step exceeds its budget only by one unchunkable prompt."""
    s = Scheduler(max_batch_size=max(batch, running + 3), max_step_tokens=step, max_queue=100)
    s.running = [FakeRow(1) for _ in range(running)]
    rows = [FakeRow(n, chunkable=c, width=w) for n, c, w in prompts]
    s.enqueue(rows)
    covered = {id(r): 0 for r in rows}
    for _ in range(10_000):
        if not (s.waiting or s.prefilling):
            break
        plan = s.plan_step() if s.running or s.prefilling else s.plan_prefill()
        if not plan.chunks:  # only when the next request needs more slots than are free
            assert s.running and s.waiting[0].width > s.max_batch_size - s.slots_used()
            s.remove_running([0])
            continue
        budget = step - len(s.running) if s.running else None
        whole = [c for c in plan.chunks if not c.row.chunkable and c.start == 0]
        if budget is not None and sum(c.size for c in plan.chunks) > max(budget, 1):
            assert len(plan.chunks) == 1 or len(whole) == 1 and whole[0] is plan.chunks[0]
        for chunk in plan.chunks:
            assert chunk.start == covered[id(chunk.row)]
            covered[id(chunk.row)] = chunk.stop
        run_chunks(s, plan)
        assert s.slots_used() <= s.max_batch_size
        if len(s.running) > running + 4:  # rows finish now and then
            s.remove_running(list(range(len(s.running) - running)))
    assert all(covered[id(r)] == r.prefill_total for r in rows)
