"""Merge strategies: pure tensor functions that combine low-rank adapters on one module.

Every strategy has ONE signature, the contract a plugin implements and registers with
the ``moa_merge_strategies`` hook (as a :class:`~moa.plugin.records.MergeStrategySpec`)::

    def strategy(
        lora_a: Sequence[Tensor],        # A_i  [r_i, in_features]   (ranks may differ)
        lora_b: Sequence[Tensor],        # B_i  [out_features, r_i]
        weights: Sequence[float],        # w_i = user weight x adapter i's scale on this module
        *,
        rank: int | None = None,         # rank of the result; None = the strategy's default
        density: float | None = None,    # fraction kept by trimming / dropping strategies
        majority_sign_method: str = "total",   # "total" or "frequency" (TIES sign election)
        generator: torch.Generator | None = None,  # CPU generator for random strategies (None: seed 0)
    ) -> tuple[Tensor, Tensor]:          # (A [r, in_features], B [out_features, r])

Adapter ``i`` changes the module's weight by its *task vector* ``tau_i = w_i * B_i @ A_i``
(the scale is folded into ``w_i`` by the caller). The returned factors describe the merged
adapter, whose weight change is ``B @ A`` (scale 1). Every function is called with all
keyword arguments and ignores the ones it does not use. Computation is in float64 when
any input is float64, else float32.

Strategies, what ``B @ A`` of the result is, the default rank, and whether it is exact:

* ``cat``: ``sum_i tau_i`` with the factors stacked (``A = [w_1 A_1; ...]``,
  ``B = [B_1, ...]``); rank ``sum r_i``. **Exact.**
* ``linear``: ``sum_i tau_i`` re-factorised from the factors (QR + small SVD); rank
  ``min(sum r_i, in, out)``. **Exact** at that default; a smaller ``rank`` gives the best
  rank-k approximation (Eckart-Young), the same as ``svd`` at that rank.
* ``svd``: truncated SVD of the dense ``sum_i tau_i``; default rank ``min(sum r_i, in, out)``
  (**exact**); PEFT's default is ``max r_i`` (approximate).
* ``linear_factors``: PEFT's ``linear``: ``A = sum_i sign(w_i) sqrt|w_i| A_i``,
  ``B = sum_i sqrt|w_i| B_i``; equal ranks, rank ``r``. **Not** ``sum_i tau_i``: it adds the
  cross terms ``sqrt|w_i w_j| sign(w_j) B_i A_j`` for ``i != j``.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merged dense delta
  (definitions below), factorised at full rank ``min(in, out)``. **Exact** (a trimmed or
  dropped delta is sparse, hence generally full rank); a given ``rank`` truncates.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same
  merged delta, truncated SVD at ``rank`` (default ``min(sum r_i, in, out)``). Approximate.

"Exact" means ``B @ A`` equals the merged weight change up to floating-point rounding.
``linear`` and ``cat`` are what a user means by "weighted sum of adapters". PEFT's
``linear`` combines the A's and the B's separately (with ``sqrt`` weights); that is cheap
but is not the weighted sum of the updates (``(sum a_i A_i)(sum b_j B_j)`` has the cross
terms), which is why moa offers it only under the explicit name ``linear_factors``.

Definitions (``k = int(density * numel)`` as in PEFT; signs of 0 elect ``+``):

* trim (TIES, Yadav et al. 2023): keep the ``k`` entries of ``tau_i`` largest in magnitude.
* DARE (Yu et al. 2023): drop each entry of ``tau_i`` with probability ``p = 1 - density``
  and rescale the kept ones by ``1 / (1 - p)``. The masks are drawn on the CPU, one
  ``torch.bernoulli(torch.full(tau_i.shape, density, dtype=float32), generator=g)`` per
  adapter in order, so the same seed gives the same masks on any device.
* sign election: ``gamma = sign(sum_i tau_i)`` (``"total"``: by mass) or
  ``sign(sum_i sign(tau_i))`` (``"frequency"``: by count), on the trimmed/dropped vectors.
* disjoint mean: the mean of the entries that agree with ``gamma`` (zeros excluded).

The weights act on the task vectors *before* the election, so a merge depends only on
``w_i * B_i @ A_i``: moving a factor between an adapter's ``lora_alpha`` and its merge
weight changes nothing, and a negative weight (subtracting an adapter) takes part in the
election with its actual sign. PEFT elects on the unweighted vectors and weights after,
which agrees with this for positive weights when they are all equal or the method is
``"frequency"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moa.errors import MoaError

MAJORITY_SIGN_METHODS = ("total", "frequency")


class MergeError(MoaError, ValueError):
    """A merge that cannot be done as asked (bad names, weights, strategy or options)."""


# --- helpers -----------------------------------------------------------------------------


def _prepare(
    lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], weights: Sequence[float]
) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Check shapes and cast the factors to the compute dtype."""
    if not lora_a or len(lora_a) != len(lora_b) or len(lora_a) != len(weights):
        raise MergeError(
            f"A merge needs one A, one B and one weight per adapter; got {len(lora_a)} A, "
            f"{len(lora_b)} B and {len(weights)} weights."
        )
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in [*lora_a, *lora_b]) else torch.float32
    in_f, out_f = lora_a[0].shape[1], lora_b[0].shape[0]
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or b.shape[1] != a.shape[0]:
            raise MergeError(
                f"Adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form a low-rank "
                f"update of a [{out_f}, {in_f}] weight (need A [r, {in_f}], B [{out_f}, r])."
            )
    device = lora_a[0].device
    cast = [t.detach().to(device=device, dtype=dtype) for t in lora_a], [
        t.detach().to(device=device, dtype=dtype) for t in lora_b
    ]
    return cast[0], cast[1], [float(w) for w in weights]


