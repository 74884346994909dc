"""The scoring pass: D[t, i] = v_t · ∇_block loss(z_i) for every example z_i and test-side vector v_t, fast.

Influence scores are I(z_i, x_t) = −v_t · ∇ loss(z_i) (``PAPER.md`` §2), so once the test-side vectors V [T, p]
are known, the only work left is this [T, N] table of dot products. It is computed without a Python loop over
examples, ``batch_size`` examples at a time (memory is bounded by the batch, never by N), by one of:

``"jvp"``      forward-mode directional derivatives: d/ds loss(z_i; θ + s·v_t) for all i at once, one JVP (a forward
               pass carrying a tangent) per test vector, vectorised over the T vectors. Best for a few test points.
``"grad"``     per-example gradients [B, p] (``torch.func.vmap`` of ``grad``) times Vᵀ. Works for any model, but
               materialises every example's full gradient.
``"factored"`` the outer-product structure of linear and convolution layers. Such a layer maps inputs a to
               outputs W a + b at P positions (1 for a plain linear layer, every pixel of a convolution, every
               token of a sequence), so one example's gradient is Σ_pos g aᵀ (weight) and Σ_pos g (bias), g being
               the gradient of its loss with respect to the layer's outputs. One forward pass with hooks records a;
               one backward pass of Σ_i loss(z_i) gives every g (examples are independent, so the gradient of the
               sum with respect to example i's activations is example i's own). Then for each layer either
                 - "outer": form Σ_pos g aᵀ per example ([B, out, in·kh·kw]; for a convolution one grouped
                   weight-gradient kernel with the batch as groups) and multiply by the T reshaped test vectors:
                   cost ∝ B·p·(P + T); or
                 - "direct": run the layer's own operation on a with the T test vectors stacked as output
                   channels, multiply by g and sum over positions (⟨V_t, Σ_pos g aᵀ⟩ = Σ_pos gᵀ V_t a):
                   cost ∝ B·p·P·T,
               whichever is cheaper ("direct" when P = 1 or T = 1). For a single vector it runs in forward mode
               instead: each hooked layer adds the "direct" term to its output's tangent, so no backward pass is
               needed. Only layers whose parameters are in the block are touched. It needs every block parameter
               to be the weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` (groups = 1, zero padding) and
               per-example losses that do not interact (eval mode, no batch statistics); otherwise it warns why
               and falls back to ``"grad"``. Before trusting its hooks it checks itself on the first two examples
               against plain autograd, which catches what the structure cannot show: a weight also used outside
               its layer's ``forward``, a layer fed a reshaped batch, examples that interact.
``"auto"``     ``"jvp"`` for one vector; beyond, ``"factored"`` where it applies, else ``"jvp"`` up to
               :data:`JVP_MAX_TESTS` vectors and ``"grad"`` beyond. :func:`choose_method` says which and why.

A forward-mode JVP costs about 2–3 forward passes, so for one test point it is the natural choice. For many test
points the floor is the T·p multiply-adds per example of the dot products themselves; for a convolution that is
far less than its forward pass (which costs P·p per example), for a dense layer (P = 1) it is T times its forward
pass — no method can score T vectors against a dense layer's gradients for less. ``benchmarks/scoring.py`` measures
all of this. Nothing here keeps state between calls: hooks are removed before returning, even on error.

Used by the scoring pass of every influence score (:mod:`msif_lab.influence`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vmap

from .curvature import ParamSpace, check_finite, per_example_grads
from .stages import Params, Stage, as_tuple, index_inputs

METHODS = ("auto", "jvp", "grad", "factored")
"""The scoring methods of :func:`score_dots` (see the module docstring)."""

JVP_ALWAYS = 1
"""``"auto"`` uses a forward-mode JVP for this many test vectors or fewer, whatever the model (measured:
``benchmarks/scoring.py``; it needs no hooks and no self-check, and costs about as much as ``"factored"``)."""

JVP_MAX_TESTS = 8
"""Where ``"factored"`` does not apply, ``"auto"`` uses forward-mode JVPs up to this many vectors, ``"grad"`` beyond."""

JVP_CHUNK = 16
"""Test vectors carried by one vectorised JVP pass (memory ∝ batch_size · JVP_CHUNK · activations)."""

_SUPPORTED = (nn.Linear, nn.Conv2d)


class FactoredUnsupported(RuntimeError):
    """The model (or block) is outside what the ``"factored"`` method handles; the message says why."""


# ----------------------------------------------------------------------------------------------------- public
def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"Unknown scoring method {method!r}; choose from {list(METHODS)}.")
    return method


def score_dots(stage: Stage, params: Params, block: Sequence[str], vectors: Tensor, *, inputs=None,
               targets: Tensor | None = None, batch_size: int | None = None, method: str = "auto") -> Tensor:
    """D[t, i] = vectors[t] · ∇_block loss(example_i): [T, N] for vectors [T, p] in the block's flat order.

    Args:
        stage: the stage whose per-example loss is differentiated (eval mode, as every Stage is).
        params: values of the stage's trainable parameters; the gradient is taken at this point.
        block: the ordered parameter names the vectors live on (a :class:`msif_lab.curvature.ParamSpace`).
        vectors: [T, p] test-side vectors.
        inputs, targets: the examples to score (default: the stage's training set).
        batch_size: examples per pass (memory bound); ``None``: all at once.
        method: ``"auto"``, ``"jvp"``, ``"grad"`` or ``"factored"`` (see the module docstring). An explicit
            ``"factored"`` that cannot apply warns and falls back to ``"grad"``.
    """
    block = list(block)
    space = ParamSpace(params, block)
    if vectors.dim() != 2 or vectors.shape[1] != space.size:
        raise ValueError(f"vectors must be [T, {space.size}] (T test vectors over the block's {space.size} "
                         f"parameters), got {tuple(vectors.shape)}.")
    check_method(method)
    inputs = stage.inputs if inputs is None else as_tuple(inputs)
    targets = stage.targets if targets is None else targets
    for t in inputs:
        if len(t) != len(targets):
            raise ValueError(f"The examples to score have {len(t)} input rows but {len(targets)} targets.")
    ref = params[block[0]]
    vectors = vectors.detach().to(dtype=ref.dtype, device=ref.device)
    params = {n: p.detach() for n, p in params.items()}
    slices = _slices(len(targets), batch_size)
    if len(targets) == 0 or len(vectors) == 0:
        return vectors.new_zeros(len(vectors), len(targets))

    auto = method == "auto"
    if auto:
        method, _ = choose_method(stage, block, len(vectors))
    if method == "factored":
        try:
            plan = _plan(stage, block, space)
            _verify(stage, params, block, space, plan, inputs, targets)
        except FactoredUnsupported as err:
            method = _unfactored_choice(len(vectors)) if auto else "grad"
            warnings.warn(f"score_dots: the 'factored' method does not apply ({err}); using {method!r} instead.",
                          stacklevel=2)
        else:
            if len(vectors) == 1:
                cols = [_factored_forward_mode(stage, params, plan, vectors[0], index_inputs(inputs, sl),
                                               targets[sl])[:, None] for sl in slices]
            else:
                cols = [_factored_batch(stage, params, plan, vectors, index_inputs(inputs, sl), targets[sl])
                        for sl in slices]
            return check_finite(torch.cat(cols, dim=0).T.contiguous(), "A factored per-example dot product")
    if method == "grad":
        cols = [per_example_grads(stage, params, block, index_inputs(inputs, sl), targets[sl]) @ vectors.T
                for sl in slices]
        return check_finite(torch.cat(cols, dim=0).T.contiguous(), "A per-example gradient dot product")
    return _jvp_dots(stage, params, space, vectors, inputs, targets, slices)


def factored_support(stage: Stage, block: Sequence[str]) -> tuple[bool, str]:
    """Whether ``"factored"`` can score this block of this stage's model, and if not, why (structure only)."""
    try:
        _plan(stage, list(block), None)
    except FactoredUnsupported as err:
        return False, str(err)
    return True, "every block parameter is the weight or bias of an nn.Linear or nn.Conv2d"


def choose_method(stage: Stage, block: Sequence[str], n_vectors: int) -> tuple[str, str]:
    """The method ``"auto"`` uses for ``n_vectors`` test vectors, and a sentence saying why.

    ``"jvp"`` for at most :data:`JVP_ALWAYS` vectors; beyond, ``"factored"`` wherever the block's layers allow it
    (one forward and one backward pass, then per-layer products), else ``"jvp"`` up to :data:`JVP_MAX_TESTS`
    vectors and ``"grad"`` beyond. (If the factored self-check then fails, ``"auto"`` warns and uses that
    jvp/grad rule.)
    """
    if n_vectors <= JVP_ALWAYS:
        return "jvp", f"{n_vectors} test vector(s) ≤ {JVP_ALWAYS}: one forward-mode JVP pass"
    ok, why = factored_support(stage, block)
    if ok:
        return "factored", f"{why}: one forward and one backward pass, then per-layer outer products"
    method = _unfactored_choice(n_vectors)
    size = "≤" if method == "jvp" else ">"
    return method, f"'factored' does not apply ({why}); {n_vectors} test vectors {size} {JVP_MAX_TESTS}"


def _unfactored_choice(n_vectors: int) -> str:
    return "jvp" if n_vectors <= JVP_MAX_TESTS else "grad"


# ----------------------------------------------------------------------------------------------------- jvp
def _jvp_dots(stage, params, space, vectors, inputs, targets, slices) -> Tensor:
    if len(vectors) == 1:  # one tangent: plain forward-mode AD (dual tensors) is leaner than torch.func.jvp
        tangent = space.unflatten(vectors[0])
        with fwAD.dual_level(), torch.no_grad():
            dual = {n: (fwAD.make_dual(p, tangent[n]) if n in tangent else p) for n, p in params.items()}
            cols = [fwAD.unpack_dual(stage.losses(dual, index_inputs(inputs, sl), targets[sl])).tangent
                    for sl in slices]
        cols = [c if c is not None else vectors.new_zeros(sl.stop - sl.start) for c, sl in zip(cols, slices)]
        return check_finite(torch.cat(cols)[None], "A directional derivative of the per-example losses")
    fixed = {n: p for n, p in params.items() if n not in space.names}
    theta = space.flatten(params)
    cols = []
    for sl in slices:
        xs, ys = index_inputs(inputs, sl), targets[sl]

        def losses(th):
            return stage.losses({**fixed, **space.unflatten(th)}, xs, ys)

        rows = [vmap(lambda v: jvp(losses, (theta,), (v,))[1])(vectors[s:s + JVP_CHUNK])
                for s in range(0, len(vectors), JVP_CHUNK)]
        cols.append(torch.cat(rows, dim=0))
    return check_finite(torch.cat(cols, dim=1), "A directional derivative of the per-example losses")


def _slices(n: int, batch_size: int | None) -> list[slice]:
    bs = n if batch_size is None else int(batch_size)
    if bs <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return [slice(s, min(s + bs, n)) for s in range(0, n, bs)]


# ----------------------------------------------------------------------------------------------------- factored
@dataclass
class _Layer:
    """One hooked module and the block columns of its parameters: attr -> (flat offset, shape)."""

    module: nn.Module
    name: str
    cols: dict[str, tuple[int, torch.Size]] = field(default_factory=dict)
    param_names: list[str] = field(default_factory=list)  # block names whose tensors this layer uses
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input, output) per call, this pass only


