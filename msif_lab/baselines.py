"""Cheap rankings of pretraining examples, with the same interface as the multi-stage influence scores.

Every method here scores every pretraining example z_i for every finetuning test point x_t and returns a tensor
[T, m] in the sign convention of :mod:`msif_lab.influence`: **larger = more harmful** (the method's guess that
up-weighting z_i raises the test loss of x_t). They share one signature::

    method(two_stage, pretrained, finetuned, test_inputs, test_targets, **options) -> Tensor [T, m]

so a notebook can loop over :data:`METHODS` (or call :func:`score_methods`, which also times each one).

=================  =========================================================================  =============
name               score of z_i for x_t (larger = flagged as more harmful)                     test-specific
=================  =========================================================================  =============
``multi-stage``    I(z_i, x_t), the method (``PAPER.md`` §2, :class:`MultiStageInfluence`)    yes
``features-only``  the same without the re-fitted-head term of u (case A only)                yes
``grad-dot``       −∇_W g(x_t) · ∇_W f(z_i): TracIn at the final checkpoints, no Hessian       yes
``similarity``     cos(φ(z_i), φ(x_t)), φ the embedding (finetuned W)                          yes
``loss``           f(z_i; W*, U*), the pretraining loss of z_i                                  no
``entropy``        entropy of the pretraining model's predictive distribution on z_i           no
``random``         i.i.d. standard normal numbers (seeded)                                      —
=================  =========================================================================  =============

Sign conventions, method by method:

- **grad-dot** is the "no inverse Hessian" analogue of the multi-stage score. Replacing H_f⁻¹ by the identity
  turns the pretraining response to up-weighting z, dP/dε = −H_f⁻¹∇_P f(z), into one unit gradient step on z,
  −∇_P f(z) (TracIn with one checkpoint, the final one, and learning rate 1). The finetuning side has no
  inverse-free analogue of the head-refit term u = ∇_W g − H_WΘ H_ΘΘ⁻¹ ∇_Θ g (the second term exists only
  through H_ΘΘ⁻¹; replacing that by the identity would leave a mixed second derivative that is not a plain
  gradient and has the wrong units), so only the direct path through the features remains: the test point's
  embedding gradient, taken at the finetuned parameters (W*, Θ*) in case A and (W~, Θ~) in case B (in case B,
  α[H_B⁻¹ ∇g]_W with H_B ≈ αI on W is ∇_W g too). The U-block of [u; 0_U] is zero, so
  score = −[∇_W g(x_t); 0_U] · ∇_(W,U) f(z) = −∇_W g(x_t) · ∇_W f(z). Sign: a gradient step of size η on z
  changes the test loss by ≈ −η ∇_W g · ∇_W f = +η · score, so score > 0 means training on z raises the test
  loss, the influence sign.
- **features-only** is the multi-stage score with u = ∇_W g(x_t) (``MultiStageInfluence(..., head_refit=False)``):
  it keeps H_f⁻¹ but assumes the finetuned head does not react. Same sign as the method. Case A only: in case B
  the finetuning solve over (W, Θ) already contains the head, and there is no separate term to drop.
- **similarity** has no sign of its own: "z looks like x_t" says z matters to x_t, not whether it helps or hurts.
  We use +cos, so the "most harmful" end of the ranking is the most similar examples (the natural guess when
  looking for the pretraining data behind a prediction). Features are taken with the finetuned embedding for
  both z and x_t (W* in case A, W~ in case B): the representation the test prediction actually uses.
- **loss** and **entropy** are *not test-specific*: every row of the [T, m] tensor is the same. Larger = more
  suspicious (hard, ambiguous or mislabelled examples have a high loss and, if not memorised, a high entropy).
  They answer "which pretraining data look wrong", not "which data hurt this end task".
- **random** is the floor every method must beat; its rows are independent, so aggregating over test points
  (summing rows) is again random.

Taught in notebook 08 (false transfer: detecting planted harmful data) and notebook 09 (which method agrees
with re-running both stages).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from .curvature import per_example_grads
from .influence import MultiStageInfluence, check_test_batch, score_examples
from .solvers import Solver
from .stages import Params, Stage, TwoStage, as_tuple, index_inputs

ScoreFn = Callable[..., Tensor]
"""``(two_stage, pretrained, finetuned, test_inputs, test_targets, **options) -> [T, m]``."""


def _pretrain_outputs(two_stage: TwoStage, pretrained: Params, batch_size: int | None) -> Tensor:
    pre = two_stage.pretrain
    with torch.no_grad():
        return torch.cat([pre.outputs(pretrained, xs) for _, xs, _ in pre.batches(batch_size)])


def _n_test(two_stage: TwoStage, test_inputs, test_targets: Tensor) -> int:
    check_test_batch(two_stage.finetune, test_inputs, test_targets)
    return len(test_targets)


# ------------------------------------------------------------------------------------------ not test-specific
def loss_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor, *,
                batch_size: int | None = None) -> Tensor:
    """Pretraining loss f(z_i; W*, U*) of every pretraining example, repeated for each test point: [T, m].

    Not test-specific (all rows equal). Larger = more harmful (a high loss flags a hard or mislabelled example).
    ``finetuned`` is unused (kept for the common signature). Taught in notebook 08.
    """
    T = _n_test(two_stage, test_inputs, test_targets)
    pre = two_stage.pretrain
    with torch.no_grad():
        f = torch.cat([pre.losses(pretrained, xs, ys) for _, xs, ys in pre.batches(batch_size)])
    return f.detach().unsqueeze(0).expand(T, -1).clone()


def entropy_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor, *,
                   batch_size: int | None = None) -> Tensor:
    """Entropy −Σ_k p_k log p_k (nats) of the pretraining model's softmax on every pretraining example: [T, m].

    Not test-specific (all rows equal); the label of z is not used. Larger = more harmful (the model is unsure
    about z). Needs a classifier (logits [m, K]). Taught in notebook 08.
    """
    T = _n_test(two_stage, test_inputs, test_targets)
    logits = _pretrain_outputs(two_stage, pretrained, batch_size)
    if logits.dim() != 2:
        raise ValueError(f"entropy_scores needs classifier logits [m, K]; the pretraining model returns "
                         f"{tuple(logits.shape)}.")
    logp = F.log_softmax(logits, dim=1)
    h = -(logp.exp() * logp).sum(1)
    return h.unsqueeze(0).expand(T, -1).clone()


def random_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor, *,
                  seed: int = 0) -> Tensor:
    """I.i.d. standard normal scores [T, m] from a generator seeded with ``seed`` (the chance-level ranking)."""
    T = _n_test(two_stage, test_inputs, test_targets)
    g = torch.Generator().manual_seed(int(seed))
    dtype = next(iter(pretrained.values())).dtype
    return torch.randn(T, two_stage.pretrain.n, generator=g, dtype=dtype).to(test_targets.device)


# ------------------------------------------------------------------------------------------ test-specific
def embedding_features(stage: Stage, params: Params, inputs, *, batch_size: int | None = None) -> Tensor:
    """φ(x): the output of the stage's embedding sub-module [N, d] (flattened), with the given parameters.

    Needs ``stage.embedding`` to name one sub-module (e.g. ``"embed"``), as every model of the course does.
    """
    if not isinstance(stage.embedding, str):
        raise ValueError("embedding_features needs the embedding given as one sub-module name (e.g. 'embed'), "
                         f"got {stage.embedding!r}.")
    module = stage._module.get_submodule(stage.embedding)
    prefix = stage.embedding + "."
    named = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
    buffers = {n[len(prefix):]: b for n, b in stage._module.named_buffers() if n.startswith(prefix)}
    inputs = as_tuple(inputs)
    n = len(inputs[0])
    bs = n if batch_size is None else int(batch_size)
    out = []
    with torch.no_grad():
        for s in range(0, n, bs):
            out.append(functional_call(module, {**buffers, **named}, index_inputs(inputs, slice(s, s + bs))))
    return torch.cat(out).flatten(1)


def similarity_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor,
                      *, batch_size: int | None = None) -> Tensor:
    """Cosine similarity cos(φ(z_i), φ(x_t)) of embeddings, φ with the finetuned W (W* in case A): [T, m].

    Test-specific, sign-less by nature: +cos, so "most harmful" = most similar (see the module docstring).
    ``pretrained`` is unused (the finetuned W is used for both sides). Taught in notebook 08.
    """
    test_inputs, test_targets = check_test_batch(two_stage.finetune, test_inputs, test_targets)
    ft = two_stage.finetune
    w = {b: finetuned[b] for _, b in two_stage.w_pairs}
    phi_t = embedding_features(ft, {**finetuned, **w}, test_inputs, batch_size=batch_size)
    phi_z = embedding_features(ft, {**finetuned, **w}, two_stage.pretrain.inputs, batch_size=batch_size)
    return F.normalize(phi_t, dim=1) @ F.normalize(phi_z, dim=1).T


def gradient_dot_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs,
                        test_targets: Tensor, *, batch_size: int | None = None, scoring: str = "auto") -> Tensor:
    """TracIn-style score without any inverse Hessian: −∇_W g(x_t) · ∇_W f(z_i): [T, m].

    ∇_W g at the finetuned parameters, ∇_W f at the pretrained (W*, U*); equal to −[∇_W g; 0_U]·∇_(W,U) f.
    Sign: a gradient step η on z changes the test loss by ≈ +η·score (> 0 harmful). See the module docstring for
    why this is the inverse-free analogue of the multi-stage score. Taught in notebook 08.
    """
    test_inputs, test_targets = check_test_batch(two_stage.finetune, test_inputs, test_targets)
    ft, pre = two_stage.finetune, two_stage.pretrain
    w_ft = [b for _, b in two_stage.w_pairs]
    w_pre = [a for a, _ in two_stage.w_pairs]
    g_test = per_example_grads(ft, {n: p.detach() for n, p in finetuned.items()}, w_ft, test_inputs, test_targets,
                               batch_size=batch_size)
    pretrained = {n: p.detach() for n, p in pretrained.items()}
    dots = score_examples(pre, pretrained, w_pre, g_test, batch_size=batch_size, method=scoring)
    return -dots


def multi_stage_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor,
                       *, pretrain_solver: Solver = Solver(), finetune_solver: Solver = Solver(),
                       batch_size: int | None = None, head_refit: bool = True, scoring: str = "auto") -> Tensor:
    """The multi-stage influence I(z_i, x_t) [T, m] (:class:`MultiStageInfluence`), in the common signature."""
    inf = MultiStageInfluence(two_stage, pretrained, finetuned, pretrain_solver=pretrain_solver,
                              finetune_solver=finetune_solver, batch_size=batch_size, head_refit=head_refit,
                              scoring=scoring)
    return inf.scores(test_inputs, test_targets).scores


def features_only_scores(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs,
                         test_targets: Tensor, **options) -> Tensor:
    """Multi-stage influence without the re-fitted-head term (u = ∇_W g(x_t)): [T, m]. Case A only.

    Same sign as the method; options as :func:`multi_stage_scores`. Raises ``ValueError`` in case B (there is no
    separate head-refit term to drop there).
    """
    if two_stage.case != "A":
        raise ValueError("features-only scores are defined for case A (embedding fixed in finetuning) only: in case "
                         "B the finetuning solve over (W, Θ) contains the head, there is no separate term to drop.")
    return multi_stage_scores(two_stage, pretrained, finetuned, test_inputs, test_targets, head_refit=False,
                              **options)


METHODS: dict[str, ScoreFn] = {
    "multi-stage": multi_stage_scores,
    "features-only": features_only_scores,
    "grad-dot": gradient_dot_scores,
    "similarity": similarity_scores,
    "loss": loss_scores,
    "entropy": entropy_scores,
    "random": random_scores,
}
"""Every method by name, all with the signature ``(two_stage, pretrained, finetuned, test_inputs, test_targets,
**options) -> [T, m]`` (larger = more harmful)."""

TEST_SPECIFIC = {"multi-stage": True, "features-only": True, "grad-dot": True, "similarity": True, "loss": False,
                 "entropy": False, "random": False}
"""Whether a method's score depends on the test point (False: every row of its [T, m] tensor is the same)."""


