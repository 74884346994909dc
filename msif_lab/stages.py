"""The two-stage description: models, per-example losses, training sets, and which parameters are W, U and Θ.

Notation (``PAPER.md`` §1): the pretraining model holds the embedding W and the pretraining head U and is
trained on z_1..z_m with per-example loss f; the finetuning model holds the *same* embedding W and a head Θ
and is trained on x_1..x_n with per-example loss g. Stage objectives are

    F(W, U) = (1/m) Σ_i w_i f(z_i; W, U) + (wd/2)·||(W, U)||²                       (pretraining)
    G(W, Θ) = (1/n) Σ_j g(x_j; W, Θ)     + (wd/2)·||trained params||² [+ (α/2)·||W − W*||²  in case B]

with example weights w_i = 1 by default (w_i = 1 + ε up-weights z_i; w_i = 0 removes it, i.e. ε = −1/m,
keeping the 1/m normalisation). In case A (``alpha=None``) finetuning trains Θ only; in case B it trains
(W, Θ) with the proximal term that ties W to the pretrained W*.

Models are evaluated in eval mode (BatchNorm running statistics, no dropout) through
``torch.func.functional_call`` on a private copy: the user's modules are never modified. Frozen parameters
(``requires_grad=False``) and buffers are taken from the model as it is when the :class:`Stage` is built.

Taught in notebook 03 (section "Describing the two stages").
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(outputs [B, ...], targets [B, ...]) -> per-example losses [B]; must *not* reduce over the batch."""

Params = dict[str, Tensor]
"""Parameter name (as in ``model.named_parameters()``) -> tensor."""


class LossError(RuntimeError):
    """The model or the per-example loss failed on a stage's inputs (wrong dtype, label out of range, ...).

    Raised, chained from the original error, the first time a stage evaluates its loss on new data (its training
    set when the :class:`Stage` is built, a test batch when influence is computed); the message shows the dtypes and
    shapes involved and the likely fix.
    """