def _plain_forward(module: nn.Module) -> bool:
    """An nn.Linear / nn.Conv2d (or a subclass that keeps its forward) whose gradient has the outer-product form."""
    if not isinstance(module, _SUPPORTED):
        return False
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward:
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and _conv_padding(module) is not None
    return True


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric integer padding of a convolution (None where unfold cannot express it, e.g. 'same' with even k)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def _plan(stage: Stage, block: list[str], space: ParamSpace | None) -> list[_Layer]:
    """The hooked layers for this block, or :class:`FactoredUnsupported` naming the first parameter that is not."""
    module = stage._module
    offsets = {}
    if space is not None:
        off = 0
        for n, k, s in zip(space.names, space.numels, space.shapes):
            offsets[n] = (off, s)
            off += k
    aliases: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    named = dict(module.named_parameters(remove_duplicate=False))
    layers: dict[int, _Layer] = {}
    for name in block:
        if name not in named:
            raise FactoredUnsupported(f"{name!r} is not a parameter of the stage's model")
        for alias in aliases[id(named[name])]:
            path, _, attr = alias.rpartition(".")
            owner = module.get_submodule(path)
            if attr not in ("weight", "bias") or not _plain_forward(owner):
                kind = type(owner).__name__
                raise FactoredUnsupported(
                    f"block parameter {alias!r} belongs to a module of type {kind}, not to a plain nn.Linear or nn.Conv2d "
                    "(groups=1, zero padding)")
            layer = layers.setdefault(id(owner), _Layer(owner, path or "<model>"))
            layer.cols[attr] = offsets.get(name, (0, named[name].shape))
            layer.param_names.append(name)
    return list(layers.values())


