"""Inverse-Hessian-vector products: solve (H + λI) x = v for one or many right-hand sides.

One meaning of damping everywhere: λ is a true Tikhonov term added to the Hessian, (H + λI) x = v. Every solver
returns ``(X, SolveInfo)`` so that notebooks and users can show how good the answer is:

- ``dense``: materialise H (small p), eigendecompose, solve exactly; reports the spectrum.
- ``cg``: conjugate gradient with Hessian-vector products; reports iterations and the relative residual, and raises
  :class:`NegativeCurvatureError` when it meets a direction with pᵀ(H + λI)p ≤ 0 (CG's answer would be garbage).
- ``lissa``: the stochastic Neumann series of Agarwal et al. (2017) as used by Koh & Liang:
  x_j = v + (I − (H + λI)/s) x_{j−1},  x ≈ x_J / s,  with mini-batch HVPs and averaged repeats; the scale s is chosen
  above the largest |eigenvalue| by power iteration unless given; raises :class:`SolverDivergedError` when the
  iterate grows faster than a convergent series can. Memory is flat in the depth J (one iterate is kept).

A right-hand side with NaN/inf entries is refused (:class:`msif_lab.curvature.NonFiniteError`) by every solver.

Taught in notebook 02.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from .curvature import NonFiniteError

HVP = Callable[[Tensor], Tensor]


@dataclass
class SolveInfo:
    """Diagnostics of one solve (over all right-hand sides: worst case where it matters)."""

    method: str
    damping: float
    n_params: int
    n_rhs: int = 1
    iterations: int = 0
    hvp_calls: int = 0
    residual: float = float("nan")  # max over right-hand sides of ||(H+λI)x − v|| / ||v||
    converged: bool = True
    eig_min: float | None = None  # of H (undamped), dense only / power-iteration estimate
    eig_max: float | None = None
    n_negative: int | None = None  # eigenvalues of H + λI that are ≤ 0 (dense)
    negative_curvature: bool = False
    scale: float | None = None  # LiSSA
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for printing in a notebook."""
        parts = [f"{self.method}: p={self.n_params}", f"λ={self.damping:g}", f"rhs={self.n_rhs}",
                 f"residual={self.residual:.2e}", f"HVPs={self.hvp_calls}"]
        if self.iterations:
            parts.append(f"iterations={self.iterations}")
        if self.eig_min is not None:
            parts.append(f"eig(H)∈[{self.eig_min:.3g}, {self.eig_max:.3g}]")
        if self.n_negative is not None:
            parts.append(f"non-positive eig(H+λI)={self.n_negative}")
        if self.scale is not None:
            parts.append(f"scale={self.scale:.3g}")
        if not self.converged:
            parts.append("NOT CONVERGED")
        return ", ".join(parts + self.notes)


class SolverError(RuntimeError):
    """A solve that cannot give a trustworthy answer. ``.info`` holds its diagnostics."""

    def __init__(self, message: str, info: SolveInfo):
        super().__init__(message)
        self.info = info


class NegativeCurvatureError(SolverError):
    """CG met a direction p with pᵀ(H + λI)p ≤ 0: H + λI is not positive definite."""


class SolverDivergedError(SolverError):
    """LiSSA's iterate diverged or turned non-finite."""


class IndefiniteHessianWarning(UserWarning):
    """Influence was computed where H + λI has eigenvalues ≤ 0: the parameters are a saddle point, not a minimum,
    so the scores do not predict what re-training would do (the fix: train to a minimum, or damp above −λ_min(H)).

    Warned by :func:`msif_lab.influence.single_stage_influence` and :class:`msif_lab.influence.MultiStageInfluence`
    when a dense solve reports non-positive eigenvalues (CG raises :class:`NegativeCurvatureError` instead). Where a
    saddle is intended, silence it around that call: ``with warnings.catch_warnings():
    warnings.simplefilter("ignore", IndefiniteHessianWarning)``.
    """


def _as_matrix(v: Tensor, method: str) -> tuple[Tensor, bool]:
    """v [p] or [k, p] as [k, p] (and whether it was one vector); refuses NaN/inf entries."""
    if v.dim() == 1:
        V, single = v.unsqueeze(0), True
    elif v.dim() == 2:
        V, single = v, False
    else:
        raise ValueError(f"Right-hand side must be [p] or [k, p], got shape {tuple(v.shape)}.")
    bad = int((~torch.isfinite(V)).sum())
    if bad:
        raise NonFiniteError(
            f"The right-hand side v of the {method} solve has {bad} NaN/inf entries (of {V.numel()}): (H + λI)⁻¹v is "
            "undefined. Fix: v is usually a test point's gradient; check the test inputs and the parameters for "
            "NaN/inf, lower the scale of the data, or compute in float64.")
    return V, single


