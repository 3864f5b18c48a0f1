"""A layer's packed adapter buffers follow loads and evictions by copying only what changed.

Reference: the full rebuild (a :class:`LoraStack` without shared buffers concatenates every
adapter's weights) and, for outputs, the naive per-adapter loop. The work is measured by
the buffers' own counters (rows and bytes copied, reallocations), so a load or an eviction
that re-copied the other adapters' rows fails here.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import moa
from moa.kernels import build_metadata
from moa.kernels.dense import lora_dense
from moa.kernels.metadata import LoraStack
from moa.kernels.packed_buffers import MIN_FREE_ROWS, PackedBuffers
from moa.testing.fixtures import make_tiny_model, random_input_ids

H_IN, H_OUT = 12, 10
ROW_BYTES = (H_IN + H_OUT) * 4  # one rank row of A and of B^T, float32


def factors(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, H_IN, generator=gen), torch.randn(H_OUT, rank, generator=gen)


class Layer:
    """A layer's adapters by slot (``None``: absent here), as the bank orders them."""

    def __init__(self) -> None:
        self.buffers = PackedBuffers(H_IN, H_OUT)
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def stack(self, buffers: bool = True) -> LoraStack:
        lora_a = [None if s is None else s[0] for s in self.slots]
        lora_b = [None if s is None else s[1] for s in self.slots]
        scales = [0.0 if s is None else 0.5 + i for i, s in enumerate(self.slots)]
        return LoraStack(lora_a, lora_b, scales, H_IN, H_OUT, buffers=self.buffers if buffers else None)

    def check(self) -> LoraStack:
        """The incremental buffers equal a full rebuild's; returns the stack."""
        stack = self.stack()
        got, want = stack.packed(), self.stack(buffers=False).packed()
        assert torch.equal(got.lora_a, want.lora_a) and torch.equal(got.lora_b, want.lora_b)
        assert torch.equal(got.rank_offsets, want.rank_offsets) and torch.equal(got.scales, want.scales)
        return stack


def copied(layer: Layer) -> tuple[int, int]:
    return layer.buffers.rows_copied, layer.buffers.bytes_copied


def test_loading_copies_only_the_new_adapters_rows():
    layer = Layer()
    for i, rank in enumerate((16, 4, 2, 2, 8)):  # 30 rows: the first allocation's free rows take them
        layer.slots.append(factors(rank, seed=i) if i != 2 else None)  # slot 2 absent from this layer
        rows_before, bytes_before = copied(layer)
        layer.check()
        rows, nbytes = copied(layer)
        added = 0 if i == 2 else rank
        assert rows - rows_before == added and nbytes - bytes_before == added * ROW_BYTES
    assert layer.buffers.reallocations == 1  # the first load only: the free rows took the others


