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

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metrics import pearson, sign_agreement, spearman
from .stages import Params, TwoStage
from .train import FitResult, finetune, hessian_factor, pretrain


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


class ReferenceFactors:
    """Cholesky factors of both stages' Hessians at the original optima, computed on first use and shared by every
    re-run from those optima (:func:`retrain_without` preconditions its L-BFGS with them, see
    :func:`msif_lab.train.fit_stage`): H_F over (W, U) at (W*, U*), and the finetuning Hessian over what
    finetuning trains (Θ in case A; (W, Θ) with the proximal term in case B) at the finetuned optimum."""

    def __init__(self, two_stage: TwoStage, pretrained: Params, finetuned: Params):
        self.two_stage, self.pretrained, self.finetuned = two_stage, pretrained, finetuned

    @functools.cached_property
    def pretrain(self) -> Tensor | None:
        stage = self.two_stage.pretrain
        return hessian_factor(stage, self.pretrained, stage.trainable_names)

    @functools.cached_property
    def finetune(self) -> Tensor | None:
        ts = self.two_stage
        proximal = None if ts.case == "A" else (ts.alpha, ts.embedding_for_finetune(self.pretrained))
        return hessian_factor(ts.finetune, self.finetuned, ts.finetune_trained_names, proximal=proximal)


def retrain_without(two_stage: TwoStage, pretrained: Params, finetuned: Params, removed=(), *,
                    pretrain_kwargs: dict | None = None, finetune_kwargs: dict | None = None,
                    cache: bool = True, factors: ReferenceFactors | None = None) -> tuple[FitResult, FitResult]:
    """Give the pretraining examples ``removed`` weight 0 and re-run both stages: the one re-training protocol.

    ``removed``: pretraining indices, any number (empty: nothing removed, the noise-floor re-run). Each removed
    example is ε = −1/m (the 1/m normalisation is kept). Pretraining is re-run warm-started from ``pretrained``
    (W*, U*), then finetuning (case A or B, as ``two_stage`` says) warm-started from ``finetuned`` on the new
    embedding, both with the given fit settings (use the original fits' tolerances). Returns both fits
    (:class:`~msif_lab.train.FitResult`). Cached by content: the trained parameters, both stages' fingerprints
    and data, the removed set, α and the fit settings; the pretraining re-run is also cached on its own (it does
    not depend on the finetuning side), so cases A and B, or several α, removing the same examples share it.

    A stage whose settings allow dense Hessians (``newton_steps`` > 0) is re-fitted by L-BFGS whitened by its
    Hessian at the original optimum (``factors``: pass one :class:`ReferenceFactors` to many re-runs from the same optima to
    factorise once; by default they are computed here): the same tolerance, far fewer Hessians.

    Used by :func:`validate_removals` (one example at a time), :func:`msif_lab.inspect.remove_and_retrain`
    (notebook 06) and :func:`msif_lab.detection.remove_and_rerun` (notebook 08).
    """
    from .cache import cached

    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).sort().values
    pretrain_kwargs, finetune_kwargs = dict(pretrain_kwargs or {}), dict(finetune_kwargs or {})

    refs = factors or ReferenceFactors(two_stage, pretrained, finetuned)
    pre_stage, ft_stage = two_stage.pretrain, two_stage.finetune

    def compute_pretrain() -> FitResult:
        w = None
        if len(removed):
            w = pre_stage.targets.new_ones(pre_stage.n, dtype=next(iter(pretrained.values())).dtype)
            w[removed.to(w.device)] = 0.0
        reference = {"hessian_factor": refs.pretrain} if pretrain_kwargs.get("newton_steps") else {}
        return pretrain(two_stage, pretrained, sample_weights=w, **pretrain_kwargs, **reference)

    def compute():
        pre_key = {"what": "retrain_without_pretrain", "removed": removed, "pretrained": pretrained,
                   "pre_stage": pre_stage.fingerprint(), "pre_inputs": pre_stage.inputs,
                   "pre_targets": pre_stage.targets, "pretrain_kwargs": pretrain_kwargs}
        pre = cached(pre_key, compute_pretrain, name="rerun_pretrain") if cache else compute_pretrain()
        reference = {"hessian_factor": refs.finetune} if finetune_kwargs.get("newton_steps") else {}
        return pre, finetune(two_stage, pre.params, finetuned, **finetune_kwargs, **reference)

    if not cache:
        return compute()
    key = {"what": "retrain_without", "removed": removed, "alpha": two_stage.alpha, "pretrained": pretrained,
           "finetuned": finetuned, "pre_stage": pre_stage.fingerprint(), "pre_inputs": pre_stage.inputs,
           "pre_targets": pre_stage.targets, "ft_stage": ft_stage.fingerprint(), "ft_inputs": ft_stage.inputs,
           "ft_targets": ft_stage.targets, "pretrain_kwargs": pretrain_kwargs, "finetune_kwargs": finetune_kwargs}
    return cached(key, compute, name="rerun")


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
    from tqdm import tqdm  # text bars: tqdm.auto would need ipywidgets in a notebook

    test_inputs = test_inputs if isinstance(test_inputs, tuple) else (test_inputs,)
    removed = torch.as_tensor(removed, dtype=torch.long)
    if predicted_change.dim() != 2 or predicted_change.shape[1] != two_stage.pretrain.n:
        raise ValueError(f"predicted_change must be [T, m={two_stage.pretrain.n}], got {tuple(predicted_change.shape)}.")

    factors = ReferenceFactors(two_stage, pretrained, finetuned)  # factorised once, if a re-run needs them

    def one(removed_now) -> tuple[Tensor, float]:
        pre, ft = retrain_without(two_stage, pretrained, finetuned, removed_now, pretrain_kwargs=pretrain_kwargs,
                                  finetune_kwargs=finetune_kwargs, cache=cache, factors=factors)
        with torch.no_grad():
            losses = two_stage.finetune.losses(ft.params, test_inputs, test_targets)
        return losses, max(pre.grad_norm, ft.grad_norm)

    base, gmax = one([])
    with torch.no_grad():
        original = two_stage.finetune.losses(finetuned, test_inputs, test_targets)
    actual = torch.empty(len(base), len(removed), dtype=base.dtype)
    for k, i in enumerate(tqdm(removed.tolist(), desc="re-runs", disable=not progress)):
        losses, g = one([i])
        actual[:, k] = losses - base
        gmax = max(gmax, g)
    return Validation(removed, predicted_change[:, removed].detach(), actual, (base - original).abs(), gmax)