def as_tuple(inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Model inputs as a tuple of tensors sharing the leading (example) dimension."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def index_inputs(inputs: Tensor | Sequence[Tensor], index) -> tuple[Tensor, ...]:
    """Rows ``index`` (a slice or an index tensor) of every input tensor."""
    return tuple(t[index] for t in as_tuple(inputs))


def _resolve(model: nn.Module, spec: str | Sequence[str], what: str) -> list[str]:
    """Parameter names selected by ``spec``: a sub-module name, a parameter name, or a list of either."""
    names = [n for n, _ in model.named_parameters()]
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError(f"{what}: an empty selection; name a sub-module (e.g. 'embed') or parameters.")
    chosen: list[str] = []
    for s in specs:
        hits = [n for n in names if n == s or n.startswith(s + ".")] if s else list(names)
        if not hits:
            modules = [m for m, _ in model.named_modules() if m]
            raise ValueError(
                f"{what}: {s!r} is neither a parameter nor a sub-module with parameters of "
                f"{type(model).__name__}. Sub-modules: {modules[:12]}; parameters: {names[:12]}. "
                "Fix: pass one of these names."
            )
        chosen += [n for n in hits if n not in chosen]
    return [n for n in names if n in chosen]  # model order


@dataclass
class Stage:
    """One training stage (pretraining or finetuning).

    Args:
        model: maps ``*inputs`` to outputs; never modified (a private eval-mode copy is used).
        loss_fn: per-example loss ``(outputs [B, ...], targets [B, ...]) -> [B]`` (no batch reduction).
        inputs: training inputs, a tensor [N, ...] or a tuple of tensors [N, ...].
        targets: training targets [N, ...].
        embedding: the shared embedding W: a sub-module name (``"embed"``), parameter names, or a list.
        head: the head (U or Θ); default every other parameter that requires grad.
        weight_decay: wd ≥ 0 in the regulariser (wd/2)·||trained parameters||².
    """

    model: nn.Module
    loss_fn: LossFn
    inputs: Tensor | tuple[Tensor, ...]
    targets: Tensor
    embedding: str | Sequence[str] = "embed"
    head: str | Sequence[str] | None = None
    weight_decay: float = 0.0
    embedding_names: list[str] = field(init=False)
    head_names: list[str] = field(init=False)

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Stage.model must be a torch.nn.Module, got {type(self.model).__name__}.")
        self.inputs = as_tuple(self.inputs)
        n = len(self.targets)
        if n == 0:
            raise ValueError("Stage has an empty training set: give at least one example.")
        for t in self.inputs:
            if len(t) != n:
                raise ValueError(
                    f"Stage inputs have {len(t)} rows but targets have {n}: every input tensor and the "
                    "targets must share the leading (example) dimension."
                )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be ≥ 0 and finite, got {self.weight_decay}.")
        self.embedding_names = _resolve(self.model, self.embedding, "embedding")
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if self.head is None:
            self.head_names = [n for n in trainable if n not in self.embedding_names]
        else:
            self.head_names = _resolve(self.model, self.head, "head")
            overlap = set(self.head_names) & set(self.embedding_names)
            if overlap:
                raise ValueError(f"Parameters {sorted(overlap)} are in both the embedding and the head; "
                                 "each parameter belongs to one of them.")
        frozen_w = [n for n in self.embedding_names if n not in trainable]
        self.embedding_names = [n for n in self.embedding_names if n in trainable]
        if not self.embedding_names:
            raise ValueError(f"The embedding {self.embedding!r} has no trainable parameters "
                             f"(frozen: {frozen_w}); influence through W needs at least one.")
        self._module = copy.deepcopy(self.model).eval()
        for p in self._module.parameters():
            p.requires_grad_(False)
        self._fixed = {n: p for n, p in self._module.named_parameters()
                       if n not in self.embedding_names and n not in self.head_names}
        self._check_loss()

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        """Number of training examples."""
        return len(self.targets)

    @property
    def trainable_names(self) -> list[str]:
        """W names then head names."""
        return self.embedding_names + self.head_names

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._module.parameters())).dtype

    def initial_params(self) -> Params:
        """Detached copies of the model's current W and head parameters (a starting point for training)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().clone() for n in self.trainable_names}

    def outputs(self, params: Params, inputs: Tensor | Sequence[Tensor]) -> Tensor:
        """Model outputs with the given trainable parameters (others fixed); eval mode."""
        return functional_call(self._module, {**self._fixed, **params}, as_tuple(inputs))

    def losses(self, params: Params, inputs: Tensor | Sequence[Tensor], targets: Tensor) -> Tensor:
        """Per-example losses [B] for a batch with the given parameters."""
        return self._per_example(self.loss_fn(self.outputs(params, inputs), targets), targets)

    def checked_losses(self, params: Params, inputs: Tensor | Sequence[Tensor], targets: Tensor, what: str) -> Tensor:
        """:meth:`losses`, with a failure of the model or of ``loss_fn`` re-raised as :class:`LossError`, whose message
        starts with ``what`` (which stage, on which data) and shows the dtypes and shapes involved and the likely fix.
        For the first evaluation on new data (once per call, not in the inner loops)."""
        try:
            out = self.loss_fn(self.outputs(params, inputs), targets)
        except Exception as err:
            raise LossError(self._loss_failure(err, params, as_tuple(inputs), targets, what)) from err
        return self._per_example(out, targets)

    def check_params(self, params: Params, names: Sequence[str], what: str, fix: str) -> None:
        """Raise ``KeyError`` if ``params`` lacks one of ``names``, ``ValueError`` if one of its tensors has another
        shape or dtype than the model's parameter of that name (``TypeError`` if it is no tensor); the message calls
        the dict "the ``what`` parameters" and ends with ``fix``."""
        problem = _param_problem(self, params, names, what)
        if problem is not None:
            kind, text = problem
            raise kind(f"{text} Fix: {fix}")

    @staticmethod
    def _per_example(out: Tensor, targets: Tensor) -> Tensor:
        if out.dim() != 1 or out.shape[0] != len(targets):
            raise ValueError(
                f"loss_fn returned shape {tuple(out.shape)} for a batch of {len(targets)} examples; it must return "
                "one loss per example, shape [B]. Fix: use reduction='none' (and average over any other "
                "dimension inside loss_fn)."
            )
        return out

    def batches(self, batch_size: int | None):
        """Yield (slice, inputs, targets) over the training set in order; ``None`` = one batch."""
        bs = self.n if batch_size is None else int(batch_size)
        if bs <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        for start in range(0, self.n, bs):
            sl = slice(start, min(start + bs, self.n))
            yield sl, index_inputs(self.inputs, sl), self.targets[sl]

    def fingerprint(self) -> dict:
        """What determines this stage's losses besides the trainable parameters and the data: the architecture,
        frozen parameters and buffers, the loss function's identity and code, the W/head split and weight decay.
        Used in cache keys (e.g. the validation re-runs); a loss that reads global state is not captured."""
        code = getattr(self.loss_fn, "__code__", None)
        loss_code = (hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest() if code is not None
                     else repr(self.loss_fn))
        name = getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__qualname__)
        return {"model": repr(self._module),
                "state": {n: t for n, t in self._module.state_dict().items() if n not in self.trainable_names},
                "loss": f"{getattr(self.loss_fn, '__module__', '')}.{name}", "loss_code": loss_code,
                "embedding": self.embedding_names, "head": self.head_names, "weight_decay": self.weight_decay}

    def _check_loss(self):
        """Evaluate the loss on the first two examples and, for integer targets, on those holding the smallest and
        the largest label (where a label out of the model's range would show)."""
        rows = list(range(min(2, self.n)))
        flat = self.targets.reshape(self.n, -1)
        if not flat.is_floating_point() and flat.shape[1]:
            rows += [int(flat.min(1).values.argmin()), int(flat.max(1).values.argmax())]
        rows = sorted(set(rows))
        what = f"Building the Stage of {type(self.model).__name__}: its loss on training examples {rows}"
        with torch.no_grad():
            params = {n: p for n, p in self._module.named_parameters() if n in self.trainable_names}
            self.checked_losses(params, index_inputs(self.inputs, rows), self.targets[rows], what)

    def _loss_failure(self, err: Exception, params: Params, inputs: tuple[Tensor, ...], targets: Tensor,
                      what: str) -> str:
        """The message of a :class:`LossError`: what failed, the dtypes and shapes involved, the likely fix."""
        def desc(t: Tensor) -> str:
            return f"{tuple(t.shape)} {t.dtype}"

        param_dtypes = sorted({str(p.dtype) for p in params.values()})
        with torch.no_grad():
            try:
                out = self.outputs(params, inputs)
            except Exception:
                out = None
        facts = [f"inputs {', '.join(desc(x) for x in inputs)}", f"targets {desc(targets)}",
                 f"model parameters {', '.join(param_dtypes)}"]
        fixes = [f"use one dtype for the model and its data (e.g. model.to(torch.float64) before building the "
                 f"Stage, and x.to(torch.float64)): input {k} is {x.dtype}"
                 for k, x in enumerate(inputs) if x.is_floating_point() and str(x.dtype) not in param_dtypes]
        if out is not None:
            facts.append(f"model outputs {desc(out)}")
            if targets.is_floating_point() and out.dim() >= 2:
                fixes.append(f"a cross-entropy loss needs integer class targets, got {targets.dtype}: pass y.long()")
            elif not targets.is_floating_point() and out.dim() >= 2 and targets.numel():
                lo, hi, c = int(targets.min()), int(targets.max()), out.shape[1]
                if hi >= c or lo < 0:
                    fixes.append(f"the labels range over {lo}..{hi} but the model has {c} outputs (classes 0..{c - 1}; "
                                 "negative only as the loss's ignore_index): fix the labels or the head's size")
        if not fixes:
            fixes.append("call loss_fn(model(x), y) on these inputs yourself to see what goes wrong")
        failed = "the model" if out is None else "loss_fn"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (f"{what}: {failed} failed with {type(err).__name__}: {first}\n  ({'; '.join(facts)})\n"
                f"Likely fix: {'; '.join(fixes)}.")


@dataclass
class TwoStage:
    """A pretraining stage and a finetuning stage that share the embedding W.

    ``alpha=None`` is case A (embedding fixed in finetuning); ``alpha > 0`` is case B (W finetuned with
    the proximal term (α/2)·||W − W*||²). W is matched between the two models by parameter name relative to the
    embedding selection, in model order; the shapes must agree.

    Taught in notebook 03 (case A) and notebook 04 (case B).
    """

    pretrain: Stage
    finetune: Stage
    alpha: float | None = None
    w_pairs: list[tuple[str, str]] = field(init=False)

    def __post_init__(self):
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be > 0 for case B (a finite number; None for case A), got {self.alpha}; "
                             "for the α → ∞ limit use case A (alpha=None).")
        pre, ft = self.pretrain.embedding_names, self.finetune.embedding_names
        if len(pre) != len(ft):
            raise ValueError(
                f"The embedding has {len(pre)} parameter tensors in the pretraining model {pre} but {len(ft)} in "
                f"the finetuning model {ft}. Fix: both models must hold the same embedding module."
            )
        pshape = dict(self.pretrain.model.named_parameters())
        fshape = dict(self.finetune.model.named_parameters())
        for a, b in zip(pre, ft):
            if pshape[a].shape != fshape[b].shape:
                raise ValueError(
                    f"Embedding parameter {a!r} has shape {tuple(pshape[a].shape)} in the pretraining model but its "
                    f"counterpart {b!r} has shape {tuple(fshape[b].shape)} in the finetuning model. Fix: build both "
                    "models around the same embedding architecture."
                )
        self.w_pairs = list(zip(pre, ft))

    @property
    def case(self) -> str:
        """``"A"`` (embedding fixed) or ``"B"`` (embedding updated with the proximal term)."""
        return "A" if self.alpha is None else "B"

    @property
    def finetune_trained_names(self) -> list[str]:
        """Finetuning parameters that finetuning trains: Θ in case A, (W, Θ) in case B."""
        ft = self.finetune
        return ft.head_names if self.alpha is None else ft.trainable_names

    def check_params(self, pretrained: Params, finetuned: Params) -> None:
        """Raise ``KeyError`` / ``ValueError`` (as :meth:`Stage.check_params`) unless ``pretrained`` holds every
        trainable parameter of the pretraining model and ``finetuned`` every one of the finetuning model, each with the
        model's shape and dtype. When a dict fits the *other* model instead, the message asks whether the two were
        swapped."""
        sides = {"pretrained": (self.pretrain, pretrained, "pretraining", "pretrain"),
                 "finetuned": (self.finetune, finetuned, "finetuning", "finetune")}
        for what, other in (("pretrained", "finetuned"), ("finetuned", "pretrained")):
            stage, params, _, fit = sides[what]
            problem = _param_problem(stage, params, stage.trainable_names, what)
            if problem is None:
                continue
            kind, text = problem
            other_stage, _, other_model, _ = sides[other]
            if _param_problem(other_stage, params, other_stage.trainable_names, other) is None:
                text += (f" These parameters fit the {other_model} model: did you pass the {other} parameters as the "
                         f"{what} ones?")
            raise kind(f"{text} Fix: pass the `params` of the {fit} fit ({fit}(...).params) as `{what}`.")

    def embedding_for_finetune(self, pretrained: Params) -> Params:
        """The pretrained W renamed to the finetuning model's parameter names."""
        return {b: pretrained[a] for a, b in self.w_pairs}

    def embedding_from_finetune(self, finetuned: Params) -> Params:
        """The finetuned W renamed to the pretraining model's parameter names."""
        return {a: finetuned[b] for a, b in self.w_pairs}


def _param_problem(stage: Stage, params: Params, names: Sequence[str], what: str) -> tuple[type, str] | None:
    """(exception class, message) for the first of ``names`` that ``params`` lacks or holds with another shape or
    dtype than the stage's model; ``None`` when all fit."""
    missing = [n for n in names if n not in params]
    if missing:
        return KeyError, f"The {what} parameters lack {missing}."
    model = dict(stage._module.named_parameters())
    for n in names:
        given, want = params[n], model.get(n)
        if not isinstance(given, Tensor):
            return TypeError, f"The {what} parameter {n!r} is a {type(given).__name__}, not a tensor."
        if want is None:
            continue
        if given.shape != want.shape:
            return ValueError, (f"The {what} parameter {n!r} has shape {tuple(given.shape)} but the model's has shape "
                                f"{tuple(want.shape)}.")
        if given.dtype != want.dtype:
            return ValueError, f"The {what} parameter {n!r} has dtype {given.dtype} but the model's is {want.dtype}."
    return None
