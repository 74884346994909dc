"""Training each stage to a tight optimum, and the two stages in sequence.

Influence functions describe the *optimum* of a training objective, so each stage is fitted to a tight optimum:
full-batch L-BFGS (strong-Wolfe line search) on the exact objective of :class:`msif_lab.curvature.StageObjective`
(mini-batched passes that sum to the full objective), optionally finished with a few Newton steps on the dense
Hessian for small models. Every fit reports the final gradient norm, so a reader can see how tight "tight" was.
A few epochs of Adam on mini-batches (``adam_epochs``) can precede L-BFGS for a better basin from a random start.

Re-runs for validation warm-start from the optimum (``init=...``), so that the "actual" change after removing an
example measures the removal, not optimiser noise.

Taught in notebook 01 (single stage) and notebook 03 (two stages).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .curvature import StageObjective
from .stages import Params, Stage, TwoStage


@dataclass
class FitResult:
    """A fitted stage: all its trainable parameters (trained and held fixed), and how the fit ended."""

    params: Params
    loss: float  # objective value at the end (data term + regularisers)
    grad_norm: float  # Euclidean norm of the objective's gradient over the trained parameters
    iterations: int
    seconds: float
    converged: bool  # grad_norm ≤ tol

    def summary(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return (f"loss={self.loss:.6g}, ||grad||={self.grad_norm:.2e} ({state}), "
                f"{self.iterations} iterations, {self.seconds:.1f}s")


def fit_stage(stage: Stage, init: Params, trained: Sequence[str], *, proximal: tuple[float, Params] | None = None,
              sample_weights: Tensor | None = None, tol: float = 1e-8, max_iter: int = 500,
              batch_size: int | None = None, adam_epochs: int = 0, adam_lr: float = 1e-2,
              newton_steps: int = 0, newton_from: float = 1e-4, hessian_factor: Tensor | None = None,
              seed: int = 0) -> FitResult:
    """Minimise the stage objective over the parameters ``trained``, the others held at ``init``.

    Args:
        init: every trainable parameter of the stage (start values; the non-trained ones stay fixed).
        trained: names to optimise; weight decay applies to them.
        proximal: ``(alpha, anchor)`` adds (α/2)·||θ − anchor||² on the anchor's names (case B finetuning).
        sample_weights: [N] example weights (0 removes an example; 1 + N·ε up-weights it by ε).
        tol: stop when the gradient norm is ≤ tol.
        max_iter: L-BFGS iterations at most.
        batch_size: examples per pass (memory), not a stochastic batch: every L-BFGS step uses all examples.
        adam_epochs, adam_lr: mini-batch Adam epochs (batch ``batch_size`` or 128) before L-BFGS.
        newton_steps: at most this many Newton steps on the dense Hessian (small models only) at a time; a step is
            taken only while the Hessian is positive definite and the objective decreases.
        newton_from: with ``newton_steps``, Newton steps are tried only below this gradient norm: at the start (a
            warm start near the optimum then needs no L-BFGS at all) and where L-BFGS first stops, at this norm;
            there they converge quadratically where L-BFGS would crawl along badly conditioned directions. Where
            they do not reach ``tol``, L-BFGS goes on to ``tol`` (with its curvature history, unless the Newton
            steps moved the point) and Newton steps are tried again. The whitened L-BFGS of ``hessian_factor``
            replaces the first attempt when it is given.
        hessian_factor: lower Cholesky factor L of a *reference* Hessian H_ref = LLᵀ of this objective over
            ``trained`` (e.g. at the original optimum, for re-runs after a change of the data; see
            :func:`hessian_factor`). L-BFGS then first runs in whitened coordinates y, θ = θ₀ + L⁻ᵀy, where the
            Hessian near the reference is ≈ I, then full steps with the reference Hessian finish below the
            gradient norm where line searches stall: a warm-started re-run converges in a few dozen gradients
            without forming a new Hessian, even when the change moves the optimum too far for Newton steps to be
            accepted. The optimum and its tolerance are the same as without it; only the cost changes.
    """
    start = time.perf_counter()
    obj = StageObjective(stage, init, trained, proximal=proximal, sample_weights=sample_weights, batch_size=batch_size)
    theta = obj.theta.clone()
    iterations = 0
    if adam_epochs:
        theta, iterations = _adam(obj, theta, adam_epochs, adam_lr, batch_size or 128, seed)
    if hessian_factor is not None:  # L-BFGS preconditioned by the reference Hessian stands in for Newton steps
        whitened = _LBFGS(obj, theta, max_iter, factor=hessian_factor)
        theta, steps = whitened.run(tol)
        max_iter = whitened.left
        theta, chord = _chord(obj, theta, hessian_factor, tol)  # beyond where line searches see a decrease
        steps += chord
    elif obj.value_and_grad(theta)[1].norm() <= newton_from:  # a warm start near a minimum converges here
        theta, steps = _newton(obj, theta, newton_steps, tol)
    else:  # far from a minimum (a random start): a dense Hessian would be wasted
        steps = 0
    iterations += steps
    lbfgs = _LBFGS(obj, theta, max_iter)
    for stop in ([newton_from, tol] if newton_steps and newton_from > tol else [tol]):
        theta, steps = lbfgs.run(stop)
        theta, newton_done = _newton(obj, theta, newton_steps, tol)
        iterations += steps + newton_done
        if obj.value_and_grad(theta)[1].norm() <= tol:
            break
        if newton_done:  # the Newton steps moved the point: L-BFGS restarts there
            lbfgs = _LBFGS(obj, theta, lbfgs.left)
    value, g = obj.value_and_grad(theta)
    params = {**init, **obj.space.unflatten(theta.clone())}
    params = {n: params[n].detach() for n in init}
    gn = float(g.norm())
    return FitResult(params, float(value), gn, iterations, time.perf_counter() - start, gn <= tol)


def hessian_factor(stage: Stage, params: Params, trained: Sequence[str], *,
                   proximal: tuple[float, Params] | None = None) -> Tensor | None:
    """Lower Cholesky factor [p, p] of the stage objective's dense Hessian over ``trained`` at ``params`` (with the
    proximal term when given), or None when that Hessian is not positive definite. For ``fit_stage``'s
    ``hessian_factor``; used by the validation re-runs (:func:`msif_lab.validate.retrain_without`)."""
    L, info = torch.linalg.cholesky_ex(StageObjective(stage, params, trained, proximal=proximal).hessian())
    return L if info == 0 else None


def _chord(obj: StageObjective, theta: Tensor, L: Tensor, tol: float, max_steps: int = 50) -> tuple[Tensor, int]:
    """Full steps θ ← θ − (LLᵀ)⁻¹∇ with a fixed factorised Hessian while the gradient norm shrinks by at least
    a tenth per step (they converge linearly, faster the closer H_ref is to the Hessian here): they finish near the
    optimum, where objective values differ by less than rounding and line searches stall."""
    done = 0
    g = obj.value_and_grad(theta)[1]
    while done < max_steps and g.norm() > tol:
        candidate = theta - torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        new_g = obj.value_and_grad(candidate)[1]
        if not new_g.norm() <= 0.9 * g.norm():
            break
        theta, g, done = candidate, new_g, done + 1
    return theta, done


class _LBFGS:
    """Full-batch L-BFGS (strong-Wolfe line search) from ``theta`` with at most ``max_iter`` iterations in all. Each
    :meth:`run` iterates towards a gradient-norm tolerance; a later run with a tighter one resumes with the same
    curvature history, as if L-BFGS had never stopped.

    With ``factor`` = L (a reference Hessian H_ref = LLᵀ) it iterates over y with θ = θ₀ + L⁻ᵀy, whose gradient is
    L⁻¹∇_θ: L-BFGS preconditioned by H_ref."""

    def __init__(self, obj: StageObjective, theta: Tensor, max_iter: int, factor: Tensor | None = None):
        self.obj, self.left, self.factor, self.start = obj, max_iter, factor, theta.clone()
        self.x = (theta.clone() if factor is None else torch.zeros_like(theta)).requires_grad_(True)
        # ||∇_θ|| = ||L ∇_y|| ≤ ||L||_F ||∇_y||: the tolerance on y that guarantees the one on θ
        self.scale = 1.0 if factor is None else float(torch.linalg.matrix_norm(factor))
        self.opt = torch.optim.LBFGS([self.x], lr=1, max_iter=max_iter, history_size=50, tolerance_change=0.0,
                                     line_search_fn="strong_wolfe")

    def _theta(self, x: Tensor) -> Tensor:
        if self.factor is None:
            return x
        return self.start + torch.linalg.solve_triangular(self.factor.T, x.unsqueeze(1), upper=True).squeeze(1)

    def _closure(self) -> Tensor:
        value, g = self.obj.value_and_grad(self._theta(self.x.detach()))
        if self.factor is not None:
            g = torch.linalg.solve_triangular(self.factor, g.unsqueeze(1), upper=False).squeeze(1)
        self.x.grad = g
        return value

    def run(self, tol: float) -> tuple[Tensor, int]:
        """Iterate until ||grad|| ≤ tol or the iterations are spent; returns the point and the iterations taken."""
        # L-BFGS tests max|g_k| ≤ tolerance_grad; dividing by √p makes its stop imply ||g||₂ ≤ tol, our criterion
        self.opt.param_groups[0].update(tolerance_grad=tol / (len(self.x) ** 0.5 * self.scale), max_iter=self.left)
        state = self.opt.state[self.x]
        before = state.get("n_iter", 0)
        if self.left > 0:
            self.opt.step(self._closure)
        done = state.get("n_iter", 0) - before
        self.left -= done
        return self._theta(self.x.detach()).clone(), done


def _newton(obj: StageObjective, theta: Tensor, steps: int, tol: float) -> tuple[Tensor, int]:
    """Up to ``steps`` Newton steps on the dense Hessian while it is positive definite and the objective decreases."""
    done = 0
    value, g = obj.value_and_grad(theta)
    while done < steps and g.norm() > tol:
        L, info = torch.linalg.cholesky_ex(obj.at(theta).hessian())
        if info != 0:  # not in a convex basin: leave it to L-BFGS
            break
        candidate = theta - torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        new_value, new_g = obj.value_and_grad(candidate)
        slack = 8 * torch.finfo(theta.dtype).eps * abs(float(value))  # flat to rounding near the optimum
        if not (new_value <= value or (new_value <= value + slack and new_g.norm() < g.norm())):
            break
        theta, value, g, done = candidate, new_value, new_g, done + 1
    return theta, done


def _adam(obj: StageObjective, theta: Tensor, epochs: int, lr: float, batch: int, seed: int) -> tuple[Tensor, int]:
    x = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(obj.n, generator=gen).split(batch):
            loss = (obj.weights[idx] * obj.batch_losses(x, idx)).mean() + obj._reg(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return x.detach(), steps


# ----------------------------------------------------------------------------------------------------- two stages
def pretrain(two_stage: TwoStage, init: Params | None = None, *, sample_weights: Tensor | None = None,
             **fit_kwargs) -> FitResult:
    """Fit (W, U) on the pretraining set: (W*, U*) = argmin F. ``init`` defaults to the model's parameters."""
    stage = two_stage.pretrain
    init = stage.initial_params() if init is None else init
    stage.check_params(init, stage.trainable_names, "initial", "pass the pretraining model's parameters as `init`.")
    return fit_stage(stage, init, stage.trainable_names, sample_weights=sample_weights, **fit_kwargs)


