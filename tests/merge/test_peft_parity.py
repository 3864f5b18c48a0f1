"""moa's merges vs ``peft``'s ``add_weighted_adapter`` on the same adapters.

Where PEFT is correct, the two agree. Where PEFT differs, or has differed in some releases,
moa is checked against the float64 reference alone, so that a PEFT release that fixes (or
changes) its behaviour never breaks these tests:

* ``use_rslora`` adapters (PEFT issues #3449, #3761, fixed in later releases): the merged
  config inherited ``use_rslora`` while its ``lora_alpha`` was set to ``r``, so every
  combination came out ``sqrt(new_rank)`` times too large.
* ``linear``, ``ties``, ``dare_*``, ``magnitude_prune`` without ``_svd`` (#1155, #3013):
  PEFT combines the A's and the B's separately, so the result is not the weighted sum
  (cross terms) nor TIES/DARE of the weight updates. moa's ``linear_factors`` reproduces
  PEFT's ``linear`` on purpose and is documented as such.
* TIES elections with a negative weight: PEFT elects the sign on the unweighted updates, so
  writing the same update as ``(-B, +w)`` instead of ``(B, -w)`` changes its result.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import moa
from moa.merge import strategies as S
from moa.testing.fixtures import make_tiny_base
from tests.merge.references import ref_merge

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
ADAPTERS = {  # name: (r, lora_alpha, use_rslora, seed)
    "a": (4, 8, False, 1),
    "b": (8, 4, False, 2),
    "c": (4, 2, False, 3),
    "ra": (4, 8, True, 4),
    "rb": (8, 4, True, 5),
}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A moa model with five random adapters, each also saved as a PEFT folder."""
    base = make_tiny_base()
    model = moa.MixtureModel(copy.deepcopy(base))
    folders = {}
    for name, (r, alpha, rslora, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        config = moa.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                                init_lora_weights=False)
        model.add_adapter(name, config)
        folders[name] = tmp_path_factory.mktemp("peft") / name
        model.save_adapter(name, folders[name])
    return base, model, folders


def peft_merge(bank, names, weights, combination_type, **kwargs):
    """Load ``names`` into a fresh PeftModel and merge them; return {module: delta}."""
    base, model, folders = bank
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    inner = peft_model.base_model.model
    return {m: inner.get_submodule(m).get_delta_weight("merged").detach().double() for m in modules(model)}


def moa_merge(bank, names, weights, strategy, **kwargs):
    """Merge with moa into a new adapter; return {module: delta} and remove it again."""
    _, model, _ = bank
    new = moa.merge_adapters(model, names, weights, strategy, new_name="moa_merged", **kwargs)
    try:
        return {m: layer.delta_weight().detach().double() for m, layer in model.adapter_layers(new).items()}
    finally:
        model.delete_adapter(new)


def modules(model):
    return sorted(model.adapter_layers("a"))


def factors(bank, names, module):
    """float64 (A_i, B_i, scale_i) of each adapter on ``module``."""
    _, model, _ = bank
    out = []
    for name in names:
        a, b, scale = model.adapter_layers(name)[module].low_rank()
        out.append((a.detach().double(), b.detach().double(), float(scale)))
    return out


def reference(bank, names, weights, kind="sum", **kwargs):
    """float64 reference per module: the weighted sum, or a TIES/DARE/prune merge of the updates."""
    result = {}
    for module in modules(bank[1]):
        fs = factors(bank, names, module)
        lora_a, lora_b = [f[0] for f in fs], [f[1] for f in fs]
        scaled = [w * f[2] for w, f in zip(weights, fs)]
        if kind == "sum":
            result[module] = sum(w * (b @ a) for a, b, w in zip(lora_a, lora_b, scaled))
        else:
            result[module] = ref_merge(kind, lora_a, lora_b, scaled, **kwargs)
    return result


def max_rel(x, y):
    return max(float((x[m] - y[m]).norm() / y[m].norm()) for m in y)


# --- where PEFT is right, moa agrees -----------------------------------------------------


