"""Reporting helpers of the validation lessons: which test points to explain, the two paths of case A, the α sweep
of case B, the diagnostics a reader needs to trust a number, and the record of a validation in results.json.

- :func:`select_test_points`: the highest-loss correctly and wrongly classified test points.
- :func:`two_paths`: case A's test-side vector u = ∇_W g − H_WΘ H_ΘΘ⁻¹ ∇_Θ g split into its two terms, with the
  scores each term produces (the second term dropped is the ``head_refit=False`` ablation).
- :func:`alpha_sweep`: case B's scores for a range of α, compared with case A (α → ∞) and zero (α → 0).
- :func:`diagnostics_lines` and :func:`validation_record`: solver diagnostics (residual, damping, negative
  curvature) and final gradient norms of both stages, printed and saved next to the correlations.

Taught in notebooks 03 (case A) and 04 (case B); reused by the later validation notebooks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .influence import MultiStageInfluence
from .solvers import IndefiniteHessianWarning, SolveInfo, Solver
from .stages import Params, TwoStage
from .train import FitResult
from .validate import Validation


# ------------------------------------------------------------------------------------------------ test points
@dataclass
class TestPoints:
    """Chosen test points: ``index`` [T] into the test split, a short ``label`` each, their losses [T]."""

    index: Tensor
    labels: list[str]
    loss: Tensor
    correct: Tensor  # [T] bool

    def __len__(self) -> int:
        return len(self.index)


def select_test_points(two_stage: TwoStage, finetuned: Params, test_x: Tensor, test_y: Tensor, *,
                       n_correct: int = 1, n_wrong: int = 1) -> TestPoints:
    """The ``n_correct`` highest-loss correctly classified and ``n_wrong`` highest-loss misclassified test points.

    The least confident correct predictions and the worst mistakes are the ones a user wants explained; their
    test-loss gradients are also the largest, so their influence stands out of the re-runs' noise floor.
    Taught in notebook 03 (section "Test points").
    """
    with torch.no_grad():
        logits = two_stage.finetune.outputs(finetuned, test_x)
        loss = two_stage.finetune.losses(finetuned, test_x, test_y)
    correct = logits.argmax(1) == test_y
    chosen, labels = [], []
    for want, n, name in ((True, n_correct, "correct"), (False, n_wrong, "wrong")):
        pool = torch.nonzero(correct == want).flatten()
        if len(pool) < n:
            raise ValueError(f"Asked for {n} {name}ly classified test points but there are only {len(pool)}. "
                             f"Fix: lower n_{name} or use more test points.")
        top = pool[torch.argsort(loss[pool], descending=True)[:n]]
        chosen += top.tolist()
        labels += [f"#{int(i)} {name}, loss {float(loss[i]):.2f}" for i in top]
    index = torch.tensor(chosen, dtype=torch.long)
    return TestPoints(index, labels, loss[index], correct[index])


# ------------------------------------------------------------------------------------------------ case A: two paths
@dataclass
class TwoPaths:
    """Case A's u = u_features + u_head and the scores [T, m] of each term (scores are linear in u).

    u_features = ∇_W g(x_t) (the test loss through the features, head held at Θ*);
    u_head = −H_WΘ H_ΘΘ⁻¹ ∇_Θ g(x_t) (the test loss through the head re-fitted to the changed features).
    ``scores = scores_features + scores_head``; ``scores_features`` alone is the ``head_refit=False`` ablation.
    """

    u_features: Tensor
    u_head: Tensor
    scores_features: Tensor
    scores_head: Tensor
    scores: Tensor
    predicted_change: Tensor  # −scores/m, of the full method
    predicted_change_features: Tensor  # −scores_features/m, of the ablation
    diagnostics: dict[str, SolveInfo] = field(default_factory=dict)

    def table(self, labels: Sequence[str] | None = None) -> list[dict]:
        """One row per test point: norms of u's two terms, their cosine, and the norms of the scores of each."""
        rows = []
        for t in range(len(self.u_features)):
            uf, uh = self.u_features[t], self.u_head[t]
            rows.append({
                "test point": labels[t] if labels else t,
                "||∇_W g||": float(uf.norm()),
                "||−H_WΘ H_ΘΘ⁻¹ ∇_Θ g||": float(uh.norm()),
                "||u||": float((uf + uh).norm()),
                "cos(features, head)": float(uf @ uh / (uf.norm() * uh.norm()).clamp_min(1e-300)),
                "||I_features||": float(self.scores_features[t].norm()),
                "||I_head||": float(self.scores_head[t].norm()),
                "||I||": float(self.scores[t].norm()),
            })
        return rows


