"""False transfer: plant harmful pretraining data, detect it with a ranking, remove the top of the ranking.

The paper's application "harmful pretraining data" (``PAPER.md`` §4) needs pretraining data that *measurably*
hurts the finetuned task. Mislabelled examples of unrelated classes hardly matter to the end task, and images of
the end task's classes under whatever label tend to *help* (the embedding learns features for them). What does
hurt, measured in notebook 08, is the classic web-data failure: the pretraining corpus contains the end task's
classes, and some of those examples carry the *other* end-task class's label. With the default split:

- pretraining: a 6-way classifier on digits 0, 1, 2, 3, 4, 9 (``n_pretrain`` of each);
- **planted**: ``n_planted`` of the pretraining 4s and 9s get the other label (4 ↔ 9): they teach the embedding
  to confuse exactly the two classes the end task separates;
- **distractors**: ``n_distractors`` of the pretraining 0–3 get a wrong label among 0–3: as wrong as the planted
  ones (a loss-based detector sees them alike) but irrelevant to the end task;
- finetuning: 4 vs 9 on *other* training images (drawn from the same pool, disjoint from the pretraining ones),
  tested on the MNIST test split.

Detection metrics take aggregated scores [m] (larger = more harmful) and a boolean mask of the planted examples.
The removal experiment removes a set of pretraining examples (weight 0, i.e. ε = −1/m each, the same
perturbation the validation harness uses), re-runs both stages warm-started, and reports the finetuning test loss
and accuracy; re-runs are cached by content.

Taught in notebook 08.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import cached
from .data import load_mnist
from .experiments import DTYPES, cross_entropy
from .models import MLPEmbedding, classifier
from .stages import Params, Stage, TwoStage
from .train import FitResult, finetune, pretrain
from .validate import retrain_without


# ------------------------------------------------------------------------------------------------ detection metrics
def _check(scores: Tensor, relevant: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    relevant = torch.as_tensor(relevant).detach().reshape(-1).bool().cpu()
    if len(scores) != len(relevant):
        raise ValueError(f"scores has {len(scores)} entries but the relevance mask {len(relevant)}.")
    if not relevant.any():
        raise ValueError("No relevant (planted) example: detection metrics are undefined.")
    return scores, relevant


def ranking(scores: Tensor) -> Tensor:
    """Indices sorted from the largest score (most harmful) down; ties broken by index (stable)."""
    return torch.argsort(torch.as_tensor(scores).reshape(-1), descending=True, stable=True)


def precision_at_k(scores: Tensor, relevant: Tensor, k: int) -> float:
    """Fraction of the ``k`` highest-scored examples that are relevant (planted). Chance level: mean(relevant)."""
    scores, relevant = _check(scores, relevant)
    if not 0 < k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}, got {k}.")
    return float(relevant[ranking(scores)[:k]].double().mean())


def precision_recall_curve(scores: Tensor, relevant: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall [m] after taking the top 1, 2, ..., m examples of the ranking."""
    scores, relevant = _check(scores, relevant)
    hits = relevant[ranking(scores)].double().cumsum(0)
    k = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    return hits / k, hits / relevant.sum()


def average_precision(scores: Tensor, relevant: Tensor) -> float:
    """Area under the precision-recall curve as average precision: the mean, over the relevant examples, of the
    precision at each one's rank (1.0 for a perfect ranking; about mean(relevant) for a random one)."""
    precision, _ = precision_recall_curve(scores, relevant)
    scores, relevant = _check(scores, relevant)
    return float(precision[relevant[ranking(scores)]].mean())


def detection_report(scores: Tensor, relevant: Tensor, ks=(10, 20, 40)) -> dict:
    """``{"ap": ..., "p@10": ..., ...}`` for aggregated scores [m]; ``k`` larger than m is skipped."""
    out = {"ap": average_precision(scores, relevant)}
    for k in ks:
        if k <= len(relevant):
            out[f"p@{k}"] = precision_at_k(scores, relevant, k)
    return out


