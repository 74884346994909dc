"""Stage objectives as functions of a flat parameter vector: values, gradients, Hessian-vector products.

A *block* is an ordered list of parameter names of one stage's model (e.g. all of (W, U), or Θ only, or
(W, Θ)); everything outside the block is held at the values given. Vectors in a block's space are flat
tensors [p] in the order of :class:`ParamSpace`.

The objective over a block is

    L(θ) = (1/N) Σ_i w_i · loss(example_i; θ)  +  ½ Σ_k wd_k θ_k²  +  ½ Σ_k α_k (θ_k − a_k)²

where wd_k is the stage's weight decay on the parameters the stage trains, α_k the proximal coefficient on the
embedding in case B (anchor a = W*), and w_i the example weights (1 by default). The data term is
evaluated with ``torch.func`` over mini-batches of ``batch_size`` examples that sum to the full objective, so
memory is bounded by the batch size, never by N; the quadratic terms are added in closed form.

Mixed second derivatives (∇_W∇_Θ G · a) are the W-block of a Hessian-vector product over the joint block
(W, Θ) applied to [0; a]: see :func:`mixed_product`.

Taught in notebook 02 (Hessian-vector products and the solvers that use them).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .stages import Params, Stage, as_tuple, index_inputs


class NonFiniteError(FloatingPointError):
    """A loss, gradient, Hessian-vector product or a solver's right-hand side is NaN or infinite."""


def check_finite(t: Tensor, what: str) -> Tensor:
    """Return ``t`` or raise :class:`NonFiniteError` naming ``what`` and the usual fixes."""
    if not torch.isfinite(t).all():
        raise NonFiniteError(
            f"{what} is not finite (NaN or inf). Fix: check the inputs for NaN/inf, lower the learning rate or "
            "the scale of the data, or compute in float64."
        )
    return t


