"""The re-run harness: predicted vs actual change of finetuning test losses when pretraining examples are removed.

For each chosen pretraining example z_i: give it weight 0 (ε = −1/m, keeping the 1/m normalisation, exactly the
perturbation the influence score linearises), re-run pretraining and then finetuning warm-started from the
original optima to the same tight tolerance, and record the change of every test loss. The *noise floor* is the
same re-run with nothing removed: for a truly tight optimum it is ~0, and any actual change below it is optimiser
noise, not the removal.

Re-runs are cached by content (the trained parameters, the data, the removed index, the fit settings), so a
notebook re-executes quickly.

Taught in notebook 03 (and used by 04–09).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metrics import pearson, sign_agreement, spearman
from .stages import Params, TwoStage
from .train import finetune, pretrain


def choose_removals(scores: Tensor, n_top: int, n_random: int = 0, seed: int = 0) -> Tensor:
    """Pretraining indices to remove: the ``n_top`` largest |score| split between both signs, plus random others.

    ``scores`` is [m] or [T, m] (summed over test points). Half of ``n_top`` are the most positive (harmful)
    scores and half the most negative (helpful), so the validation covers both signs. Returns int64 [k], unique.
    """
    s = (scores if scores.dim() == 1 else scores.sum(0)).detach().cpu()
    m = len(s)
    if n_top + n_random > m:
        raise ValueError(f"Asked for {n_top} + {n_random} removals but there are only {m} pretraining examples.")
    order = torch.argsort(s, descending=True)
    harmful, helpful = order[: (n_top + 1) // 2], order.flip(0)[: n_top // 2]
    chosen = torch.unique(torch.cat([harmful, helpful]), sorted=False)
    if len(chosen) < n_top:  # overlapping halves (m small)
        rest = [i for i in torch.argsort(s.abs(), descending=True).tolist() if i not in set(chosen.tolist())]
        chosen = torch.cat([chosen, torch.tensor(rest[: n_top - len(chosen)], dtype=torch.long)])
    if n_random:
        g = torch.Generator().manual_seed(seed)
        taken = set(chosen.tolist())
        pool = torch.tensor([i for i in range(m) if i not in taken], dtype=torch.long)
        chosen = torch.cat([chosen, pool[torch.randperm(len(pool), generator=g)[:n_random]]])
    return chosen.long()


@dataclass
class Validation:
    """Predicted and actual changes of T test losses for k removed pretraining examples.

    removed: [k] pretraining indices.  predicted, actual: [T, k] (test-loss units; > 0: the loss rises on removal).
    noise_floor: [T] |change| of each test loss after a re-run with nothing removed.
    rerun_grad_norm: the largest final gradient norm over all re-runs (both stages).
    """

    removed: Tensor
    predicted: Tensor
    actual: Tensor
    noise_floor: Tensor
    rerun_grad_norm: float
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        p, a = self.predicted.reshape(-1), self.actual.reshape(-1)
        above = self.actual.abs() > self.noise_floor[:, None]
        self.metrics = {
            "pearson": pearson(p, a),
            "spearman": spearman(p, a),
            "sign_agreement": sign_agreement(p, a),
            "n_pairs": int(p.numel()),
            "noise_floor_max": float(self.noise_floor.max()),
            "fraction_above_noise": float(above.float().mean()),
            "rerun_grad_norm": self.rerun_grad_norm,
        }

    def summary(self) -> str:
        m = self.metrics
        return (f"Pearson {m['pearson']:.3f}, Spearman {m['spearman']:.3f}, sign agreement {m['sign_agreement']:.2f} "
                f"over {m['n_pairs']} (test point, removal) pairs; noise floor {m['noise_floor_max']:.1e}, "
                f"{100 * m['fraction_above_noise']:.0f}% of actual changes above it; re-run ||grad|| ≤ "
                f"{m['rerun_grad_norm']:.1e}")


def rerun_test_losses(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor,
                      removed: int | None, *, pretrain_kwargs: dict | None = None,
                      finetune_kwargs: dict | None = None) -> tuple[Tensor, float]:
    """Test losses [T] after removing pretraining example ``removed`` (None: nothing) and re-running both stages
    warm-started from ``pretrained`` / ``finetuned``; also the larger of the two final gradient norms."""
    w = None
    if removed is not None:
        w = two_stage.pretrain.targets.new_ones(two_stage.pretrain.n, dtype=next(iter(pretrained.values())).dtype)
        w[removed] = 0.0
    pre = pretrain(two_stage, pretrained, sample_weights=w, **(pretrain_kwargs or {}))
    ft = finetune(two_stage, pre.params, finetuned, **(finetune_kwargs or {}))
    with torch.no_grad():
        losses = two_stage.finetune.losses(ft.params, test_inputs, test_targets)
    return losses, max(pre.grad_norm, ft.grad_norm)


def validate_removals(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor,
                      predicted_change: Tensor, removed: Tensor, *, pretrain_kwargs: dict | None = None,
                      finetune_kwargs: dict | None = None, cache: bool = True, progress: bool = True) -> Validation:
    """Re-run both stages once per removed example (and once with nothing removed) and compare with prediction.

    Args:
        predicted_change: [T, m] predicted change of each test loss on removal (``InfluenceResult.predicted_change``).
        removed: [k] pretraining indices (e.g. from :func:`choose_removals`).
        pretrain_kwargs, finetune_kwargs: fit settings of the re-runs (use the original fits' tolerances).
        cache: reuse re-runs of identical content from the cache folder.
    """
    from tqdm.auto import tqdm

    from .cache import cached

    test_inputs = test_inputs if isinstance(test_inputs, tuple) else (test_inputs,)
    removed = torch.as_tensor(removed, dtype=torch.long)
    if predicted_change.dim() != 2 or predicted_change.shape[1] != two_stage.pretrain.n:
        raise ValueError(f"predicted_change must be [T, m={two_stage.pretrain.n}], got {tuple(predicted_change.shape)}.")

    def one(i: int | None):
        def compute():
            return rerun_test_losses(two_stage, pretrained, finetuned, test_inputs, test_targets, i,
                                     pretrain_kwargs=pretrain_kwargs, finetune_kwargs=finetune_kwargs)
        if not cache:
            return compute()
        key = {"what": "rerun", "removed": i, "alpha": two_stage.alpha, "pretrained": pretrained,
               "finetuned": finetuned, "pre_stage": two_stage.pretrain.fingerprint(),
               "pre_inputs": two_stage.pretrain.inputs, "pre_targets": two_stage.pretrain.targets,
               "ft_stage": two_stage.finetune.fingerprint(), "ft_inputs": two_stage.finetune.inputs,
               "ft_targets": two_stage.finetune.targets, "test_inputs": test_inputs, "test_targets": test_targets,
               "pretrain_kwargs": pretrain_kwargs or {}, "finetune_kwargs": finetune_kwargs or {}}
        return cached(key, compute, name="rerun")

    base, gmax = one(None)
    with torch.no_grad():
        original = two_stage.finetune.losses(finetuned, test_inputs, test_targets)
    actual = torch.empty(len(base), len(removed), dtype=base.dtype)
    for k, i in enumerate(tqdm(removed.tolist(), desc="re-runs", disable=not progress)):
        losses, g = one(i)
        actual[:, k] = losses - base
        gmax = max(gmax, g)
    return Validation(removed, predicted_change[:, removed].detach(), actual, (base - original).abs(), gmax)