def _check_call(layer: _Layer, a: Tensor, out: Tensor, batch: int) -> None:
    want = 4 if isinstance(layer.module, nn.Conv2d) else 2
    if a.dim() < want or a.shape[0] != batch or out.shape[0] != batch or (want == 4 and a.dim() != 4):
        raise FactoredUnsupported(
            f"layer {layer.name!r} was called on a tensor of shape {tuple(a.shape)} for a batch of {batch} examples: "
            "its leading dimension is not the example dimension")


def _forward_backward(stage: Stage, params: Params, plan: list[_Layer], xs, ys) -> list[tuple[_Layer, Tensor, Tensor]]:
    """One hooked forward pass and one backward pass: (layer, input a, output gradient g) for every call."""
    for layer in plan:
        layer.calls = []

    def hook_for(layer):
        def hook(mod, args, out):
            layer.calls.append((args[0], out))
        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in plan]
    try:
        names = {n for layer in plan for n in layer.param_names}
        live = {n: (p.requires_grad_(True) if n in names else p) for n, p in
                ((n, p.detach()) for n, p in params.items())}
        with torch.enable_grad():
            total = stage.losses(live, xs, ys).sum()
            calls = [(layer, a, out) for layer in plan for a, out in layer.calls]
            for layer, a, out in calls:
                _check_call(layer, a, out, len(ys))
            grads = torch.autograd.grad(total, [out for _, _, out in calls], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for layer in plan:
            layer.calls = []
    return [(layer, a.detach(), g) for (layer, a, _), g in zip(calls, grads) if g is not None]


def _per_example_weight_grads(layer: _Layer, a: Tensor, g: Tensor) -> Tensor:
    """Σ_pos g aᵀ for every example: [B, out·k] in the weight's flat order (k = in, or in·kh·kw for a conv)."""
    mod, B = layer.module, a.shape[0]
    if isinstance(mod, nn.Linear):
        A, G = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
        if A.shape[1] == 1:
            return (G[:, 0, :, None] * A[:, 0, None, :]).reshape(B, -1)
        return torch.bmm(G.transpose(1, 2), A).reshape(B, -1)
    # a convolution's weight gradient with the batch folded into groups: one grouped weight-gradient kernel
    c_in, h, w = a.shape[1:]
    o = g.shape[1]
    per = torch.nn.grad.conv2d_weight(a.reshape(1, B * c_in, h, w), (B * o, c_in, *mod.kernel_size),
                                      g.reshape(1, B * o, *g.shape[2:]), mod.stride, _conv_padding(mod),
                                      mod.dilation, groups=B)
    return per.reshape(B, -1)


def _bias_grads(layer: _Layer, g: Tensor) -> Tensor:
    """Σ_pos g for every example: [B, out]."""
    if isinstance(layer.module, nn.Linear):
        return g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
    return g.sum((2, 3))


def _n_positions(layer: _Layer, g: Tensor) -> int:
    return g[0].numel() // g.shape[-1 if isinstance(layer.module, nn.Linear) else 1]


def _factored_batch(stage: Stage, params: Params, plan: list[_Layer], V: Tensor, xs, ys) -> Tensor:
    """[B, T] dot products of one batch (see the module docstring for the two per-layer strategies)."""
    T = len(V)
    out = V.new_zeros(len(ys), T)
    for layer, a, g in _forward_backward(stage, params, plan, xs, ys):
        mod, B = layer.module, len(ys)
        if "bias" in layer.cols:
            off, shape = layer.cols["bias"]
            out += _bias_grads(layer, g) @ V[:, off:off + shape.numel()].T
        if "weight" not in layer.cols:
            continue
        off, shape = layer.cols["weight"]
        Vw = V[:, off:off + shape.numel()]
        P = _n_positions(layer, g)
        if P + T < P * T:  # outer: per-example Σ_pos g aᵀ, then one GEMM with the T vectors
            out += _per_example_weight_grads(layer, a, g) @ Vw.T
        elif isinstance(mod, nn.Linear):  # direct: a V_tᵀ for all t at once, then · g, summed over positions
            o, k = shape
            y = (a.reshape(-1, k) @ Vw.reshape(T * o, k).T).reshape(B, P, T, o)
            out += torch.einsum("bpto,bpo->bt", y, g.reshape(B, P, o))
        else:  # direct convolution: the layer's own op with the T test vectors stacked as output channels
            y = F.conv2d(a, Vw.reshape(T * shape[0], *shape[1:]), None, mod.stride, _conv_padding(mod), mod.dilation)
            out += torch.bmm(y.reshape(B, T, -1), g.reshape(B, -1, 1))[:, :, 0]
    return out


def _layer_op(layer: _Layer, a: Tensor, V: Tensor, out_shape: torch.Size) -> Tensor:
    """The layer's own operation on input ``a`` with its block parameters replaced by their parts of ``V`` [p]
    (parameters outside the block: 0). This is the layer's output tangent along V for a fixed input."""
    mod = layer.module
    w = b = None
    if "weight" in layer.cols:
        off, shape = layer.cols["weight"]
        w = V[off:off + shape.numel()].view(shape)
    if "bias" in layer.cols:
        off, shape = layer.cols["bias"]
        b = V[off:off + shape.numel()]
    if w is None:  # bias only: the same tangent at every position
        return (b if isinstance(mod, nn.Linear) else b[:, None, None]).expand(out_shape)
    if isinstance(mod, nn.Linear):
        return F.linear(a, w, b)
    return F.conv2d(a, w, b, mod.stride, _conv_padding(mod), mod.dilation)


def _factored_forward_mode(stage: Stage, params: Params, plan: list[_Layer], v: Tensor, xs, ys) -> Tensor:
    """[B] directional derivatives along one vector ``v``: forward-mode AD in which each hooked layer adds its own
    tangent term, the layer's op on its (primal) input with weight v (no wasted tangent for inputs that have none,
    unlike dual weights on the first layer)."""

    def hook_for(layer):
        def hook(mod, args, out):
            primal, tangent = fwAD.unpack_dual(out)
            extra = _layer_op(layer, fwAD.unpack_dual(args[0]).primal, v, primal.shape)
            return fwAD.make_dual(primal, extra if tangent is None else tangent + extra)
        return hook

    with fwAD.dual_level(), torch.no_grad():
        handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in plan]
        try:
            tangent = fwAD.unpack_dual(stage.losses(params, xs, ys)).tangent
        finally:
            for h in handles:
                h.remove()
    return v.new_zeros(len(ys)) if tangent is None else tangent