class ParamSpace:
    """Ordered named parameter shapes <-> one flat vector [p]."""

    def __init__(self, params: Params, names: Sequence[str]):
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"Parameters {missing} are not in the given parameter dict (keys: {list(params)[:12]}).")
        self.names = list(names)
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.size = sum(self.numels)

    def flatten(self, params: Params) -> Tensor:
        """dict -> [p] (a new tensor)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        """[p] -> dict of views of ``vec``."""
        if vec.shape != (self.size,):
            raise ValueError(f"Expected a flat vector of shape ({self.size},), got {tuple(vec.shape)}.")
        return {n: v.view(s) for n, v, s in zip(self.names, torch.split(vec, self.numels), self.shapes)}

    def mask(self, names: Sequence[str], like: Tensor) -> Tensor:
        """[p] with 1 on the entries of ``names``, 0 elsewhere (dtype and device of ``like``)."""
        chosen = set(names)
        return torch.cat([torch.full((k,), float(n in chosen), dtype=like.dtype, device=like.device)
                          for n, k in zip(self.names, self.numels)])


class StageObjective:
    """A stage's training objective over a block of its parameters (see the module docstring).

    Args:
        stage: the stage (model, per-example loss, training data).
        params: values of every trainable parameter of the stage's model (the block is read from here).
        block: names of the parameters the objective is a function of.
        regularised: names carrying weight decay ``stage.weight_decay`` (default: the whole block).
        proximal: ``(alpha, anchor)``: adds (α/2)·||θ_anchor − anchor||² over the names in ``anchor``.
        sample_weights: [N] example weights w_i (default ones); 0 removes an example, 1 + N·ε up-weights it by ε.
        batch_size: examples per mini-batch for every pass (``None``: all at once).
        inputs, targets: evaluate on this data instead of the stage's training set (e.g. test points).
    """

    def __init__(self, stage: Stage, params: Params, block: Sequence[str], *, regularised: Sequence[str] | None = None,
                 proximal: tuple[float, Params] | None = None, sample_weights: Tensor | None = None,
                 batch_size: int | None = None, inputs=None, targets: Tensor | None = None):
        self.stage = stage
        self.space = ParamSpace(params, block)
        self.fixed = {n: p.detach() for n, p in params.items() if n not in self.space.names}
        self.theta = self.space.flatten({n: params[n].detach() for n in self.space.names})
        self.inputs = stage.inputs if inputs is None else as_tuple(inputs)
        self.targets = stage.targets if targets is None else targets
        n = len(self.targets)
        self.n = n
        if sample_weights is None:
            sample_weights = self.theta.new_ones(n)
        if sample_weights.shape != (n,):
            raise ValueError(f"sample_weights must have shape ({n},), got {tuple(sample_weights.shape)}.")
        self.weights = sample_weights.to(self.theta)
        self.batch_size = n if batch_size is None else int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        reg = self.space.names if regularised is None else [r for r in regularised if r in self.space.names]
        self.wd = stage.weight_decay * self.space.mask(reg, self.theta)
        self.alpha = torch.zeros_like(self.theta)
        self.anchor = torch.zeros_like(self.theta)
        if proximal is not None:
            a, anchor = proximal
            names = [k for k in anchor if k in self.space.names]
            self.alpha = float(a) * self.space.mask(names, self.theta)
            full = {k: torch.zeros_like(v) for k, v in self.space.unflatten(self.theta).items()}
            full.update({k: anchor[k].detach() for k in names})
            self.anchor = self.space.flatten(full)

    def at(self, theta: Tensor) -> "StageObjective":
        """The same objective with its expansion point (where gradients and HVPs are taken) moved to ``theta`` [p]."""
        if theta.shape != self.theta.shape:
            raise ValueError(f"Expected a point of shape {tuple(self.theta.shape)}, got {tuple(theta.shape)}.")
        new = copy.copy(self)
        new.theta = theta.detach()
        return new

    # --------------------------------------------------------------- data term
    def _slices(self, index: Tensor | None = None):
        if index is not None:
            yield index
            return
        for s in range(0, self.n, self.batch_size):
            yield slice(s, min(s + self.batch_size, self.n))

    def batch_losses(self, theta: Tensor, index) -> Tensor:
        """Per-example losses [B] of rows ``index`` at flat parameters ``theta``."""
        params = {**self.fixed, **self.space.unflatten(theta)}
        return self.stage.losses(params, index_inputs(self.inputs, index), self.targets[index])

    def _batch_term(self, theta: Tensor, index, scale: float) -> Tensor:
        return (self.weights[index] * self.batch_losses(theta, index)).sum() * scale

    def _reg(self, theta: Tensor) -> Tensor:
        return 0.5 * (self.wd * theta**2).sum() + 0.5 * (self.alpha * (theta - self.anchor) ** 2).sum()

    # --------------------------------------------------------------- public
    def value_and_grad(self, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Objective value (scalar) and gradient [p] at ``theta`` (default: the given parameters)."""
        theta = self.theta if theta is None else theta
        total = self._reg(theta).detach()
        g = self.wd * theta + self.alpha * (theta - self.anchor)
        for index in self._slices():
            x = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                val = self._batch_term(x, index, 1.0 / self.n)
                (gb,) = torch.autograd.grad(val, x)
            total = total + val.detach()
            g = g + gb
        check_finite(total, "The training objective")
        return total, check_finite(g, "The gradient of the training objective")

    def hvp(self, v: Tensor, index: Tensor | None = None) -> Tensor:
        """(∇²L) v [p] (no damping). With ``index`` (a 1-D index tensor), the data term is estimated on those rows only
        (an unbiased mini-batch estimate, as LiSSA uses); otherwise it is exact over all N examples."""
        scale = 1.0 / (self.n if index is None else len(index))
        out = (self.wd + self.alpha) * v
        for idx in self._slices(index):
            f = lambda th, idx=idx: self._batch_term(th, idx, scale)  # noqa: E731
            out = out + jvp(grad(f), (self.theta,), (v,))[1]
        return check_finite(out, "A Hessian-vector product")

    def hvp_many(self, V: Tensor) -> Tensor:
        """(∇²L) V for V [k, p] -> [k, p], vectorised over the k directions."""
        out = V * (self.wd + self.alpha)
        for idx in self._slices():
            f = lambda th, idx=idx: self._batch_term(th, idx, 1.0 / self.n)  # noqa: E731
            out = out + vmap(lambda v: jvp(grad(f), (self.theta,), (v,))[1])(V)
        return check_finite(out, "A Hessian-vector product")

    def hessian(self, chunk: int = 256) -> Tensor:
        """The dense Hessian [p, p] (symmetrised), built from ⌈p/chunk⌉ vectorised HVP passes. For small p only.

        The last few Hessians are remembered by the *content* of the objective (stage, data, example weights,
        regularisers, expansion point), so the influence solve and the re-run harness, which both need the Hessian
        at the same optimum, build it once. A copy is returned: callers may modify it.
        """
        key = self._content_key()
        if key not in _HESSIANS:
            p = self.space.size
            eye = torch.eye(p, dtype=self.theta.dtype, device=self.theta.device)
            H = torch.cat([self.hvp_many(eye[s:s + chunk]) for s in range(0, p, chunk)])
            _HESSIANS[key] = 0.5 * (H + H.T)
            while len(_HESSIANS) > _REMEMBERED_HESSIANS:
                _HESSIANS.popitem(last=False)
        _HESSIANS.move_to_end(key)
        return _HESSIANS[key].clone()

    def _content_key(self) -> str:
        from .cache import config_key

        return config_key({"stage": self.stage.fingerprint(), "inputs": list(self.inputs), "targets": self.targets,
                           "names": self.space.names, "theta": self.theta, "weights": self.weights, "wd": self.wd,
                           "alpha": self.alpha, "anchor": self.anchor})