def _relative_residual(hvp: HVP, damping: float, X: Tensor, V: Tensor) -> tuple[float, int]:
    worst = 0.0
    for x, v in zip(X, V):
        r = hvp(x) + damping * x - v
        worst = max(worst, float(r.norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny)))
    return worst, len(X)


# ----------------------------------------------------------------------------------------------------- dense
@dataclass
class DenseFactor:
    """Eigendecomposition H = Q diag(e) Qᵀ of a symmetric [p, p] Hessian, reusable across right-hand sides."""

    eigenvalues: Tensor  # [p], ascending
    eigenvectors: Tensor  # [p, p]

    @classmethod
    def from_hessian(cls, H: Tensor) -> "DenseFactor":
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"Hessian must be square [p, p], got {tuple(H.shape)}.")
        if not torch.isfinite(H).all():
            raise ValueError("The Hessian has NaN/inf entries. Fix: check the model at the trained point, use float64.")
        e, Q = torch.linalg.eigh(0.5 * (H + H.T))
        return cls(e, Q)

    def solve(self, v: Tensor, damping: float) -> tuple[Tensor, SolveInfo]:
        """x = (H + λI)⁻¹ v for v [p] or [k, p]. Raises ``ValueError`` if H + λI is singular or v has another length
        than p, :class:`~msif_lab.curvature.NonFiniteError` if v has NaN/inf entries."""
        V, single = _as_matrix(v, "dense")
        p = len(self.eigenvalues)
        if V.shape[1] != p:
            raise ValueError(f"The right-hand side has length {V.shape[1]} but the Hessian is {p}×{p}: expected v of "
                             f"shape [{p}] or [k, {p}]. Fix: take v over the same parameters as the Hessian.")
        d = self.eigenvalues + damping
        n_nonpos = int((d <= 0).sum())
        tiny = d.abs().max() * torch.finfo(d.dtype).eps * len(d)
        if (d.abs() <= tiny).any():
            raise ValueError(
                f"H + λI is singular (an eigenvalue of H equals −λ = {-damping:g}). Fix: increase the damping λ."
            )
        X = ((V @ self.eigenvectors) / d) @ self.eigenvectors.T
        Hd = (self.eigenvectors * d) @ self.eigenvectors.T
        res = float(((X @ Hd - V).norm(dim=1) / V.norm(dim=1).clamp_min(torch.finfo(V.dtype).tiny)).max())
        info = SolveInfo("dense", damping, len(d), n_rhs=len(V), hvp_calls=0, residual=res,
                         eig_min=float(self.eigenvalues[0]), eig_max=float(self.eigenvalues[-1]), n_negative=n_nonpos)
        if n_nonpos:
            info.notes.append(f"H + λI is indefinite: {n_nonpos} eigenvalue(s) ≤ 0, so this is a saddle, not a "
                              "minimum; raise λ above −eig_min for an influence that means what it says")
        return (X[0] if single else X), info


def dense_solve(H: Tensor, v: Tensor, damping: float = 0.0) -> tuple[Tensor, SolveInfo]:
    """Exact (H + λI)⁻¹ v from a materialised Hessian H [p, p]; v [p] or [k, p]."""
    return DenseFactor.from_hessian(H).solve(v, damping)


