"""Each merge strategy against an independent float64 reference written from its paper.

The references below loop over entries in plain Python (no shared helpers with
``moa.merge.strategies``), on random adapters of different ranks with mixed-sign weights.
"""

from __future__ import annotations

import pytest
import torch

from moa.merge import strategies as S
from moa.merge.strategies import MergeError
from tests.merge.references import ref_merge, ref_task_vectors

OUT, IN = 10, 12
RANKS = (2, 3, 5)
WEIGHTS = (0.9, -0.6, 0.45)


@pytest.fixture
def adapters():
    """Three random adapters of ranks 2, 3, 5 on a [10, 12] weight (float64)."""
    g = torch.Generator().manual_seed(7)
    lora_a = [torch.randn(r, IN, generator=g, dtype=torch.float64) for r in RANKS]
    lora_b = [torch.randn(OUT, r, generator=g, dtype=torch.float64) for r in RANKS]
    return lora_a, lora_b, list(WEIGHTS)


def best_rank_k_error(matrix, k):
    """Eckart-Young: the smallest possible ||M - M_k|| over rank-k matrices."""
    s = torch.linalg.svdvals(matrix)
    return float(s[k:].pow(2).sum().sqrt())


def rel(x, y):
    return float((x - y).norm() / y.norm())


def call(fn, lora_a, lora_b, weights, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(kw.pop("seed", 0)))
    return fn(lora_a, lora_b, weights, **kw)


# --- exact weighted sums -----------------------------------------------------------------


def test_cat_is_exactly_the_weighted_sum_at_the_summed_rank(adapters):
    a, b = call(S.cat, *adapters)
    expected = sum(ref_task_vectors(*adapters))
    assert a.shape == (sum(RANKS), IN) and b.shape == (OUT, sum(RANKS))
    assert rel(b @ a, expected) < 1e-14


def test_linear_is_exactly_the_weighted_sum_and_optimal_when_truncated(adapters):
    expected = sum(ref_task_vectors(*adapters))
    a, b = call(S.linear, *adapters)
    assert a.shape[0] == min(sum(RANKS), IN, OUT)
    assert rel(b @ a, expected) < 1e-12
    a4, b4 = call(S.linear, *adapters, rank=4)
    assert a4.shape == (4, IN) and b4.shape == (OUT, 4)
    assert float((b4 @ a4 - expected).norm()) == pytest.approx(best_rank_k_error(expected, 4), rel=1e-9)


def test_svd_default_rank_is_exact_and_smaller_ranks_are_optimal(adapters):
    expected = sum(ref_task_vectors(*adapters))
    a, b = call(S.svd, *adapters)
    assert rel(b @ a, expected) < 1e-12
    for k in (1, 3, 6):
        a, b = call(S.svd, *adapters, rank=k)
        assert torch.linalg.matrix_rank(b @ a) <= k
        assert float((b @ a - expected).norm()) == pytest.approx(best_rank_k_error(expected, k), rel=1e-9)