_REMEMBERED_HESSIANS = 4
_HESSIANS: OrderedDict[str, Tensor] = OrderedDict()
"""Dense Hessians by content key (see :meth:`StageObjective.hessian`), oldest first."""


def per_example_grads(stage: Stage, params: Params, block: Sequence[str], inputs, targets: Tensor,
                      batch_size: int | None = None) -> Tensor:
    """∇_θ loss(x_k) for every example k: [K, p] in the block's flat order (data term only, no regulariser).

    Vectorised with ``torch.func.vmap`` over examples, ``batch_size`` examples at a time.
    """
    space = ParamSpace(params, block)
    fixed = {n: p.detach() for n, p in params.items() if n not in space.names}
    theta = space.flatten({n: params[n].detach() for n in space.names})
    inputs = as_tuple(inputs)

    def one(th, *args):
        *xs, y = args
        return stage.losses({**fixed, **space.unflatten(th)}, tuple(x.unsqueeze(0) for x in xs), y.unsqueeze(0))[0]

    per = vmap(grad(one), in_dims=(None,) + (0,) * (len(inputs) + 1))
    k = len(targets)
    bs = k if batch_size is None else int(batch_size)
    out = [per(theta, *index_inputs(inputs, slice(s, s + bs)), targets[s:s + bs]) for s in range(0, k, bs)]
    return check_finite(torch.cat(out), "A per-example gradient")


def mixed_product(stage: Stage, params: Params, w_names: Sequence[str], head_names: Sequence[str], a: Tensor,
                  *, batch_size: int | None = None) -> Tensor:
    """∇_W ∇_Θ G · a: [T, p_W] for a [T, p_Θ] (data term of the stage's objective; regularisers have no mixed term).

    Computed as the W-block of the joint Hessian over (W, Θ) applied to [0; a]. Taught in notebook 03.
    """
    joint = StageObjective(stage, params, list(w_names) + list(head_names), batch_size=batch_size)
    p_w = joint.space.size - a.shape[-1]
    V = torch.cat([a.new_zeros(a.shape[0], p_w), a], dim=1)
    return joint.hvp_many(V)[:, :p_w]