def _check_rank(rank: int | None) -> None:
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise MergeError(f"rank must be a positive integer or None; got {rank!r}.")


def _check_density(density: float | None, strategy: str) -> float:
    if density is None or not 0.0 < float(density) <= 1.0:
        raise MergeError(
            f"Strategy {strategy!r} needs density in (0, 1] (the fraction of each task vector "
            f"kept); got {density!r}. The TIES paper keeps 0.2; DARE typically keeps 0.1-0.3."
        )
    return float(density)


def _pad(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors of rank ``< rank`` up to ``rank`` (no change to ``B @ A``)."""
    missing = rank - a.shape[0]
    if missing <= 0:
        return a[:rank], b[:, :rank]
    a = torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
    return a, b


def factorise(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A [rank, in], B [out, rank])`` with ``B @ A`` the best rank-``rank`` approximation.

    Truncated SVD ``U S V^T``; the singular values are split evenly (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``). Exact when ``rank >= min(out, in)``; zero-padded above that.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return _pad(root[:, None] * vh[:rank], u[:, :rank] * root[None, :], rank)


def refactorise(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Re-factorise ``B @ A`` (given as factors, ``A [R, in]``, ``B [out, R]``) at ``rank``.

    Works on the factors only (QR of ``B`` and ``A^T``, SVD of the small core), never
    forming the dense product. Exact when ``rank >= rank(B @ A)``; otherwise the best
    rank-``rank`` approximation (the same as :func:`factorise` of the dense product).
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    root = s[:rank].sqrt()
    return _pad(root[:, None] * (vh[:rank] @ q_a.T), (q_b @ u[:, :rank]) * root[None, :], rank)


def _default_sum_rank(lora_a: Sequence[Tensor], rank: int | None, in_f: int, out_f: int) -> int:
    return rank if rank is not None else min(sum(a.shape[0] for a in lora_a), in_f, out_f)


def task_vectors(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """The dense task vectors ``tau_i = w_i * B_i @ A_i``, stacked ``[n, out, in]``."""
    return torch.stack([w * (b @ a) for a, b, w in zip(lora_a, lora_b, weights)])


def trim_top_magnitude(tensor: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries largest in magnitude; zero the rest."""
    if density >= 1.0:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def dare_drop(tensor: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: drop each entry with probability ``1 - density``, rescale the kept by ``1/density``."""
    mask = torch.bernoulli(torch.full(tuple(tensor.shape), density, dtype=torch.float32), generator=generator)
    return tensor * mask.to(device=tensor.device, dtype=tensor.dtype) / density


def elect_sign(stacked: Tensor, method: str) -> Tensor:
    """TIES sign election over ``stacked`` ``[n, ...]``: ``+1``/``-1`` per entry (0 elects +1)."""
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise MergeError(
            f"Unknown majority_sign_method {method!r}. Choices: {', '.join(MAJORITY_SIGN_METHODS)}."
        )
    return torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: Tensor, sign: Tensor) -> Tensor:
    """Mean over ``dim 0`` of the entries whose sign equals ``sign`` (zeros never count)."""
    agree = (stacked.sign() == sign).to(stacked.dtype)
    return (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


# --- exact low-rank strategies -----------------------------------------------------------


def cat(
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stack the adapters: ``A = [w_1 A_1; w_2 A_2; ...]``, ``B = [B_1, B_2, ...]``. Exact.

    The rank is the sum of the ranks; ``rank`` must be ``None`` or that sum.
    """
    _check_rank(rank)
    a_list, b_list, w = _prepare(lora_a, lora_b, weights)
    total = sum(a.shape[0] for a in a_list)
    if rank is not None and rank != total:
        raise MergeError(
            f"'cat' produces rank {total} (the sum of the ranks) and cannot give rank {rank}. "
            f"Use strategy 'linear' or 'svd' for another rank."
        )
    return torch.cat([wi * a for wi, a in zip(w, a_list)], dim=0), torch.cat(b_list, dim=1)


def linear(
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The weighted sum of the updates, ``sum_i w_i B_i A_i``, re-factorised from the factors.

    Exact at the default rank ``min(sum r_i, in, out)``; a smaller ``rank`` gives the best
    rank-``rank`` approximation. Not PEFT's ``linear`` (see :func:`linear_factors`).
    """
    _check_rank(rank)
    a_cat, b_cat = cat(lora_a, lora_b, weights)
    return refactorise(a_cat, b_cat, _default_sum_rank(lora_a, rank, a_cat.shape[1], b_cat.shape[0]))


def linear_factors(
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """PEFT's ``linear``: combine the A's and the B's separately. NOT the weighted sum.

    ``A = sum_i sign(w_i) sqrt|w_i| A_i``, ``B = sum_i sqrt|w_i| B_i``, so
    ``B @ A = sum_i w_i B_i A_i + sum_{i != j} sqrt|w_i| sign(w_j) sqrt|w_j| B_i A_j``:
    the cross terms make it differ from :func:`linear` unless there is one adapter.
    Needs equal ranks; ``rank`` must be ``None`` or that rank.
    """
    a_list, b_list, w = _prepare(lora_a, lora_b, weights)
    ranks = {a.shape[0] for a in a_list}
    if len(ranks) != 1 or (rank is not None and rank not in ranks):
        raise MergeError(
            f"'linear_factors' needs adapters of equal rank and keeps that rank; got ranks "
            f"{[a.shape[0] for a in a_list]} and rank={rank!r}. Use 'linear' or 'cat' instead."
        )
    roots = [math.sqrt(abs(wi)) for wi in w]
    a = torch.stack([math.copysign(r, wi) * ai for r, wi, ai in zip(roots, w, a_list)]).sum(dim=0)
    b = torch.stack([r * bi for r, bi in zip(roots, b_list)]).sum(dim=0)
    return a, b


def svd(
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Truncated SVD of the dense weighted sum ``sum_i w_i B_i A_i`` (as PEFT's ``svd``).

    Default rank ``min(sum r_i, in, out)`` (exact); PEFT's default is ``max r_i``.
    """
    _check_rank(rank)
    a_list, b_list, w = _prepare(lora_a, lora_b, weights)
    delta = task_vectors(a_list, b_list, w).sum(dim=0)
    return factorise(delta, _default_sum_rank(a_list, rank, delta.shape[1], delta.shape[0]))


# --- dense-delta strategies (TIES, DARE, magnitude pruning) ------------------------------


def _dense_merge(kind: str, truncate: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """Build the strategy ``kind`` (optionally the ``_svd`` variant) from the dense helpers."""

    def strategy(
        lora_a: Sequence[Tensor],
        lora_b: Sequence[Tensor],
        weights: Sequence[float],
        *,
        rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        _check_rank(rank)
        name = f"{kind}_svd" if truncate else kind
        kept = _check_density(density, name)
        if kind in ("ties", "dare_ties") and majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise MergeError(
                f"Unknown majority_sign_method {majority_sign_method!r}. Choices: "
                f"{', '.join(MAJORITY_SIGN_METHODS)}."
            )
        a_list, b_list, w = _prepare(lora_a, lora_b, weights)
        tau = task_vectors(a_list, b_list, w)
        if kind in ("ties", "magnitude_prune"):
            tau = torch.stack([trim_top_magnitude(t, kept) for t in tau])
        else:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            tau = torch.stack([dare_drop(t, kept, gen) for t in tau])
        if kind in ("ties", "dare_ties"):
            delta = disjoint_mean(tau, elect_sign(tau, majority_sign_method))
        else:
            delta = tau.sum(dim=0)
        out_f, in_f = delta.shape
        default = _default_sum_rank(a_list, None, in_f, out_f) if truncate else min(in_f, out_f)
        return factorise(delta, rank if rank is not None else default)

    strategy.__name__ = strategy.__qualname__ = f"{kind}_svd" if truncate else kind
    return strategy


ties = _dense_merge("ties", truncate=False)
ties.__doc__ = """TIES (trim, elect sign, disjoint mean) on the task vectors; exact at rank min(in, out)."""
ties_svd = _dense_merge("ties", truncate=True)
ties_svd.__doc__ = """TIES, truncated SVD at ``rank`` (default ``min(sum r_i, in, out)``); approximate."""
dare_linear = _dense_merge("dare_linear", truncate=False)
dare_linear.__doc__ = """DARE drop-and-rescale, then the sum; exact at rank min(in, out)."""
dare_linear_svd = _dense_merge("dare_linear", truncate=True)
dare_linear_svd.__doc__ = """DARE + sum, truncated SVD at ``rank``; approximate."""
dare_ties = _dense_merge("dare_ties", truncate=False)
dare_ties.__doc__ = """DARE, then TIES sign election and disjoint mean; exact at rank min(in, out)."""
dare_ties_svd = _dense_merge("dare_ties", truncate=True)
dare_ties_svd.__doc__ = """DARE + TIES election, truncated SVD at ``rank``; approximate."""
magnitude_prune = _dense_merge("magnitude_prune", truncate=False)
magnitude_prune.__doc__ = """Trim each task vector to its top-density magnitudes, then sum; exact at min(in, out)."""
magnitude_prune_svd = _dense_merge("magnitude_prune", truncate=True)
magnitude_prune_svd.__doc__ = """Magnitude pruning + sum, truncated SVD at ``rank``; approximate."""


#: Built-in strategies: name -> (function, one-line description for ``moa plugins``).
BUILTIN_STRATEGIES: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], str]] = {
    "cat": (cat, "stack the adapters' factors; exact weighted sum at the summed rank"),
    "linear": (linear, "exact weighted sum of the updates, re-factorised (QR+SVD) at a chosen rank"),
    "linear_factors": (linear_factors, "PEFT's 'linear': A's and B's combined separately (adds cross terms)"),
    "svd": (svd, "truncated SVD of the weighted sum of the updates"),
    "ties": (ties, "TIES: trim, elect sign, disjoint mean; exact (full rank)"),
    "ties_svd": (ties_svd, "TIES, truncated SVD to a chosen rank"),
    "dare_linear": (dare_linear, "DARE drop-and-rescale, then sum; exact (full rank)"),
    "dare_linear_svd": (dare_linear_svd, "DARE + sum, truncated SVD to a chosen rank"),
    "dare_ties": (dare_ties, "DARE, then TIES election and disjoint mean; exact (full rank)"),
    "dare_ties_svd": (dare_ties_svd, "DARE + TIES, truncated SVD to a chosen rank"),
    "magnitude_prune": (magnitude_prune, "trim each update to its largest entries, then sum; exact (full rank)"),
    "magnitude_prune_svd": (magnitude_prune_svd, "magnitude pruning + sum, truncated SVD to a chosen rank"),
}

__all__ = [
    "BUILTIN_STRATEGIES",
    "MAJORITY_SIGN_METHODS",
    "MergeError",
    "cat",
    "dare_drop",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "disjoint_mean",
    "elect_sign",
    "factorise",
    "linear",
    "linear_factors",
    "magnitude_prune",
    "magnitude_prune_svd",
    "refactorise",
    "svd",
    "task_vectors",
    "ties",
    "ties_svd",
    "trim_top_magnitude",
]