# ----------------------------------------------------------------------------------------------------- CG
def cg_solve(hvp: HVP, v: Tensor, damping: float = 0.0, *, tol: float = 1e-8, max_iter: int | None = None
             ) -> tuple[Tensor, SolveInfo]:
    """Conjugate gradient for (H + λI) x = v; v [p] or [k, p] (solved one column at a time).

    Stops when ||r|| ≤ tol·||v||. Raises :class:`NegativeCurvatureError` if pᵀ(H + λI)p ≤ 0 for a search direction.
    ``info.converged`` is False when ``max_iter`` (default 10·p, at most 1000) was reached first.
    """
    V, single = _as_matrix(v, "cg")
    p = V.shape[1]
    max_iter = min(10 * p, 1000) if max_iter is None else int(max_iter)
    info = SolveInfo("cg", damping, p, n_rhs=len(V))
    X = torch.zeros_like(V)
    for k, b in enumerate(V):
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        rr = r @ r
        stop = (tol * b.norm()) ** 2
        it = 0
        while rr > stop and it < max_iter:
            Ad = hvp(d) + damping * d
            info.hvp_calls += 1
            curv = d @ Ad
            if not curv > 0:
                info.negative_curvature, info.converged, info.iterations = True, False, max(info.iterations, it + 1)
                raise NegativeCurvatureError(
                    f"CG met negative curvature (dᵀ(H+λI)d = {float(curv):.3g} ≤ 0 at iteration {it + 1}, right-hand "
                    f"side {k}) with λ = {damping:g}: H + λI is not positive definite, so CG's answer would be "
                    "meaningless. Fix: increase the damping λ (above −λ_min(H)), train closer to a minimum, or use "
                    "the dense solver to inspect the spectrum.", info)
            a = rr / curv
            x = x + a * d
            r = r - a * Ad
            rr_new = r @ r
            d = r + (rr_new / rr) * d
            rr = rr_new
            it += 1
        info.iterations = max(info.iterations, it)
        info.converged &= bool(rr <= stop)
        X[k] = x
    info.residual, calls = _relative_residual(hvp, damping, X, V)
    info.hvp_calls += calls
    return (X[0] if single else X), info