@pytest.mark.parametrize(("removed", "moved"), [(0, 0), (4, 0), (1, 4), (3, 6)])
def test_removing_moves_only_the_shorter_side(removed, moved):
    """Ranks 4, 8, 2, 16, 6: removing the first or last moves nothing, a middle one its shorter side."""
    layer = Layer()
    layer.slots = [factors(r, seed=i) for i, r in enumerate((4, 8, 2, 16, 6))]
    layer.check()
    before = copied(layer)
    del layer.slots[removed]
    stack = layer.check()
    assert copied(layer) == (before[0] + moved, before[1] + moved * ROW_BYTES)
    # and the outputs equal the naive loop's
    x = torch.randn(5, H_IN, generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.7, 0.3], [1.0, 0.5], [1.0, 0.0], [0.2, 0.8], [0.4, 0.6]])
    out = lora_dense(x, stack, build_metadata(ids, weights, len(layer.slots)), torch.zeros(5, H_OUT))
    naive = torch.zeros(5, H_OUT, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            a = int(ids[t, j])
            if a >= 0:
                A, B = (f.double() for f in layer.slots[a])
                naive[t] += float(weights[t, j]) * stack.scales[a] * (B @ (A @ x[t].double()))
    torch.testing.assert_close(out.double(), naive, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes_per_layout", [1, 3])
def test_any_mix_of_loads_evictions_and_updates_equals_a_full_rebuild(changes_per_layout):
    """Random removals (anywhere), appends and in-place updates; several between two packings too."""
    gen = torch.Generator().manual_seed(changes_per_layout)
    layer = Layer()
    for step in range(150):
        for change in range(changes_per_layout):
            draw = torch.rand(1, generator=gen).item()
            present = [s for s in layer.slots if s is not None]
            if layer.slots and (len(layer.slots) > 12 or draw < 0.4):
                del layer.slots[int(torch.randint(len(layer.slots), (1,), generator=gen))]
            elif present and draw > 0.9:
                with torch.no_grad():
                    present[int(torch.randint(len(present), (1,), generator=gen))][1].mul_(-1.0)
            else:
                rank = int(torch.randint(1, 40, (1,), generator=gen))
                absent = torch.rand(1, generator=gen).item() < 0.2
                layer.slots.append(None if absent else factors(rank, seed=1000 * change + step))
        layer.check()


def test_least_recently_used_churn_amortises_to_a_constant_per_added_row():
    """Evict the oldest, append a new one, many times: no re-copy of every adapter each time."""
    layer = Layer()
    layer.slots = [factors(8, seed=i) for i in range(20)]
    layer.check()
    start_rows, added = layer.buffers.rows_copied, 0
    for step in range(300):
        del layer.slots[0]
        layer.slots.append(factors(8, seed=100 + step))
        layer.check()
        added += 8
    copied_rows = layer.buffers.rows_copied - start_rows
    # a full repack per change would copy 20 * 8 rows each time (48,000 in all)
    assert copied_rows <= 4 * added, (copied_rows, added)
    assert layer.buffers.capacity <= 2 * (20 * 8) + MIN_FREE_ROWS


def test_an_in_place_update_recopies_that_adapters_rows_only():
    layer = Layer()
    layer.slots = [factors(r, seed=i) for i, r in enumerate((4, 8, 2))]
    layer.check()
    before = copied(layer)
    with torch.no_grad():
        layer.slots[1][0].add_(1.0)  # an optimizer step on adapter 1's A
    layer.check()
    assert copied(layer) == (before[0] + 8, before[1] + 8 * ROW_BYTES)


def test_growth_and_shrink_reallocate_and_stay_equal():
    layer = Layer()
    for i in range(40):  # 40 x rank 16 = 640 rows: beyond the first capacity several times
        layer.slots.append(factors(16, seed=i))
        layer.check()
    grown = layer.buffers.reallocations
    assert grown > 1
    while len(layer.slots) > 2:
        del layer.slots[len(layer.slots) // 2]
        layer.check()
    assert layer.buffers.reallocations > grown  # memory given back
    assert layer.buffers.capacity < 640
    layer.slots.clear()
    layer.check()
    assert layer.buffers.capacity == 0


def test_a_stale_stack_repacks_after_another_layout_used_the_buffers():
    layer = Layer()
    layer.slots = [factors(4, seed=0), factors(8, seed=1)]
    old = layer.check()
    layer.slots.append(factors(2, seed=2))
    layer.check()
    # the old layout's stack asks again (the bank never does this; the buffers stay right anyway)
    want = LoraStack(old.lora_a, old.lora_b, old.scales, H_IN, H_OUT).packed()
    assert torch.equal(old.packed().lora_a, want.lora_a)


def test_mixed_dtypes_fall_back_to_concatenation():
    layer = Layer()
    a, b = factors(4, seed=0)
    layer.slots = [(a, b), tuple(t.double() for t in factors(2, seed=1))]
    packed = layer.stack().packed()
    assert packed.lora_a.dtype == torch.float64 and layer.buffers.capacity == 0


def test_concurrent_callers_of_one_layout_get_the_same_rows():
    layer = Layer()
    layer.slots = [factors(r, seed=i) for i, r in enumerate((4, 8, 2, 16))]
    stacks = [layer.stack() for _ in range(8)]  # one per thread, as racing forwards of one layout
    results: list = [None] * len(stacks)
    barrier = threading.Barrier(len(stacks))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = stacks[i].packed()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    want = layer.stack(buffers=False).packed()
    assert all(torch.equal(r.lora_a, want.lora_a) and torch.equal(r.lora_b, want.lora_b) for r in results)
    assert layer.buffers.rows_copied == 30  # packed once


def test_the_buffers_are_plain_tensors_even_under_inference_mode():
    layer = Layer()
    layer.slots = [factors(4, seed=0)]
    with torch.inference_mode():
        packed = layer.stack().packed()
    assert not packed.lora_a.is_inference() and not packed.lora_a.requires_grad
    layer.slots.append(factors(2, seed=1))
    layer.check()  # updated in place outside inference mode: no "inference tensor" error


# -- on a model: the bank's loads and deletes -----------------------------------------------


def _packed_layers(model: moa.MixtureModel) -> dict[str, tuple]:
    """Every wrapped layer's packed buffers now (brought up to date), and its counters."""
    found = {}
    for layer in model.bank.layers():
        stack = layer.stack()
        packed = stack.packed()
        full = LoraStack(stack.lora_a, stack.lora_b, stack.scales, stack.in_features, stack.out_features).packed()
        assert torch.equal(packed.lora_a, full.lora_a) and torch.equal(packed.lora_b, full.lora_b)
        assert torch.equal(packed.rank_offsets, full.rank_offsets)
        found[layer.module_name] = (layer.packed_buffers.rows_copied, layer.packed_buffers.bytes_copied)
    return found


def _add(model: moa.MixtureModel, name: str, rank: int, targets: object = "all-linear") -> None:
    model.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))


@torch.no_grad()
def test_model_load_and_evict_copy_only_that_adapters_rows():
    torch.manual_seed(0)
    model = make_tiny_model(seed=0)
    for name, rank in (("a", 4), ("b", 8), ("c", 2), ("d", 16)):
        _add(model, name, rank)
    before = _packed_layers(model)

    _add(model, "e", 6, targets=["q_proj", "v_proj"])
    after = _packed_layers(model)
    for module, (rows, nbytes) in after.items():
        expected = 6 if module.endswith(("q_proj", "v_proj")) else 0
        assert rows - before[module][0] == expected, module

    model.delete_adapter("b")  # slot 1 of a, b, c, d, e: the 4 rows of "a" move
    evicted = _packed_layers(model)
    for module, (rows, _) in evicted.items():
        assert rows - after[module][0] == 4, module

    model.delete_adapter("e")  # the last one: nothing moves
    assert _packed_layers(model) == evicted

    # the model's answers equal a fresh model holding the same adapters (a full build)
    ids = random_input_ids(batch=3, seq_len=4, seed=5)
    weights = [{"a": 0.5, "c": 0.5}, {"d": 1.0}, {"a": 0.2, "c": 0.3, "d": 0.5}]
    got = model(ids, adapter_weights=weights).logits
    fresh = copy.deepcopy(model)  # a copy starts with empty buffers and packs from scratch
    assert all(layer.packed_buffers.capacity == 0 for layer in fresh.bank.layers())
    assert torch.equal(fresh(ids, adapter_weights=weights).logits, got)


def test_deleting_a_layers_last_adapter_frees_its_buffers():
    model = make_tiny_model(seed=0)
    _add(model, "only", 4, targets=["q_proj"])
    with torch.no_grad():
        _packed_layers(model)
    layer = next(layer for layer in model.bank.layers() if layer.module_name.endswith("q_proj"))
    assert layer.packed_buffers.capacity > 0
    model.delete_adapter("only")
    assert layer.packed_buffers.capacity == 0


def test_adapters_sharing_tensors_keep_their_own_rows():
    layer = Layer()
    shared = factors(4, seed=0)
    layer.slots = [shared, factors(8, seed=1), shared]
    layer.check()
    del layer.slots[0]
    layer.check()
    layer.slots.append(shared)
    layer.check()
    assert layer.buffers.live_rows == 16


def test_the_triton_kernels_read_the_buffers_at_their_offset():
    """After the first adapter left, the live rows start past row 0: Triton reads the views right."""
    pytest.importorskip("triton")
    from moa.kernels import reference as ref
    from moa.kernels import triton as tri

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)
    layer = Layer()
    layer.slots = [tuple(t.to(device) for t in factors(r, seed=i)) if r else None
                   for i, r in enumerate((4, 8, 0, 16, 2))]
    layer.stack().packed()
    del layer.slots[0]
    stack = layer.stack()
    assert stack.packed().lora_a.storage_offset() == 4 * H_IN  # moved, not repacked
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, H_IN, generator=gen).to(device)
    ids = torch.tensor([[0, 2], [3, -1], [2, 0], [3, 2], [0, -1], [2, 3], [0, 0]], dtype=torch.int32, device=device)
    weights = torch.rand(7, 2, generator=gen).to(device)
    meta = build_metadata(ids, weights, len(layer.slots))
    out = torch.zeros(7, H_OUT, device=device)
    want = ref.lora_expand(ref.lora_shrink(x, stack, meta), stack, meta, out.clone())
    got = tri.lora_expand(tri.lora_shrink(x, stack, meta), stack, meta, out.clone())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