def test_linear_factors_is_peft_linear_with_cross_terms_not_the_weighted_sum():
    g = torch.Generator().manual_seed(3)
    lora_a = [torch.randn(4, IN, generator=g, dtype=torch.float64) for _ in range(3)]
    lora_b = [torch.randn(OUT, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [0.9, -0.6, 0.45]
    a, b = call(S.linear_factors, lora_a, lora_b, weights)
    root = [abs(w) ** 0.5 for w in weights]
    sign = [1.0 if w >= 0 else -1.0 for w in weights]
    with_cross_terms = sum(
        root[i] * sign[j] * root[j] * (lora_b[i] @ lora_a[j]) for i in range(3) for j in range(3)
    )
    weighted_sum = sum(ref_task_vectors(lora_a, lora_b, weights))
    assert rel(b @ a, with_cross_terms) < 1e-12  # what it documents it computes
    assert rel(b @ a, weighted_sum) > 0.3  # ... which is not the weighted sum
    la, lb = call(S.linear, lora_a, lora_b, weights)
    assert rel(lb @ la, weighted_sum) < 1e-12
    one_a, one_b = call(S.linear_factors, lora_a[:1], lora_b[:1], [0.5])  # one adapter: no cross terms
    assert rel(one_b @ one_a, 0.5 * lora_b[0] @ lora_a[0]) < 1e-14


# --- TIES, DARE, magnitude pruning against the references --------------------------------


@pytest.mark.parametrize(
    ("kind", "method"),
    [("ties", "total"), ("ties", "frequency"), ("dare_ties", "total"), ("dare_ties", "frequency"),
     ("dare_linear", "total"), ("magnitude_prune", "total")],
)
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dense_strategy_matches_the_paper_reference(adapters, kind, density, method):
    expected = ref_merge(kind, *adapters, density=density, method=method, seed=11)
    exact = getattr(S, kind)
    a, b = call(exact, *adapters, density=density, majority_sign_method=method, seed=11)
    assert a.shape == (min(IN, OUT), IN)
    assert rel(b @ a, expected) < 1e-12  # exact at full rank
    truncated = getattr(S, f"{kind}_svd")
    a, b = call(truncated, *adapters, density=density, majority_sign_method=method, seed=11)
    k = min(sum(RANKS), IN, OUT)
    assert a.shape == (k, IN)
    assert float((b @ a - expected).norm()) == pytest.approx(best_rank_k_error(expected, k), rel=1e-9, abs=1e-12)
    a, b = call(truncated, *adapters, density=density, majority_sign_method=method, seed=11, rank=3)
    assert float((b @ a - expected).norm()) == pytest.approx(best_rank_k_error(expected, 3), rel=1e-9)


def test_ties_trims_elects_and_takes_the_disjoint_mean_on_a_hand_example():
    # one entry per column: agree / disagree (mass vs count differ) / all trimmed
    tau = [torch.tensor([[3.0, -1.0, 0.1]]), torch.tensor([[1.0, 0.5, 0.1]]), torch.tensor([[2.0, 0.6, 0.1]])]
    lora_a = [t.double() for t in tau]  # B = [[1]]: tau_i = B_i @ A_i
    lora_b = [torch.ones(1, 1, dtype=torch.float64)] * 3
    a, b = call(S.ties, lora_a, lora_b, [1.0, 1.0, 1.0], density=2 / 3, majority_sign_method="total")
    assert torch.allclose(b @ a, torch.tensor([[2.0, 0.55, 0.0]], dtype=torch.float64))
    a, b = call(S.ties, lora_a, lora_b, [1.0, 1.0, 1.0], density=2 / 3, majority_sign_method="frequency")
    assert torch.allclose(b @ a, torch.tensor([[2.0, 0.55, 0.0]], dtype=torch.float64))
    heavy = [torch.tensor([[3.0, -5.0, 0.1]]).double(), *lora_a[1:]]  # mass says -, count says +
    a, b = call(S.ties, heavy, lora_b, [1.0, 1.0, 1.0], density=2 / 3, majority_sign_method="total")
    assert torch.allclose(b @ a, torch.tensor([[2.0, -5.0, 0.0]], dtype=torch.float64))
    a, b = call(S.ties, heavy, lora_b, [1.0, 1.0, 1.0], density=2 / 3, majority_sign_method="frequency")
    assert torch.allclose(b @ a, torch.tensor([[2.0, 0.55, 0.0]], dtype=torch.float64))


def test_ties_depends_only_on_the_task_vectors_not_on_how_they_are_written(adapters):
    lora_a, lora_b, weights = adapters
    a1, b1 = call(S.ties, lora_a, lora_b, weights, density=0.4)
    flipped_b = [-lora_b[1] if i == 1 else b for i, b in enumerate(lora_b)]  # sign moved from weight into B
    flipped_w = [-w if i == 1 else w for i, w in enumerate(weights)]
    a2, b2 = call(S.ties, lora_a, flipped_b, flipped_w, density=0.4)
    assert rel(b2 @ a2, b1 @ a1) < 1e-12


def test_dare_same_seed_same_masks_other_seed_other_masks_and_rescaled(adapters):
    first = call(S.dare_linear, *adapters, density=0.4, seed=5)
    again = call(S.dare_linear, *adapters, density=0.4, seed=5)
    other = call(S.dare_linear, *adapters, density=0.4, seed=6)
    assert torch.equal(first[1] @ first[0], again[1] @ again[0])
    assert rel(other[1] @ other[0], first[1] @ first[0]) > 0.1
    tau = torch.ones(200, 300, dtype=torch.float64)
    dropped = S.dare_drop(tau, 0.25, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert float(kept.double().mean()) == pytest.approx(0.25, abs=0.01)
    assert torch.all(dropped[kept] == 4.0)  # survivors rescaled by 1 / (1 - p)
    assert float(dropped.mean()) == pytest.approx(1.0, abs=0.04)  # unbiased in expectation


def test_float32_inputs_compute_in_float32_and_match_float64(adapters):
    lora_a, lora_b, weights = adapters
    a64, b64 = call(S.ties_svd, lora_a, lora_b, weights, density=0.5, rank=4)
    a32, b32 = call(S.ties_svd, [a.float() for a in lora_a], [b.float() for b in lora_b], weights, density=0.5, rank=4)
    assert a32.dtype == torch.float32
    assert rel((b32 @ a32).double(), b64 @ a64) < 1e-4


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (S.ties, {}, r"needs density in \(0, 1\]"),
        (S.dare_linear, {"density": 0.0}, "needs density"),
        (S.magnitude_prune_svd, {"density": 1.5}, "needs density"),
        (S.ties, {"density": 0.5, "majority_sign_method": "mean"}, "Unknown majority_sign_method 'mean'"),
        (S.svd, {"rank": 0}, "rank must be a positive integer"),
        (S.cat, {"rank": 3}, "'cat' produces rank 10"),
        (S.linear_factors, {}, "needs adapters of equal rank"),
    ],
)
def test_bad_options_raise_merge_error(adapters, fn, kwargs, match):
    with pytest.raises(MergeError, match=match):
        fn(*adapters, **kwargs)


def test_mismatched_shapes_raise_merge_error(adapters):
    lora_a, lora_b, weights = adapters
    with pytest.raises(MergeError, match="do not form a low-rank update"):
        S.linear([lora_a[0], lora_a[1][:, :5]], lora_b[:2], weights[:2])
    with pytest.raises(MergeError, match="one weight per adapter"):
        S.linear(lora_a, lora_b, weights[:2])
