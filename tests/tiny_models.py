"""Tiny models, data and reference computations shared by the core-library tests.

Everything is float64 unless a test asks otherwise, built explicitly (``dtype=``) so that importing this module
never changes torch's global default dtype for other tests. Trained two-stage problems are cached per process
(``functools.lru_cache``): tests must treat them as read-only (the parameter dicts are detached tensors; a test
that needs to modify one clones it first).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from msif_lab.models import MLPEmbedding, classifier
from msif_lab.stages import Stage, TwoStage
from msif_lab.curvature import StageObjective
from msif_lab.train import finetune, pretrain

# These problems have p ≤ 60 parameters: intra-op threads only add overhead, and on a shared, loaded CPU their
# spin-waiting made this suite ~8x slower (measured: 69 s with one thread vs > 580 s with two, load 12 on 2 cores).
torch.set_num_threads(1)

DT = torch.float64
TIGHT = dict(tol=1e-11, max_iter=2000, newton_steps=5)
"""Fit settings that reach ||grad|| ~ 1e-15 on the tiny problems (L-BFGS, then Newton polish)."""

M, N, D, WIDTH, T = 40, 30, 5, 3, 3
"""pretraining examples, finetuning examples, input dimension, embedding width, test points."""


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy [B]."""
    return F.cross_entropy(out, y, reduction="none")


def ce_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A *bad* loss: reduced over the batch (must be rejected)."""
    return F.cross_entropy(out, y)


def sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example half squared error [B] for outputs [B, 1]."""
    return 0.5 * (out[:, 0] - y) ** 2


def data(seed: int = 0, dtype=DT, m: int = M):
    """Pretraining (3 classes), finetuning (2 classes) and test data, as in /tmp/dev/t1.py."""
    g = torch.Generator().manual_seed(seed)  # drawn in float64 whatever ``dtype``: the same data in every dtype
    Z = torch.randn(m, D, generator=g, dtype=DT)
    yz = (Z[:, 0] + 0.5 * Z[:, 1] > 0).long() + (Z[:, 2] > 0.5).long()
    X = torch.randn(N, D, generator=g, dtype=DT)
    yx = (X[:, 0] - X[:, 3] > 0).long()
    Xt = torch.randn(T, D, generator=g, dtype=DT)
    yt = (Xt[:, 0] - Xt[:, 3] > 0).long()
    return Z.to(dtype), yz, X.to(dtype), yx, Xt.to(dtype), yt


def models(seed: int = 1, dtype=DT, depth: int = 1):
    """(pretraining model, finetuning model) sharing an MLP embedding architecture under the name ``embed``."""
    torch.manual_seed(seed)
    pre = classifier(MLPEmbedding(D, width=WIDTH, depth=depth), 3).to(dtype)
    ft = classifier(MLPEmbedding(D, width=WIDTH, depth=depth), 2).to(dtype)
    return pre, ft


def make_two_stage(alpha=None, *, dtype=DT, wd=1e-2, seed=1, depth=1, pre_model=None, ft_model=None, m=M):
    """The tiny two-stage problem; returns (TwoStage, test inputs, test targets)."""
    Z, yz, X, yx, Xt, yt = data(dtype=dtype, m=m)
    pre_m, ft_m = models(seed, dtype, depth)
    pre_m = pre_model if pre_model is not None else pre_m
    ft_m = ft_model if ft_model is not None else ft_m
    ts = TwoStage(Stage(pre_m, ce, Z, yz, weight_decay=wd), Stage(ft_m, ce, X, yx, weight_decay=wd), alpha=alpha)
    return ts, Xt, yt


class Fit:
    """A fitted stage's parameters and final gradient norm (what the tests need of a ``FitResult``)."""

    def __init__(self, params, grad_norm):
        self.params, self.grad_norm = params, grad_norm


def polish(stage, params, names, *, proximal=None, sample_weights=None, steps=6) -> Fit:
    """Plain Newton steps on the dense Hessian of the stage objective until ||grad|| stops shrinking.

    The tests' own polish, independent of ``fit_stage(newton_steps=...)`` (whose step acceptance rejects the last
    steps at the rounding floor: see test_train.py::test_newton_polish_reaches_rounding_floor).
    """
    obj = StageObjective(stage, params, names, proximal=proximal, sample_weights=sample_weights)
    theta = obj.theta
    _, g = obj.value_and_grad(theta)
    for _ in range(steps):
        if g.norm() < 1e-14:
            break
        cand = theta - torch.linalg.solve(obj.at(theta).hessian(), g)
        _, g_new = obj.value_and_grad(cand)
        if not g_new.norm() < g.norm():
            break
        theta, g = cand, g_new
    out = {**params, **obj.space.unflatten(theta.clone())}
    return Fit({n: out[n].detach() for n in params}, float(g.norm()))


