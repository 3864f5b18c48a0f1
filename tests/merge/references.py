"""Independent float64 references of the merge methods, written from their papers.

They loop over entries in plain Python and share no code with ``moa.merge.strategies``.
"""

from __future__ import annotations

import itertools

import torch


def ref_task_vectors(lora_a, lora_b, weights):
    return [w * (b @ a) for a, b, w in zip(lora_a, lora_b, weights)]


def ref_trim(tau, density):
    """TIES trim: keep the int(density * n) largest magnitudes (threshold on the sorted list)."""
    values = tau.flatten().tolist()
    k = int(density * len(values))
    if density >= 1.0:
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    threshold = sorted((abs(v) for v in values), reverse=True)[k - 1]
    return torch.tensor([v if abs(v) >= threshold else 0.0 for v in values], dtype=torch.float64).view_as(tau)


def ref_dare(taus, density, seed):
    """DARE: masks drawn exactly as documented, then drop and rescale by 1/(1-p)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for tau in taus:
        mask = torch.bernoulli(torch.full(tuple(tau.shape), density, dtype=torch.float32), generator=g).double()
        out.append(tau * mask / (1.0 - (1.0 - density)))
    return out


def ref_elect_and_disjoint_mean(taus, method):
    """TIES: elect the sign per entry (by mass or by count), average the agreeing entries."""
    merged = torch.zeros_like(taus[0])
    for idx in itertools.product(*(range(n) for n in taus[0].shape)):
        values = [float(t[idx]) for t in taus]
        if method == "total":
            score = sum(values)
        else:
            score = sum(1 for v in values if v > 0) - sum(1 for v in values if v < 0)
        sign = 1.0 if score >= 0 else -1.0
        agree = [v for v in values if v != 0 and (v > 0) == (sign > 0)]
        merged[idx] = sum(agree) / len(agree) if agree else 0.0
    return merged


def ref_merge(kind, lora_a, lora_b, weights, density, method="total", seed=0):
    taus = ref_task_vectors(lora_a, lora_b, weights)
    if kind == "ties":
        return ref_elect_and_disjoint_mean([ref_trim(t, density) for t in taus], method)
    if kind == "magnitude_prune":
        return sum(ref_trim(t, density) for t in taus)
    if kind == "dare_linear":
        return sum(ref_dare(taus, density, seed))
    if kind == "dare_ties":
        return ref_elect_and_disjoint_mean(ref_dare(taus, density, seed), method)
    raise AssertionError(kind)
