"""Agreement between predicted and actual changes: Pearson, Spearman (average ranks for ties) and sign agreement.

Torch only. Inputs are 1-D sequences of equal length (tensors, lists or numpy arrays) and are compared in
float64; results are Python floats. The paper reports Pearson correlations of predicted vs actual leave-one-out
changes of about 0.4–0.6 (``PAPER.md`` §4).

Taught in notebook 00 (section "Reading a validation plot"); used by every validation notebook and by
:func:`msif_lab.plots.scatter_predicted_vs_actual`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _pair(a, b, min_len: int = 2) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"expected two 1-D inputs of equal length, got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if len(a) < min_len:
        raise ValueError(f"need at least {min_len} pair(s), got {len(a)}.")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("inputs contain NaN or inf: remove or fix those entries first.")
    return a, b


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D sequences [n], in [-1, 1]; NaN if either is constant."""
    return _pearson(*_pair(a, b))


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n (float64 [n]) of a 1-D tensor [n]; tied values share the average of their ranks."""
    values, order = torch.sort(x, stable=True)
    new_group = torch.ones(len(x), dtype=torch.bool)
    new_group[1:] = values[1:] != values[:-1]
    group = torch.cumsum(new_group, 0) - 1
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = (sums / torch.bincount(group).to(torch.float64))[group]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D sequences [n] (Pearson of average ranks); NaN if either is constant."""
    a, b = _pair(a, b)
    return _pearson(average_ranks(a), average_ranks(b))


def sign_agreement(a, b) -> float:
    """Fraction of pairs whose signs agree (``sign(a_i) == sign(b_i)``; zero matches only zero), in [0, 1].

    For influence: the share of removals whose predicted direction (helps / hurts the test loss) is right.
    """
    a, b = _pair(a, b, min_len=1)
    return float((torch.sign(a) == torch.sign(b)).to(torch.float64).mean())