def _factored_grads(stage: Stage, params: Params, plan: list[_Layer], size: int, xs, ys) -> Tensor:
    """Per-example gradients [B, p] assembled from the factored pieces (used to check the hooks)."""
    like = next(iter(params.values()))
    rows = torch.zeros(len(ys), size, dtype=like.dtype, device=like.device)
    for layer, a, g in _forward_backward(stage, params, plan, xs, ys):
        for attr, (off, shape) in layer.cols.items():
            piece = _per_example_weight_grads(layer, a, g) if attr == "weight" else _bias_grads(layer, g)
            rows[:, off:off + shape.numel()] += piece
    return rows


def _verify(stage, params, block, space, plan, inputs, targets, k: int = 2) -> None:
    """The factored gradients of the first ``k`` examples, scored together, must equal each one's own gradient.

    Catches what the structure check cannot see: a block weight also used outside its layer's ``forward``, a
    layer applied to a reshaped batch, or per-example losses that depend on each other. The reference is plain
    autograd on each example alone (k small calls).
    """
    sl = slice(0, min(k, len(targets)))
    xs, ys = index_inputs(inputs, sl), targets[sl]
    mine = _factored_grads(stage, params, plan, space.size, xs, ys)
    ref = []
    with torch.enable_grad():
        live = {n: p.detach().requires_grad_(n in space.names) for n, p in params.items()}
        for i in range(len(ys)):  # the check's reference only: k ≤ 2 examples, never the scoring pass
            loss = stage.losses(live, index_inputs(xs, slice(i, i + 1)), ys[i:i + 1])[0]
            grads = torch.autograd.grad(loss, [live[n] for n in space.names], allow_unused=True)
            ref.append(torch.cat([(torch.zeros_like(live[n]) if gr is None else gr).reshape(-1)
                                  for n, gr in zip(space.names, grads)]))
    ref = torch.stack(ref)
    tol = 10 * math.sqrt(torch.finfo(ref.dtype).eps)
    err = (mine - ref).norm(dim=1)
    scale = ref.norm(dim=1).clamp_min(torch.finfo(ref.dtype).tiny)
    if not bool((err <= tol * scale).all()):
        worst = float((err / scale).max())
        raise FactoredUnsupported(
            f"on the first {len(ys)} examples the hooked layers' gradients differ from the true per-example "
            f"gradients (relative error {worst:.2e}): some block parameter is used outside its layer's forward, "
            "a layer sees a reshaped batch, or the per-example losses depend on each other")