def two_paths(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_x: Tensor, test_y: Tensor, *,
              pretrain_solver: Solver = Solver(), finetune_solver: Solver = Solver()) -> TwoPaths:
    """Split case A's multi-stage influence into the path through the features and the path through the head.

    Runs :class:`~msif_lab.influence.MultiStageInfluence` with and without ``head_refit`` (sharing the
    pretraining factorisation when the solver is dense). Taught in notebook 03 (section "Two paths").
    """
    if two_stage.case != "A":
        raise ValueError("two_paths is case A's decomposition (embedding fixed); build the stages with alpha=None.")
    full = MultiStageInfluence(two_stage, pretrained, finetuned, pretrain_solver=pretrain_solver,
                               finetune_solver=finetune_solver)
    feats = MultiStageInfluence(two_stage, pretrained, finetuned, pretrain_solver=pretrain_solver,
                                finetune_solver=finetune_solver, head_refit=False)
    u, _, _ = full.finetune_side(test_x, test_y)
    u_feat, _, _ = feats.finetune_side(test_x, test_y)
    res = full.scores(test_x, test_y)
    feats.share_pretrain_factor(full)  # the same H_f: factorise it once (dense solver only)
    res_feat = feats.scores(test_x, test_y)
    return TwoPaths(u_feat, u - u_feat, res_feat.scores, res.scores - res_feat.scores, res.scores,
                    res.predicted_change, res_feat.predicted_change, res.diagnostics)