# ----------------------------------------------------------------------------------------------------- LiSSA
def power_iteration(hvp: HVP, p: int, *, iters: int = 30, like: Tensor | None = None, seed: int = 0) -> float:
    """Estimate of the eigenvalue of largest magnitude of H (a signed Rayleigh quotient) from ``iters`` HVPs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, generator=g, dtype=torch.float64)
    if like is not None:
        x = x.to(like)
    x = x / x.norm()
    lam = 0.0
    for _ in range(iters):
        y = hvp(x)
        lam = float(x @ y)
        n = y.norm()
        if n == 0:
            return 0.0
        x = y / n
    return lam


def lissa_solve(hvp: HVP, v: Tensor, damping: float = 0.0, *, scale: float | None = None, depth: int = 1000,
                repeats: int = 1, sample_hvp: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                tol: float = 0.0, seed: int = 0) -> tuple[Tensor, SolveInfo]:
    """LiSSA estimate of (H + λI)⁻¹ v; v [p] or [k, p].

    Args:
        hvp: exact H·x (used for the scale's power iteration and the final residual).
        scale: s, must exceed the largest eigenvalue of H + λI; default 1.2·|λ_max| from 30 power-iteration HVPs.
        depth: recursion depth J per repeat (the series converges like (1 − λ_min/s)^J).
        repeats: independent runs averaged.
        sample_hvp: ``(x, generator) -> H_batch·x`` on a random mini-batch (stochastic LiSSA); default exact ``hvp``.
        tol: stop a repeat early when ||x_j − x_{j−1}|| ≤ tol·||x_j|| (0: run all J steps). ``info.converged`` is
            False when some repeat reached the depth J before meeting ``tol > 0``; with ``tol = 0`` it only means
            "no divergence" (judge the answer by ``info.residual``).

    Raises :class:`SolverDivergedError` if an iterate is non-finite or exceeds 10·(j+1)·||v||, the largest a
    convergent series can reach (each term has norm ≤ ||v|| when 0 ≤ eig((H+λI)/s) ≤ 2).
    """
    V, single = _as_matrix(v, "lissa")
    p = V.shape[1]
    info = SolveInfo("lissa", damping, p, n_rhs=len(V))
    if scale is None:
        lam = power_iteration(lambda x: hvp(x) + damping * x, p, like=V[0], seed=seed)
        info.hvp_calls += 30
        scale = 1.2 * abs(lam)
        if scale == 0:
            raise ValueError("H + λI is zero along the power-iteration direction; give `scale` explicitly.")
    if not scale > 0:
        raise ValueError(f"LiSSA scale must be > 0, got {scale}.")
    info.scale = float(scale)
    step = hvp if sample_hvp is None else None
    gen = torch.Generator().manual_seed(seed)
    X = torch.zeros_like(V)
    for k, b in enumerate(V):
        acc = torch.zeros_like(b)
        bound = b.norm()
        for _ in range(repeats):
            x = b.clone()
            for j in range(1, depth + 1):
                Hx = step(x) if step is not None else sample_hvp(x, gen)
                info.hvp_calls += 1
                x_new = b + x - (Hx + damping * x) / scale
                n = x_new.norm()
                if not torch.isfinite(n) or n > 10 * (j + 1) * bound:
                    info.converged, info.iterations = False, j
                    raise SolverDivergedError(
                        f"LiSSA diverged at step {j} (||x|| = {float(n):.3g}, limit {float(10 * (j + 1) * bound):.3g}) "
                        f"with scale s = {scale:g} and λ = {damping:g}: the series only converges when every eigenvalue "
                        "of (H + λI)/s lies in (0, 2). Fix: raise the scale above the largest eigenvalue (or let it be "
                        "chosen automatically), and raise λ above −λ_min(H) if H has negative eigenvalues.", info)
                done = tol > 0 and bool((x_new - x).norm() <= tol * n)
                x = x_new
                info.iterations = max(info.iterations, j)
                if done:
                    break
            info.converged &= tol == 0 or done
            acc = acc + x / scale
        X[k] = acc / repeats
    info.residual, calls = _relative_residual(hvp, damping, X, V)
    info.hvp_calls += calls
    return (X[0] if single else X), info


# ----------------------------------------------------------------------------------------------------- config
def _keyword_only(fn: Callable) -> tuple[str, ...]:
    """Names of ``fn``'s keyword-only arguments (the settings after ``*``)."""
    return tuple(n for n, a in inspect.signature(fn).parameters.items() if a.kind is inspect.Parameter.KEYWORD_ONLY)


OPTIONS = {"dense": (), "cg": _keyword_only(cg_solve),
           "lissa": tuple(n for n in _keyword_only(lissa_solve) if n != "sample_hvp") + ("lissa_batch",)}
"""The valid ``Solver.options`` of each method: the solver function's keyword-only arguments (``sample_hvp`` of
LiSSA is built by :class:`Solver` from ``lissa_batch``)."""


@dataclass(frozen=True)
class Solver:
    """Which iHVP method to use and its settings; ``Solver("cg", damping=1e-3)``.

    ``damping`` is the λ of (H + λI)x = v. ``options`` go to :func:`cg_solve` (tol, max_iter) or
    :func:`lissa_solve` (scale, depth, repeats, tol, seed; ``lissa_batch`` for mini-batch HVPs); ``dense`` takes
    none. Unknown option names are refused here, not at the first solve (see :data:`OPTIONS`).
    """

    method: str = "dense"
    damping: float = 0.0
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in ("dense", "cg", "lissa"):
            raise ValueError(f"Unknown solver {self.method!r}; choose 'dense', 'cg' or 'lissa'.")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ValueError(f"damping must be a finite λ ≥ 0, got {self.damping}.")
        valid = OPTIONS[self.method]
        unknown = [k for k in self.options if k not in valid]
        if unknown:
            fix = "pass damping=λ to Solver itself" if unknown == ["damping"] else (
                f"use only {list(valid)}" if valid else "drop the options (or choose 'cg' or 'lissa')")
            raise ValueError(f"Unknown option(s) {unknown} for the {self.method!r} solver; its options are "
                             f"{list(valid)}. Fix: {fix}.")

    def with_damping(self, damping: float) -> "Solver":
        return replace(self, damping=damping)

    def solve(self, objective, V: Tensor) -> tuple[Tensor, SolveInfo]:
        """(H + λI)⁻¹ V for V [p] or [k, p], H the Hessian of ``objective`` (a
        :class:`msif_lab.curvature.StageObjective`, or anything with ``hvp(x, index=None)``, ``hessian()`` and ``n``)."""
        if self.method == "dense":
            x, info = DenseFactor.from_hessian(objective.hessian()).solve(V, self.damping)
            info.hvp_calls = info.n_params
            return x, info
        if self.method == "cg":
            return cg_solve(objective.hvp, V, self.damping, **self.options)
        opts = dict(self.options)
        batch = opts.pop("lissa_batch", None)
        sample = None
        if batch is not None:
            def sample(x, gen):
                return objective.hvp(x, index=torch.randperm(objective.n, generator=gen)[:batch])
        return lissa_solve(objective.hvp, V, self.damping, sample_hvp=sample, **opts)


def check_solver(solver, argument: str) -> Solver:
    """``solver`` if it is a :class:`Solver`; otherwise a ``TypeError`` naming ``argument`` and the fix."""
    if not isinstance(solver, Solver):
        raise TypeError(f"{argument} must be a Solver, got {solver!r}. Fix: {argument}=Solver({solver!r}) "
                        "(or e.g. Solver('cg', damping=1e-3, options={'tol': 1e-8})).")
    return solver
