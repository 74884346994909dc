"""Influence scores: single-stage (Koh & Liang, 2017) and multi-stage (Chen et al., 2020), cases A and B.

Sign convention (``PAPER.md`` §1): I(z, x_t) = d loss(x_t; params(ε)) / dε at ε = 0 when the training example z is
up-weighted by ε. I > 0: z is *harmful* to x_t (up-weighting it raises the test loss); I < 0: z helps. Removing z
is ε = −1/m, so the predicted change of the test loss when z is removed (and training re-run) is −I/m.

Multi-stage scores (``PAPER.md`` §2), with the test-side vectors computed once per test batch:

    case A:  u = ∇_W g(x_t) − H_WΘ H_ΘΘ⁻¹ ∇_Θ g(x_t)                 (at (W*, Θ*))
    case B:  u = α [H_B⁻¹ ∇_(W,Θ) g(x_t)]_W,  H_B = ∇²G + αI on W   (at (W~, Θ~))
    v = (H_f + λI)⁻¹ [u; 0_U]                                         (at (W*, U*))
    I(z_i, x_t) = −vᵀ ∇_(W,U) f(z_i)

The scoring pass over the m pretraining examples is vectorised: forward-mode directional derivatives of the
per-example losses along each v (cheap for few test points) or batched per-example gradients times V.

Taught in notebook 01 (single stage), 03 (case A) and 04 (case B).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .cache import config_key
from .curvature import ParamSpace, StageObjective, mixed_product, per_example_grads
from .scoring import check_method, score_dots
from .solvers import DenseFactor, IndefiniteHessianWarning, SolveInfo, Solver, check_solver
from .stages import Params, Stage, TwoStage, as_tuple


@dataclass
class InfluenceResult:
    """Scores of every training (or pretraining) example for every test point.

    scores: [T, m], I(z_i, x_t) (> 0 harmful, < 0 helpful).
    predicted_change: [T, m], −I/m: predicted change of test loss t when example i is removed and training re-run.
    test_loss: [T], the test losses at the trained parameters.
    diagnostics: solver diagnostics by name ("finetune", "pretrain" or "hessian").
    """

    scores: Tensor
    predicted_change: Tensor
    test_loss: Tensor
    diagnostics: dict[str, SolveInfo] = field(default_factory=dict)


@dataclass
class TestVectors:
    """Test-side vectors v_t over a pretraining (or training) block, reusable for scoring any set of examples.

    vectors: [T, p] such that I(z, x_t) = −v_t · ∇ loss(z).
    """

    vectors: Tensor
    test_loss: Tensor
    diagnostics: dict[str, SolveInfo]


def check_test_batch(stage: Stage, inputs, targets: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """Inputs as a tuple; raises ``ValueError`` when the test batch does not look like the stage's training data."""
    inputs = as_tuple(inputs)
    if len(inputs) != len(stage.inputs):
        raise ValueError(f"The test batch has {len(inputs)} input tensor(s); the stage's model takes "
                         f"{len(stage.inputs)}. Fix: pass inputs in the same structure as the training inputs.")
    if targets.dim() != stage.targets.dim():
        raise ValueError(f"Test targets have shape {tuple(targets.shape)}, training targets "
                         f"{tuple(stage.targets.shape)}: expected one target per test point, [T, ...]. Fix: add the "
                         "batch dimension (y.unsqueeze(0) or y[i:i+1]).")
    for k, (t, ref) in enumerate(zip(inputs, stage.inputs)):
        if t.dim() != ref.dim() or (t.dim() > 1 and t.dtype.is_floating_point and t.shape[1:] != ref.shape[1:]):
            raise ValueError(f"Test input {k} has shape {tuple(t.shape)}, the training inputs {tuple(ref.shape)}: "
                             "expected [T, *example shape]. Fix: add the batch dimension (x.unsqueeze(0) or "
                             "x[i:i+1]) or preprocess the test data like the training data.")
        if t.dtype != ref.dtype:
            raise ValueError(f"Test input {k} has dtype {t.dtype}, the training inputs {ref.dtype}. "
                             f"Fix: convert it, x.to({ref.dtype}).")
        if len(t) != len(targets):
            raise ValueError(f"Test input {k} has {len(t)} rows but there are {len(targets)} test targets.")
    if len(targets) == 0:
        raise ValueError("The test batch is empty (0 test points): there is nothing to score. Fix: pass at least one "
                         "test point, e.g. x_test[i:i+1], y_test[i:i+1].")
    return inputs, targets