# ------------------------------------------------------------------------------------------------------ planting
def flip_labels(y: Tensor, candidates: Tensor, n: int, mapping: dict[int, int] | None = None, *,
                n_classes: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Give ``n`` of the ``candidates`` (indices into ``y``) a wrong label; returns (new labels, flipped indices).

    ``mapping`` {old: new} flips deterministically (e.g. {4: 5, 5: 4} swaps two classes); without it each flipped
    example gets a uniformly random *other* label among the labels of the candidates (``n_classes`` not needed)
    — chosen with a generator seeded by ``seed``, as is which candidates are flipped.
    """
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    if not 0 <= n <= len(candidates):
        raise ValueError(f"Cannot flip {n} labels among {len(candidates)} candidates.")
    g = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:n]]
    y = y.clone()
    if mapping is not None:
        missing = sorted({int(v) for v in y[chosen].tolist()} - set(mapping))
        if missing:
            raise ValueError(f"mapping has no entry for label(s) {missing}.")
        y[chosen] = torch.tensor([mapping[int(v)] for v in y[chosen].tolist()], dtype=y.dtype)
    else:
        labels = torch.unique(y[candidates])
        if len(labels) < 2:
            raise ValueError("Random flips need candidates of at least two labels.")
        for i in chosen.tolist():
            others = labels[labels != y[i]]
            y[i] = others[torch.randint(len(others), (1,), generator=g)].item()
    return y, chosen


@dataclass(frozen=True)
class FalseTransferSetup:
    """Everything that determines the false-transfer experiment of notebook 08 (MNIST, MLP embedding).

    ``n_pretrain``: pretraining images per class, for each of ``pretrain_classes`` and each of
    ``finetune_classes`` (the end task's classes also appear in the pretraining corpus, with their own labels).
    ``n_planted``: pretraining images of the end task's classes given the other end-task label (harmful);
    ``n_distractors``: pretraining images of the other classes given a wrong label among them (irrelevant noise).
    ``n_finetune``/``n_test``: per class. ``pool`` average-pools 28×28 → 7×7 (pool=4).
    """

    pretrain_classes: tuple = (0, 1, 2, 3)
    finetune_classes: tuple = (4, 9)
    n_pretrain: int = 60
    n_planted: int = 30
    n_distractors: int = 30
    n_finetune: int = 100
    n_test: int = 100
    pool: int = 4
    width: int = 8
    weight_decay_pretrain: float = 1e-2
    weight_decay_finetune: float = 1e-3
    tol: float = 1e-9
    max_iter: int = 3000
    newton_steps: int = 3
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"

    def __post_init__(self):
        if len(self.finetune_classes) != 2:
            raise ValueError("The end task is binary: give two finetune_classes.")
        if set(self.pretrain_classes) & set(self.finetune_classes):
            raise ValueError("pretrain_classes are the *other* pretraining classes; the end task's classes are added "
                             "to pretraining automatically. Give disjoint lists.")
        if self.n_planted > 2 * self.n_pretrain or self.n_distractors > len(self.pretrain_classes) * self.n_pretrain:
            raise ValueError("More planted/distractor examples than pretraining images of those classes.")

    def replace(self, **changes) -> "FalseTransferSetup":
        return dataclasses.replace(self, **changes)

    def fit_kwargs(self) -> dict:
        """Settings of every fit (also of the re-runs after removals)."""
        return {"tol": self.tol, "max_iter": self.max_iter, "newton_steps": self.newton_steps}

    def config(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FalseTransferExperiment:
    """Built data and stages of the false-transfer experiment.

    planted, distractor: boolean masks [m] over the pretraining set. pretrain_digits: the true digit of each
    pretraining image; given_labels: the (possibly flipped) pretraining label (index into ``pretrain_labels``).
    ``test_x``/``test_y``/``two_stage`` as in :class:`msif_lab.experiments.ImageExperiment`, so
    :func:`msif_lab.experiments.accuracy` works on it.
    """

    setup: FalseTransferSetup
    two_stage: TwoStage
    test_x: Tensor
    test_y: Tensor
    planted: Tensor
    distractor: Tensor
    pretrain_digits: Tensor
    given_labels: Tensor
    pretrain_labels: tuple


def build_false_transfer(setup: FalseTransferSetup) -> FalseTransferExperiment:
    """Load the data, plant the flipped labels, and build the two stages (models initialised from ``setup.seed``).

    The end task's training images and the pretraining images of the same classes are disjoint: both come from
    one seeded draw of ``n_pretrain + n_finetune`` images per end-task class, split per class.
    """
    s = setup
    dtype, dev = DTYPES[s.dtype], torch.device(s.device)
    a, b = s.finetune_classes
    other = load_mnist("train", list(s.pretrain_classes), s.n_pretrain, pool=s.pool, seed=s.seed, dtype=dtype)
    task = load_mnist("train", [a, b], s.n_pretrain + s.n_finetune, pool=s.pool, seed=s.seed + 1, dtype=dtype)
    seen = {0: 0, 1: 0}
    to_pre, to_ft = [], []
    for i, y in enumerate(task.y.tolist()):
        (to_pre if seen[y] < s.n_pretrain else to_ft).append(i)
        seen[y] += 1
    k = len(s.pretrain_classes)
    to_pre, to_ft = torch.tensor(to_pre), torch.tensor(to_ft)
    x = torch.cat([other.x, task.x[to_pre]])
    y = torch.cat([other.y, task.y[to_pre] + k])  # end-task classes become pretraining labels k, k+1
    digits = torch.cat([other.labels, task.labels[to_pre]])
    y, planted_idx = flip_labels(y, torch.arange(len(other.y), len(y)), s.n_planted, {k: k + 1, k + 1: k},
                                 seed=s.seed + 10)
    y, distractor_idx = flip_labels(y, torch.arange(len(other.y)), s.n_distractors, seed=s.seed + 11)
    m = len(y)
    planted = torch.zeros(m, dtype=torch.bool)
    planted[planted_idx] = True
    distractor = torch.zeros(m, dtype=torch.bool)
    distractor[distractor_idx] = True
    test = load_mnist("test", [a, b], s.n_test, pool=s.pool, seed=s.seed + 2, dtype=dtype)
    c, h, w = x.shape[1:]
    torch.manual_seed(s.seed)
    pre_model = classifier(MLPEmbedding(c * h * w, width=s.width), k + 2).to(dtype).to(dev)
    ft_model = classifier(MLPEmbedding(c * h * w, width=s.width), 2).to(dtype).to(dev)
    ts = TwoStage(
        Stage(pre_model, cross_entropy, x.to(dev), y.to(dev), weight_decay=s.weight_decay_pretrain),
        Stage(ft_model, cross_entropy, task.x[to_ft].to(dev), task.y[to_ft].to(dev),
              weight_decay=s.weight_decay_finetune),
        alpha=None,
    )
    return FalseTransferExperiment(s, ts, test.x.to(dev), test.y.to(dev), planted, distractor, digits, y.cpu(),
                                   tuple(s.pretrain_classes) + tuple(s.finetune_classes))


def train_false_transfer(exp: FalseTransferExperiment, *, cache: bool = True) -> tuple[FitResult, FitResult]:
    """Pretrain then finetune (case A) to a tight optimum, each loaded from the cache for an identical setup."""
    s = exp.setup

    def run():
        pre = pretrain(exp.two_stage, **s.fit_kwargs())
        return pre, finetune(exp.two_stage, pre.params, **s.fit_kwargs())

    return cached({"what": "false_transfer", **s.config()}, run, name="false_transfer") if cache else run()


# ------------------------------------------------------------------------------------------------------- removal
@dataclass
class Removal:
    """Finetuning test loss (mean over test points, nats) and accuracy after removing ``removed`` and re-running
    both stages; ``grad_norm`` is the larger final gradient norm of the two re-runs."""

    removed: Tensor
    test_loss: float
    accuracy: float
    grad_norm: float


def remove_and_rerun(two_stage: TwoStage, pretrained: Params, finetuned: Params, removed, test_x: Tensor,
                     test_y: Tensor, *, fit_kwargs: dict | None = None, cache: bool = True) -> Removal:
    """Give the pretraining examples ``removed`` weight 0, re-run pretraining and finetuning warm-started from
    ``pretrained`` / ``finetuned``, and evaluate the finetuned model on the test points.

    An empty ``removed`` is the noise-floor re-run (nothing removed). The re-run is
    :func:`msif_lab.validate.retrain_without` (cached by content). Taught in notebook 08.
    """
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).sort().values
    pre, ft = retrain_without(two_stage, pretrained, finetuned, removed, pretrain_kwargs=fit_kwargs,
                              finetune_kwargs=fit_kwargs, cache=cache)
    with torch.no_grad():
        out = two_stage.finetune.outputs(ft.params, test_x)
        loss = float(two_stage.finetune.loss_fn(out, test_y).mean())
        acc = float((out.argmax(1) == test_y).double().mean())
    return Removal(removed, loss, acc, max(pre.grad_norm, ft.grad_norm))