def tight_pretrain(ts, init=None, weights=None) -> Fit:
    """Pretraining to the rounding floor: the library's fit, then :func:`polish`."""
    fit = pretrain(ts, init, sample_weights=weights, **TIGHT)
    return polish(ts.pretrain, fit.params, ts.pretrain.trainable_names, sample_weights=weights)


def tight_finetune(ts, pretrained, init=None) -> Fit:
    """Finetuning (case A or B) to the rounding floor: the library's fit, then :func:`polish`."""
    fit = finetune(ts, pretrained, init, **TIGHT)
    prox = None if ts.alpha is None else (ts.alpha, ts.embedding_for_finetune(pretrained))
    return polish(ts.finetune, fit.params, ts.finetune_trained_names, proximal=prox)


@functools.lru_cache(maxsize=None)
def _pretrained():
    ts, _, _ = make_two_stage(None)
    pre = tight_pretrain(ts)
    assert pre.grad_norm < 1e-13, pre.grad_norm
    return pre


@functools.lru_cache(maxsize=None)
def trained(alpha=None):
    """(TwoStage, pretrain Fit, finetune Fit, Xt, yt), trained to a tight optimum; cached per process.

    Pretraining does not depend on α, so every case shares one pretraining fit.
    """
    ts, Xt, yt = make_two_stage(alpha)
    pre = _pretrained()
    ft = tight_finetune(ts, pre.params)
    assert ft.grad_norm < 1e-13 * max(1.0, alpha or 1.0), ft.grad_norm  # α·||W|| sets the rounding floor
    return ts, pre, ft, Xt, yt


@functools.lru_cache(maxsize=None)
def validation_problem(alpha=None, m: int = 160):
    """Like :func:`trained` with a larger pretraining set, where removing one example (ε = −1/m) is a small
    enough perturbation for the first-order prediction to track the actual change closely (m = 40 gives Pearson
    0.4–0.9 depending on wd: a handful of examples move the tiny model non-linearly)."""
    ts, Xt, yt = make_two_stage(alpha, m=m)
    pre = tight_pretrain(ts)
    ft = tight_finetune(ts, pre.params)
    assert pre.grad_norm < 1e-13 and ft.grad_norm < 1e-13, (pre.grad_norm, ft.grad_norm)
    return ts, pre, ft, Xt, yt


def rerun_test_loss(ts, pre, ft, Xt, yt, weights):
    """Test losses [T] after re-running both stages with pretraining example weights ``weights`` (warm start)."""
    p2 = tight_pretrain(ts, pre.params, weights)
    f2 = tight_finetune(ts, p2.params, ft.params)
    with torch.no_grad():
        return ts.finetune.losses(f2.params, Xt if isinstance(Xt, tuple) else (Xt,), yt)


def fd_influence(ts, pre, ft, Xt, yt, i: int, eps: float = 1e-4):
    """Central finite difference d test_loss / dε for up-weighting pretraining example i by ε: [T]."""
    m = ts.pretrain.n
    w = torch.ones(m, dtype=DT)
    w[i] += m * eps
    up = rerun_test_loss(ts, pre, ft, Xt, yt, w)
    w[i] -= 2 * m * eps
    down = rerun_test_loss(ts, pre, ft, Xt, yt, w)
    return (up - down) / (2 * eps)


def random_spd(p: int, *, cond: float = 20.0, seed: int = 0, dtype=DT) -> torch.Tensor:
    """A random symmetric positive definite [p, p] matrix with eigenvalues log-spaced in [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=dtype))
    e = torch.logspace(-math.log10(cond), 0.0, p, dtype=dtype)
    return (Q * e) @ Q.T


def random_symmetric(eigenvalues, *, seed: int = 0, dtype=DT) -> torch.Tensor:
    """A random symmetric matrix with the given eigenvalues."""
    e = torch.as_tensor(eigenvalues, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(e), len(e), generator=g, dtype=dtype))
    return (Q * e) @ Q.T


def snapshot(model: nn.Module):
    """Everything about a user's model the library must not change: values, requires_grad, buffers, mode."""
    return ({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            {n: mod.training for n, mod in model.named_modules()})


def assert_unchanged(model: nn.Module, snap) -> None:
    params, buffers, modes = snapshot(model)
    p0, b0, m0 = snap
    assert params.keys() == p0.keys()
    for n in p0:
        assert torch.equal(params[n][0], p0[n][0]), f"parameter {n} was modified"
        assert params[n][1] == p0[n][1], f"requires_grad of {n} was changed"
    for n in b0:
        assert torch.equal(buffers[n], b0[n]), f"buffer {n} was modified"
    assert modes == m0, "train/eval mode of the user's model was changed"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b||."""
    return float((a - b).norm() / b.norm())