def score_examples(stage: Stage, params: Params, block: Sequence[str], vectors: Tensor, *, inputs=None,
                   targets: Tensor | None = None, batch_size: int | None = None, method: str = "auto") -> Tensor:
    """D[t, i] = vectors[t] · ∇_block loss(example_i): [T, N] for vectors [T, p], examples defaulting to the stage's
    training set. ``method``: ``"auto"``, ``"jvp"``, ``"grad"`` or ``"factored"`` (see
    :func:`msif_lab.scoring.score_dots`). Memory is bounded by ``batch_size`` examples."""
    return score_dots(stage, params, block, vectors, inputs=inputs, targets=targets, batch_size=batch_size,
                      method=method)


def _result(scores: Tensor, m: int, test_loss: Tensor, diagnostics: dict) -> InfluenceResult:
    return InfluenceResult(scores, -scores / m, test_loss, diagnostics)


def _warn_if_indefinite(info: SolveInfo, hessian: str, params: str, solver: str) -> None:
    """Warn (:class:`~msif_lab.solvers.IndefiniteHessianWarning`) when a dense solve found H + λI indefinite."""
    if not info.n_negative:
        return
    warnings.warn(
        f"{hessian} + λI is indefinite: {info.n_negative} eigenvalue(s) ≤ 0 (λ_min(H) = {info.eig_min:.3g}, "
        f"λ = {info.damping:g}), so the {params} parameters are a saddle point, not a minimum, and influence scores "
        f"computed there do not predict what re-training would do. Fix: train to a minimum (a small gradient norm), "
        f"or add damping above {-info.eig_min:.3g} ({solver}=Solver(..., damping=λ)).",
        IndefiniteHessianWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the caller's first frame outside msif_lab, so that a warning points at the user's code."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("msif_lab."):
        frame, level = frame.f_back, level + 1
    return level


# ----------------------------------------------------------------------------------------------------- single stage
def single_stage_influence(stage: Stage, params: Params, test_inputs, test_targets: Tensor, *,
                           solver: Solver = Solver(), block: Sequence[str] | None = None,
                           batch_size: int | None = None, scoring: str = "auto") -> InfluenceResult:
    """Koh & Liang influence of every training example of ``stage`` on each test point: I = −∇L(x_t)ᵀ(H+λI)⁻¹∇l(z_i).

    ``params`` must be a (tight) optimum of the stage objective (weight decay included in H); where a dense solve
    finds H + λI indefinite (a saddle) it warns :class:`~msif_lab.solvers.IndefiniteHessianWarning`. ``block``
    restricts the parameters (default: all trainable). Returns scores [T, n]. Taught in notebook 01.
    """
    check_solver(solver, "solver")
    block = stage.trainable_names if block is None else list(block)
    stage.check_params(params, block + [n for n in stage.trainable_names if n in params and n not in block], "given",
                       "pass the `params` of the stage's fit (fit_stage(...).params).")
    test_inputs, test_targets = check_test_batch(stage, test_inputs, test_targets)
    with torch.no_grad():
        test_loss = stage.checked_losses(params, test_inputs, test_targets,
                                         "single_stage_influence: the stage's loss on the test batch")
    obj = StageObjective(stage, params, block, batch_size=batch_size)
    g_test = per_example_grads(stage, params, block, test_inputs, test_targets)
    V, info = solver.solve(obj, g_test)
    _warn_if_indefinite(info, "The Hessian H of the training objective", "given", "solver")
    dots = score_examples(stage, params, block, V, batch_size=batch_size, method=scoring)
    return _result(-dots, stage.n, test_loss, {"hessian": info})


# ----------------------------------------------------------------------------------------------------- multi stage
class MultiStageInfluence:
    """Multi-stage influence of every pretraining example on finetuning test points (cases A and B).

    Args:
        two_stage: the two stages; ``two_stage.alpha`` selects case A (None) or B.
        pretrained: (W*, U*) under the pretraining model's names (a tight optimum of F).
        finetuned: W and Θ under the finetuning model's names: (W*, Θ*) in case A, (W~, Θ~) in case B.
        pretrain_solver: iHVP with H_f over the pretraining block (the expensive solve).
        finetune_solver: iHVP with H_ΘΘ (case A) or H_B (case B).
        batch_size: examples per pass in every Hessian, gradient and scoring pass (memory bound).
        head_refit: case A only; False drops the path through the re-fitted head (the "features only"
            ablation of notebook 03; not the method).
        pretrain_block: restrict the pretraining parameters P to these names (others held fixed; the score then
            uses that block of H_f). Default: all of (W, U).
        scoring: "auto", "jvp", "grad" or "factored" (see :func:`msif_lab.scoring.score_dots`).

    The parameter dicts are checked against the models (names, shapes, dtypes) when the instance is built. A dense
    solve that finds H_f or the finetuning Hessian indefinite (a saddle, not a minimum) warns
    :class:`~msif_lab.solvers.IndefiniteHessianWarning`; the spectrum is in the result's diagnostics.
    Dense factorisations are cached per instance; results do not depend on call order.
    Taught in notebooks 03 (case A) and 04 (case B).
    """

    def __init__(self, two_stage: TwoStage, pretrained: Params, finetuned: Params, *,
                 pretrain_solver: Solver = Solver(), finetune_solver: Solver = Solver(),
                 batch_size: int | None = None, head_refit: bool = True,
                 pretrain_block: Sequence[str] | None = None, scoring: str = "auto"):
        self.two_stage = two_stage
        pre, ft = two_stage.pretrain, two_stage.finetune
        two_stage.check_params(pretrained, finetuned)
        self.pretrained = {n: pretrained[n].detach() for n in pre.trainable_names}
        self.finetuned = {n: finetuned[n].detach() for n in ft.trainable_names}
        self.pre_block = pre.trainable_names if pretrain_block is None else list(pretrain_block)
        unknown = [n for n in self.pre_block if n not in pre.trainable_names]
        if unknown:
            raise ValueError(f"pretrain_block names {unknown} are not trainable parameters of the pretraining model "
                             f"(choose from {pre.trainable_names}).")
        if not any(a in self.pre_block for a, _ in two_stage.w_pairs):
            raise ValueError("pretrain_block holds no embedding parameter, so no pretraining influence can reach "
                             "the finetuned model. Fix: include at least one W parameter.")
        self.pretrain_solver = check_solver(pretrain_solver, "pretrain_solver")
        self.finetune_solver = check_solver(finetune_solver, "finetune_solver")
        if not head_refit and two_stage.case == "B":
            raise ValueError("head_refit=False is the features-only ablation of case A; in case B (alpha set) the "
                             "finetuning Hessian couples W and Θ and there is no separate head path to drop. Fix: "
                             "use head_refit=True, or a TwoStage with alpha=None.")
        self.batch_size, self.head_refit, self.scoring = batch_size, head_refit, check_method(scoring)
        self.w_ft = [b for _, b in two_stage.w_pairs]
        self._pre_obj = StageObjective(pre, self.pretrained, self.pre_block, batch_size=batch_size)
        if two_stage.case == "A":
            self._ft_obj = StageObjective(ft, self.finetuned, ft.head_names, batch_size=batch_size)
        else:
            w_star = two_stage.embedding_for_finetune(self.pretrained)
            self._ft_obj = StageObjective(ft, self.finetuned, ft.trainable_names, batch_size=batch_size,
                                          proximal=(two_stage.alpha, w_star))
        self._factors: dict[str, DenseFactor] = {}

    def share_pretrain_factor(self, other: "MultiStageInfluence") -> "MultiStageInfluence":
        """Reuse ``other``'s dense factorisation of H_f (eigendecomposition, computed by its first dense solve).

        H_f depends only on the pretraining stage, its optimum (W*, U*) and the block, never on the finetuning
        side, the case or α: the influence for case A and B, or for several α, can share one factorisation.
        Raises ``ValueError`` when the two describe different pretraining Hessians. Returns ``self``.
        Taught in notebook 05 (both cases on one H_f) and used by :func:`msif_lab.reporting.alpha_sweep`.
        """
        if self._pretrain_hessian_key() != other._pretrain_hessian_key():
            raise ValueError("share_pretrain_factor: the two influences have different pretraining Hessians "
                             "(another pretraining stage, optimum, data or pretrain_block). Fix: share only between "
                             "influences built on the same pretraining fit.")
        if "pretrain" in other._factors:
            self._factors["pretrain"] = other._factors["pretrain"]
        return self

    def _pretrain_hessian_key(self) -> str:
        pre = self.two_stage.pretrain
        return config_key({"stage": pre.fingerprint(), "inputs": list(pre.inputs), "targets": pre.targets,
                           "pretrained": self.pretrained, "block": self.pre_block})

    @property
    def m(self) -> int:
        """Number of pretraining examples."""
        return self.two_stage.pretrain.n

    def _solve(self, name: str, obj: StageObjective, solver: Solver, V: Tensor) -> tuple[Tensor, SolveInfo]:
        if solver.method != "dense":
            return solver.solve(obj, V)
        if name not in self._factors:
            self._factors[name] = DenseFactor.from_hessian(obj.hessian())
        x, info = self._factors[name].solve(V, solver.damping)
        info.hvp_calls = info.n_params
        if name == "pretrain":
            _warn_if_indefinite(info, "The pretraining Hessian H_f", "pretrained", "pretrain_solver")
        else:
            hessian = "H_ΘΘ" if self.two_stage.case == "A" else "H_B"
            _warn_if_indefinite(info, f"The finetuning Hessian {hessian}", "finetuned", "finetune_solver")
        return x, info

    def finetune_side(self, test_inputs, test_targets: Tensor) -> tuple[Tensor, Tensor, dict[str, SolveInfo]]:
        """u [T, p_W] (finetuning model's W order), the test losses [T], and the finetuning solve's diagnostics."""
        ts, ft = self.two_stage, self.two_stage.finetune
        test_inputs, test_targets = check_test_batch(ft, test_inputs, test_targets)
        with torch.no_grad():
            test_loss = ft.checked_losses(self.finetuned, test_inputs, test_targets,
                                          "MultiStageInfluence: the finetuning stage's loss on the test batch")
        grads = per_example_grads(ft, self.finetuned, self.w_ft + ft.head_names, test_inputs, test_targets)
        p_w = ParamSpace(self.finetuned, self.w_ft).size
        g_w, g_head = grads[:, :p_w], grads[:, p_w:]
        diag: dict[str, SolveInfo] = {}
        if ts.case == "A":
            if not self.head_refit:
                return g_w, test_loss, diag
            a, diag["finetune"] = self._solve("finetune", self._ft_obj, self.finetune_solver, g_head)
            return g_w - mixed_product(ft, self.finetuned, self.w_ft, ft.head_names, a,
                                       batch_size=self.batch_size), test_loss, diag
        # case B: the finetuning block is (W, Θ) in exactly this order
        s, diag["finetune"] = self._solve("finetune", self._ft_obj, self.finetune_solver, grads)
        return ts.alpha * s[:, :p_w], test_loss, diag

    def test_vectors(self, test_inputs, test_targets: Tensor) -> TestVectors:
        """v_t = (H_f + λI)⁻¹ [u_t; 0_U] over the pretraining block, for every test point: [T, p_P]."""
        u, test_loss, diag = self.finetune_side(test_inputs, test_targets)
        ts = self.two_stage
        u_named = ParamSpace(self.finetuned, self.w_ft).unflatten  # per test point below
        pre_space = self._pre_obj.space
        rhs = torch.zeros(len(u), pre_space.size, dtype=u.dtype, device=u.device)
        for t in range(len(u)):
            by_ft = u_named(u[t])
            full = {n: torch.zeros_like(self.pretrained[n]) for n in pre_space.names}
            full.update({a: by_ft[b] for a, b in ts.w_pairs if a in full})
            rhs[t] = pre_space.flatten(full)
        v, diag["pretrain"] = self._solve("pretrain", self._pre_obj, self.pretrain_solver, rhs)
        return TestVectors(v, test_loss, diag)

    def score_vectors(self, tv: TestVectors, *, inputs=None, targets: Tensor | None = None) -> InfluenceResult:
        """Scores [T, N] of the given examples (default: the pretraining set) from precomputed test vectors."""
        dots = score_examples(self.two_stage.pretrain, self.pretrained, self.pre_block, tv.vectors, inputs=inputs,
                              targets=targets, batch_size=self.batch_size, method=self.scoring)
        return _result(-dots, self.m, tv.test_loss, dict(tv.diagnostics))

    def scores(self, test_inputs, test_targets: Tensor) -> InfluenceResult:
        """I(z_i, x_t) for every pretraining example z_i and test point x_t: [T, m], with −I/m and diagnostics."""
        return self.score_vectors(self.test_vectors(test_inputs, test_targets))
