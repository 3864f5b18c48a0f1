"""Concurrent calls from threads return exactly the serial results.

Each call's routing travels with the call (a contextvars frame), so threads mixing named,
weighted, base and router-decided rows (the learned gate deciding at its hidden layer,
inside the pass) never see each other's decisions. Reference: the same calls run one
after another. Comparisons are bit-exact (``torch.equal``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

import moa
from moa.model import BankBusyError
from moa.routing.learned_gate import LearnedGate
from moa.testing.fixtures import make_tiny_model, random_input_ids

THREADS = 4
CALLS = 100

#: One request per row: name, mixture, None (base) or "auto" (the gate decides).
REQUESTS: list[list] = [
    ["a", "b", None, "auto"],
    [{"a": 0.7, "c": 0.3}, "auto", "c", None],
    ["auto", "auto", "auto", "auto"],
    [None, {"b": 0.2, "c": 0.5, "a": 0.3}, "auto", "a"],
    ["c", "c", "c", "c"],
    [None, None, None, None],
]


@pytest.fixture(scope="module")
def served():
    model = make_tiny_model(seed=0)
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 16, 3)):
        torch.manual_seed(seed)
        model.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                               init_lora_weights=False))
    torch.manual_seed(4)
    model.set_router(LearnedGate(["a", "b", "c"], hidden_size=64, top_k=2))  # hidden_layer=2
    inputs = [random_input_ids(batch=4, seq_len=5 + i, seed=20 + i) for i in range(len(REQUESTS))]
    return model, inputs


def as_kwargs(requests: list) -> dict:
    return {"adapter_weights": [{r: 1.0} if isinstance(r, str) and r != "auto" else r for r in requests]}


def run_threads(job: Callable[[int, int], torch.Tensor], expected: list[torch.Tensor]) -> list[str]:
    """Run ``job(thread, call)`` CALLS times in each of THREADS threads; return mismatches."""
    barrier = threading.Barrier(THREADS)
    mismatches: list[str] = []
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            barrier.wait()
            for call in range(CALLS):
                index = (thread + call) % len(expected)
                if not torch.equal(job(thread, call), expected[index]):
                    mismatches.append(f"thread {thread} call {call} request {index}")
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return mismatches


@torch.no_grad()
def test_concurrent_forwards_equal_the_serial_run(served):
    model, inputs = served
    serial = [model(ids, **as_kwargs(req)).logits for ids, req in zip(inputs, REQUESTS)]
    # a thread switching adapters off for its own calls must not switch them off for others
    serial_base = [model(ids, adapter_names=[None] * 4).logits for ids in inputs]

    def job(thread: int, call: int) -> torch.Tensor:
        index = (thread + call) % len(inputs)
        if thread == THREADS - 1 and call % 10 == 0:
            with model.disable_adapter():
                out = model(inputs[index], **as_kwargs(REQUESTS[index])).logits
            assert torch.equal(out, serial_base[index]), "disable_adapter() did not hold in its own thread"
        return model(inputs[index], **as_kwargs(REQUESTS[index])).logits

    mismatches = run_threads(job, serial)
    assert not mismatches, f"{len(mismatches)} of {THREADS * CALLS} outputs differ: {mismatches[:5]}"


@torch.no_grad()
def test_concurrent_generates_equal_the_serial_run(served):
    model, inputs = served
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=257)
    serial = [model.generate(ids, **as_kwargs(req), **kw) for ids, req in zip(inputs, REQUESTS)]

    def job(thread: int, call: int) -> torch.Tensor:
        index = (thread + call) % len(inputs)
        return model.generate(inputs[index], **as_kwargs(REQUESTS[index]), **kw)

    mismatches = run_threads(job, serial)
    assert not mismatches, f"{len(mismatches)} of {THREADS * CALLS} outputs differ: {mismatches[:5]}"


@torch.no_grad()
def test_concurrent_route_and_hidden_states_equal_the_serial_run(served):
    model, inputs = served
    serial_route = [model.route(ids) for ids in inputs]
    serial_hidden = [model.hidden_states_at(2, ids) for ids in inputs]
    results: list[bool] = []

    def worker(thread: int) -> None:
        for call in range(25):
            i = (thread + call) % len(inputs)
            results.append(model.route(inputs[i]) == serial_route[i])
            results.append(torch.equal(model.hidden_states_at(2, inputs[i]), serial_hidden[i]))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == THREADS * 50 and all(results)


@torch.no_grad()
def test_adding_and_removing_adapters_while_calls_run_changes_no_output(served):
    """Bank changes wait for running calls; the calls' slots stay valid from start to end."""
    model, inputs = served
    serial = [model(ids, **as_kwargs(req)).logits for ids, req in zip(inputs, REQUESTS)]
    stop = threading.Event()
    changes = []

    def churn() -> None:
        while not stop.is_set():
            model.add_adapter("tmp", moa.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
            model.delete_adapter("tmp")
            changes.append(1)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        mismatches = [
            i for call in range(60)
            if not torch.equal(model(inputs[i := call % len(inputs)], **as_kwargs(REQUESTS[i])).logits, serial[i])
        ]
    finally:
        stop.set()
        churner.join(timeout=60)
    assert changes and not mismatches
    assert model.adapter_names == ["a", "b", "c"]


def test_changing_the_bank_inside_a_call_is_refused_not_deadlocked(served):
    model, inputs = served

    class LoadingRouter(moa.Router):
        name = "loading"

        def route(self, request):
            model.add_adapter("late", moa.LoraConfig(r=2, target_modules=["q_proj"]))
            raise AssertionError("unreachable")

    with pytest.raises(BankBusyError, match="inside a call"):
        model(inputs[0], router=LoadingRouter())
    assert "late" not in model.adapter_names