@pytest.mark.parametrize(
    ("peft_type", "ours", "names", "weights", "options"),
    [
        ("cat", "cat", ["a", "b"], [0.7, -0.3], {}),
        ("svd", "svd", ["a", "b"], [0.7, -0.3], {"rank": 6}),
        ("svd", "svd", ["a", "b", "c"], [0.5, 0.2, 0.3], {"rank": 16}),
        ("linear", "linear_factors", ["a", "c"], [0.7, -0.3], {}),
        ("ties_svd", "ties_svd", ["a", "b"], [0.5, 0.5], {"rank": 12, "density": 0.3}),
        ("ties_svd", "ties_svd", ["a", "b"], [0.1, 0.9],
         {"rank": 12, "density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune_svd", "magnitude_prune_svd", ["a", "b"], [0.7, -0.3], {"rank": 12, "density": 0.3}),
    ],
)
def test_same_result_as_peft(bank, peft_type, ours, names, weights, options):
    peft_options = {k: v for k, v in options.items() if k != "rank"}
    if "rank" in options:
        peft_options["svd_rank"] = options["rank"]
    theirs = peft_merge(bank, names, weights, peft_type, **peft_options)
    mine = moa_merge(bank, names, weights, ours, **options)
    assert max_rel(mine, theirs) < 1e-5


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_same_masks_and_result_as_peft_merge_utils_for_the_same_seed(bank, kind):
    from peft.utils import merge_utils

    module = modules(bank[1])[0]
    fs = factors(bank, ["a", "b"], module)
    deltas = [(f[2] * f[1] @ f[0]).float() for f in fs]  # what PEFT's get_delta_weight gives
    weights = [0.6, 0.6]
    torch.manual_seed(123)
    if kind == "dare_linear":
        theirs = merge_utils.dare_linear(deltas, torch.tensor(weights), density=0.3)
    else:
        theirs = merge_utils.dare_ties(deltas, torch.tensor(weights), density=0.3, majority_sign_method="total")
    scaled = [w * f[2] for w, f in zip(weights, fs)]
    a, b = getattr(S, kind)([f[0].float() for f in fs], [f[1].float() for f in fs], scaled, density=0.3,
                            generator=torch.Generator().manual_seed(123))
    assert float((b @ a - theirs).norm() / theirs.norm()) < 1e-5


# --- where PEFT differs (or has differed), moa matches the independent reference ----------


@pytest.mark.parametrize(("peft_type", "ours", "options"), [("cat", "cat", {}), ("svd", "svd", {"rank": 12})])
def test_rslora_merge_is_exact_and_peft_is_exact_or_its_known_sqrt_rank_overscale(bank, peft_type, ours, options):
    names, weights = ["ra", "rb"], [0.7, 0.3]
    expected = reference(bank, names, weights)
    mine = moa_merge(bank, names, weights, ours, **options)
    assert max_rel(mine, expected) < 1e-5  # moa against the float64 weighted sum, whatever PEFT does
    peft_options = {"svd_rank": options["rank"]} if "rank" in options else {}
    theirs = peft_merge(bank, names, weights, peft_type, **peft_options)
    ratios = {float(theirs[m].norm() / expected[m].norm()) for m in expected}
    # PEFT releases before the fix (issues #3449, #3761) scale by alpha/sqrt(r) with alpha = r: sqrt(12)
    # times too large. Where PEFT is exact, moa must match it too; any third behaviour is a new PEFT change.
    if all(r == pytest.approx(1.0, rel=1e-4) for r in ratios):
        assert max_rel(mine, theirs) < 1e-5
    else:
        assert all(r == pytest.approx(math.sqrt(12), rel=1e-4) for r in ratios), ratios


def test_linear_is_the_weighted_sum_and_linear_factors_is_peft_linear(bank):
    names, weights = ["a", "c"], [0.7, -0.3]
    expected = reference(bank, names, weights)
    assert max_rel(moa_merge(bank, names, weights, "linear"), expected) < 1e-5
    factorwise = moa_merge(bank, names, weights, "linear_factors")
    assert max_rel(factorwise, expected) > 0.1  # combining A's and B's separately adds cross terms B_a A_c, B_c A_a
    # linear_factors is documented as PEFT's "linear" (of the installed release), so it must still be that
    assert max_rel(factorwise, peft_merge(bank, names, weights, "linear")) < 1e-5


@pytest.mark.parametrize(
    ("kind", "options"),
    [("ties", {"density": 0.3}), ("magnitude_prune", {"density": 0.3}), ("dare_linear", {"density": 1.0})],
)
def test_ties_dare_prune_apply_the_paper_to_the_updates(bank, kind, options):
    # PEFT applies these to the A and B factors separately (#1155, #3013); moa follows the
    # papers, on the updates, and is checked against the float64 reference alone.
    names, weights = ["a", "c"], [0.5, 0.5]
    expected = reference(bank, names, weights, kind=kind, seed=0, **options)
    mine = moa_merge(bank, names, weights, kind, **options)
    assert max_rel(mine, expected) < 1e-5


def test_ties_does_not_depend_on_where_the_sign_is_written(bank, tmp_path):
    base, model, folders = bank
    b = model.adapter_layers("b")
    neg = copy.deepcopy(model.peft_config["b"])
    model.add_adapter("b_neg", neg)  # the same update as b, with B negated
    for module, layer in model.adapter_layers("b_neg").items():
        with torch.no_grad():
            layer.lora_A.weight.copy_(b[module].lora_A.weight)
            layer.lora_B.weight.copy_(-b[module].lora_B.weight)
    folders["b_neg"] = tmp_path / "b_neg"
    model.save_adapter("b_neg", folders["b_neg"])
    try:
        options = {"rank": 12, "density": 0.5}
        mine_1 = moa_merge(bank, ["a", "b"], [0.5, -0.5], "ties_svd", **options)
        mine_2 = moa_merge(bank, ["a", "b_neg"], [0.5, 0.5], "ties_svd", **options)
        assert max_rel(mine_1, mine_2) < 1e-5  # same task vectors, same merge
        expected = reference(bank, ["a", "b"], [0.5, -0.5], kind="ties", density=0.5)
        exact = moa_merge(bank, ["a", "b"], [0.5, -0.5], "ties", density=0.5)
        assert max_rel(exact, expected) < 1e-5
        theirs = peft_merge(bank, ["a", "b_neg"], [0.5, 0.5], "ties_svd", svd_rank=12, density=0.5)
        assert max_rel(theirs, mine_2) < 1e-5  # with positive weights PEFT and moa agree
    finally:
        model.delete_adapter("b_neg")