@dataclass
class MethodScores:
    """One method's scores [T, m] (larger = more harmful) and the wall-clock seconds it took on this machine."""

    name: str
    scores: Tensor
    seconds: float

    @property
    def total(self) -> Tensor:
        """Scores aggregated over the test points, [m]: Σ_t score(z_i, x_t) (for influence: the influence on the
        total test loss)."""
        return self.scores.sum(0)


def applicable_methods(two_stage: TwoStage, names: Sequence[str] | None = None) -> list[str]:
    """``names`` (default all of :data:`METHODS`) without those undefined for this two-stage problem
    (features-only in case B)."""
    names = list(METHODS) if names is None else list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    return [n for n in names if not (n == "features-only" and two_stage.case != "A")]


def score_methods(two_stage: TwoStage, pretrained: Params, finetuned: Params, test_inputs, test_targets: Tensor, *,
                  names: Sequence[str] | None = None, options: dict[str, dict] | None = None,
                  repeats: int = 1) -> dict[str, MethodScores]:
    """Run each method (default: all applicable) on the same test points; time each one.

    Args:
        names: methods to run (keys of :data:`METHODS`); features-only is skipped silently in case B.
        options: per-method keyword options, e.g. ``{"random": {"seed": 1}, "multi-stage": {"batch_size": 256}}``.
        repeats: run each method this many times and keep the fastest time (timings on a shared CPU are noisy).

    Returns:
        ``{name: MethodScores}`` in the order of ``names``. ``seconds`` is the wall-clock time of one call,
        including every solve and factorisation the method needs (nothing is shared between methods).
    Taught in notebooks 08 and 09.
    """
    options = options or {}
    out = {}
    for name in applicable_methods(two_stage, names):
        best, scores = float("inf"), None
        for _ in range(max(1, int(repeats))):
            start = time.perf_counter()
            scores = METHODS[name](two_stage, pretrained, finetuned, test_inputs, test_targets,
                                   **options.get(name, {}))
            best = min(best, time.perf_counter() - start)
        out[name] = MethodScores(name, scores.detach(), best)
    return out