def finetune(two_stage: TwoStage, pretrained: Params, init: Params | None = None, **fit_kwargs) -> FitResult:
    """Fit the finetuning stage given the pretrained W*.

    Case A: Θ* = argmin_Θ G(W*, Θ), W held at W*. Case B: (W~, Θ~) = argmin G(W, Θ) + (α/2)||W − W*||², starting
    from W = W* unless ``init`` says otherwise. ``init`` gives the head's start (default: the model's parameters).
    The result's ``params`` hold W and Θ under the finetuning model's names.
    """
    stage = two_stage.finetune
    two_stage.pretrain.check_params(pretrained, [a for a, _ in two_stage.w_pairs], "pretrained",
                                    "pass pretrain(...).params as `pretrained`.")
    w_star = two_stage.embedding_for_finetune(pretrained)
    start = stage.initial_params() if init is None else dict(init)
    stage.check_params(start, stage.trainable_names, "initial", "pass the finetuning model's parameters as `init`.")
    if two_stage.case == "A" or init is None:
        start.update(w_star)
    proximal = None if two_stage.case == "A" else (two_stage.alpha, w_star)
    return fit_stage(stage, start, two_stage.finetune_trained_names, proximal=proximal, **fit_kwargs)


def train_two_stage(two_stage: TwoStage, *, pretrain_init: Params | None = None,
                    finetune_init: Params | None = None, sample_weights: Tensor | None = None,
                    pretrain_kwargs: dict | None = None, finetune_kwargs: dict | None = None
                    ) -> tuple[FitResult, FitResult]:
    """Pretraining then finetuning; returns both fits. ``sample_weights`` weight the *pretraining* examples."""
    pre = pretrain(two_stage, pretrain_init, sample_weights=sample_weights, **(pretrain_kwargs or {}))
    ft = finetune(two_stage, pre.params, finetune_init, **(finetune_kwargs or {}))
    return pre, ft