# ------------------------------------------------------------------------------------------------ case B: α sweep
def relative_difference(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all entries."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def alpha_sweep(two_stage: TwoStage, pretrained: Params, start_alpha: float, start: Params, alphas: Sequence[float],
                test_x: Tensor, test_y: Tensor, reference: Tensor, *, fit_kwargs: dict | None = None,
                pretrain_solver: Solver = Solver(), finetune_solver: Solver = Solver(), cache: bool = True,
                progress: bool = True) -> list[dict]:
    """Case B scores for each α (same pretraining, same test points), compared with case A's ``reference`` [T, m].

    ``two_stage`` holds the two stages (its α is ignored); ``start`` is a finetuned (W~, Θ~) at ``start_alpha``, a
    true minimum (e.g. from :func:`~msif_lab.experiments.train`). The sweep is a *continuation*: the α above
    ``start_alpha`` are visited upwards and those below downwards, each fit warm-started from its neighbour's
    optimum, so that each fit starts next to its optimum and the sweep follows one branch of minima of the
    non-convex finetuning objective instead of jumping between local minima. Fits are cached by content; H_f is
    factorised once for all α (dense solver).

    Returns one row per α, in increasing α: ``alpha``, ``rel_diff_to_A`` (‖I_B − I_A‖/‖I_A‖), ``norm_ratio``
    (‖I_B‖/‖I_A‖), ``w_shift`` (‖W~ − W*‖), the fit's ``grad_norm`` and ``converged``, the finetuning iHVP's
    ``solve`` (:class:`SolveInfo`: look at its negative eigenvalues), ``diagnostics`` (both solves), the
    ``fit`` (:class:`FitResult`, its ``params`` are (W~, Θ~)) and the test points' ``scores`` [T, m].
    ``start_alpha=float("inf")`` with case A's finetuned parameters starts the continuation at case A.
    Taught in notebook 04 (section "The α sweep").
    """
    from tqdm import tqdm  # text bars: tqdm.auto would need ipywidgets in a notebook

    from .cache import cached
    from .train import finetune

    fit_kwargs = dict(fit_kwargs or {})
    w_star = two_stage.embedding_for_finetune(pretrained)
    up = sorted(a for a in map(float, alphas) if a >= start_alpha)
    down = sorted((a for a in map(float, alphas) if a < start_alpha), reverse=True)
    order = [(a, k == 0) for k, a in enumerate(up)] + [(a, k == 0) for k, a in enumerate(down)]
    init, previous, rows = start, None, []
    for alpha, restart in tqdm(order, desc="α sweep", disable=not progress):
        if restart:
            init = start
        ts = TwoStage(two_stage.pretrain, two_stage.finetune, alpha=alpha)
        begin = init

        def fit():
            return finetune(ts, pretrained, begin, **fit_kwargs)

        key = {"what": "finetune_alpha_continuation", "alpha": alpha, "init": begin, "pretrained": pretrained,
               "ft_inputs": ts.finetune.inputs, "ft_targets": ts.finetune.targets, "ft_wd": ts.finetune.weight_decay,
               "fit_kwargs": fit_kwargs}
        ft = cached(key, fit, name="finetune_sweep") if cache else fit()
        init = ft.params
        inf = MultiStageInfluence(ts, pretrained, ft.params, pretrain_solver=pretrain_solver,
                                  finetune_solver=finetune_solver)
        if previous is not None:
            inf.share_pretrain_factor(previous)  # H_f does not depend on α: factorise it once
        with warnings.catch_warnings():
            # the sweep visits saddles on purpose (notebook 04): each row reports them in its `solve`
            warnings.simplefilter("ignore", IndefiniteHessianWarning)
            res = inf.scores(test_x, test_y)
        previous = inf
        shift = torch.sqrt(sum(((ft.params[n] - w) ** 2).sum() for n, w in w_star.items()))
        rows.append({
            "alpha": alpha,
            "rel_diff_to_A": relative_difference(res.scores, reference),
            "norm_ratio": float(res.scores.norm() / reference.norm()),
            "w_shift": float(shift),
            "grad_norm": ft.grad_norm,
            "converged": ft.converged,
            "solve": res.diagnostics["finetune"],
            "diagnostics": res.diagnostics,
            "fit": ft,
            "scores": res.scores,
        })
    return sorted(rows, key=lambda r: r["alpha"])


# ------------------------------------------------------------------------------------------------ diagnostics
def diagnostics_lines(fits: dict[str, FitResult], solves: dict[str, SolveInfo]) -> list[str]:
    """Printable lines: each fit's ``FitResult.summary()`` and each iHVP's ``SolveInfo.summary()``."""
    return ([f"fit {name:9s} {fit.summary()}" for name, fit in fits.items()]
            + [f"iHVP {name:8s} {info.summary()}" for name, info in solves.items()])


def solve_record(info: SolveInfo) -> dict:
    """The numbers of a solve worth saving: method, damping, residual, spectrum, negative curvature."""
    return {"method": info.method, "damping": info.damping, "n_params": info.n_params, "residual": info.residual,
            "eig_min": info.eig_min, "eig_max": info.eig_max, "n_negative": info.n_negative,
            "converged": info.converged, "summary": info.summary()}


def validation_record(val: Validation, fits: dict[str, FitResult], solves: dict[str, SolveInfo]) -> dict:
    """The dict a validation notebook saves in results.json: the correlations (``val.metrics``), each fit's
    final gradient norm and convergence, and each iHVP's diagnostics."""
    return {
        **val.metrics,
        "fits": {name: {"grad_norm": f.grad_norm, "converged": f.converged, "loss": f.loss,
                        "iterations": f.iterations} for name, f in fits.items()},
        "solves": {name: solve_record(info) for name, info in solves.items()},
    }


def per_test_pearson(val: Validation) -> list[float]:
    """Pearson correlation of predicted and actual changes for each test point separately."""
    from .metrics import pearson

    return [pearson(val.predicted[t], val.actual[t]) for t in range(len(val.predicted))]
