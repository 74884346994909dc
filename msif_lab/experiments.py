"""The image experiments' pipeline: one place that builds data, models and stages and trains them (train or load).

Notebooks 03–09 and their tests call :func:`build` and :func:`train` with an :class:`ImageSetup`, so a lesson,
its test and a papermill run at paper scale exercise exactly the same code.

Default splits (the paper does not say which classes go to which stage; these are parameters):

- MNIST, four classes: pretrain a 4-way classifier on digits 0, 1, 2, 3; finetune a binary classifier on 4 vs 9 —
  digits never seen in pretraining, so everything the finetuned model knows about pixels comes through W.
- CIFAR-10, two classes: finetune cat vs dog; pretrain on four other classes (by default airplane, automobile,
  deer, horse), 16×16 grayscale, so a small CNN's exact Hessian stays tractable on a CPU.

Taught in notebook 03 (MNIST) and notebook 05 (CIFAR-10).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import cached
from .data import load_cifar10, load_mnist
from .models import MLPEmbedding, SmallCNN, classifier
from .stages import Params, Stage, TwoStage
from .train import FitResult, finetune, pretrain

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ImageSetup:
    """Everything that determines an image experiment (data, models, regularisers, training tolerance).

    Sizes are per class. ``pool`` (MNIST) average-pools 28×28 images (4 → 7×7); ``size`` (CIFAR) resizes.
    ``alpha=None`` is case A (embedding fixed), a float is case B. ``embedding`` is ``"mlp"`` or ``"cnn"``.
    """

    dataset: str = "mnist"
    pretrain_classes: tuple = (0, 1, 2, 3)
    finetune_classes: tuple = (4, 9)
    n_pretrain: int = 100
    n_finetune: int = 100
    n_test: int = 100
    pool: int = 4
    size: int = 16
    grayscale: bool = True
    embedding: str = "mlp"
    width: int = 8
    depth: int = 1
    channels: int = 4
    weight_decay_pretrain: float = 1e-2
    weight_decay_finetune: float = 1e-3
    alpha: float | None = None
    tol: float = 1e-9
    max_iter: int = 3000
    newton_steps: int = 3
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"

    def __post_init__(self):
        if self.dataset not in ("mnist", "cifar10"):
            raise ValueError(f"dataset must be 'mnist' or 'cifar10', got {self.dataset!r}.")
        if self.embedding not in ("mlp", "cnn"):
            raise ValueError(f"embedding must be 'mlp' or 'cnn', got {self.embedding!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        overlap = set(map(str, self.pretrain_classes)) & set(map(str, self.finetune_classes))
        if overlap:
            raise ValueError(f"Classes {sorted(overlap)} are in both stages; choose disjoint pretraining and "
                             "finetuning classes (the paper's setting: the end task is new to the embedding).")

    def replace(self, **changes) -> "ImageSetup":
        return dataclasses.replace(self, **changes)

    def fit_kwargs(self) -> dict:
        """Settings of every fit (also of the validation re-runs)."""
        return {"tol": self.tol, "max_iter": self.max_iter, "newton_steps": self.newton_steps}

    def config(self) -> dict:
        return dataclasses.asdict(self)

    def pretraining_config(self) -> dict:
        """The fields pretraining depends on (not α, not the finetuning data): the pretraining cache key, so that
        cases A and B, and every α, share one pretrained model."""
        fields = ("dataset", "pretrain_classes", "n_pretrain", "pool", "size", "grayscale", "embedding", "width",
                  "depth", "channels", "weight_decay_pretrain", "tol", "max_iter", "newton_steps", "seed", "dtype",
                  "device")
        return {k: getattr(self, k) for k in fields}


@dataclass
class ImageExperiment:
    """Built data and stages. ``pretrain_labels``/``test_labels`` are the official class labels (for plots)."""

    setup: ImageSetup
    two_stage: TwoStage
    test_x: Tensor
    test_y: Tensor
    test_labels: Tensor
    pretrain_labels: Tensor
    finetune_labels: Tensor


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy [B] (nats) of logits [B, K] and labels [B]."""
    return F.cross_entropy(logits, y, reduction="none")


def _load(setup: ImageSetup, split: str, classes, n: int, seed: int):
    dtype = DTYPES[setup.dtype]
    if setup.dataset == "mnist":
        return load_mnist(split, list(classes), n, pool=setup.pool, seed=seed, dtype=dtype)
    return load_cifar10(split, list(classes), n, seed=seed, dtype=dtype, grayscale=setup.grayscale,
                        size=setup.size)


def build(setup: ImageSetup) -> ImageExperiment:
    """Load the data and build the two stages (models initialised from ``setup.seed``)."""
    pre = _load(setup, "train", setup.pretrain_classes, setup.n_pretrain, setup.seed)
    ft = _load(setup, "train", setup.finetune_classes, setup.n_finetune, setup.seed + 1)
    test = _load(setup, "test", setup.finetune_classes, setup.n_test, setup.seed + 2)
    dev = torch.device(setup.device)
    c, h, w = pre.x.shape[1:]

    def embed():
        if setup.embedding == "mlp":
            return MLPEmbedding(c * h * w, width=setup.width, depth=setup.depth)
        return SmallCNN(c, h, channels=setup.channels, width=setup.width)

    torch.manual_seed(setup.seed)
    pre_model = classifier(embed(), len(setup.pretrain_classes)).to(DTYPES[setup.dtype]).to(dev)
    ft_model = classifier(embed(), len(setup.finetune_classes)).to(DTYPES[setup.dtype]).to(dev)
    ts = TwoStage(
        Stage(pre_model, cross_entropy, pre.x.to(dev), pre.y.to(dev), weight_decay=setup.weight_decay_pretrain),
        Stage(ft_model, cross_entropy, ft.x.to(dev), ft.y.to(dev), weight_decay=setup.weight_decay_finetune),
        alpha=setup.alpha,
    )
    return ImageExperiment(setup, ts, test.x.to(dev), test.y.to(dev), test.labels, pre.labels, ft.labels)


def train(exp, *, cache: bool = True) -> tuple[FitResult, FitResult]:
    """Pretrain then finetune to a tight optimum, each loaded from the cache when an identical setup was trained.

    ``exp``: an :class:`ImageExperiment` or a :class:`msif_lab.text_experiment.TextExperiment` (anything with
    ``two_stage`` and a ``setup`` offering ``dataset``, ``config()``, ``pretraining_config()`` and ``fit_kwargs()``).
    Pretraining does not depend on ``alpha``, so cases A and B share it.
    """
    s = exp.setup
    # the stages' fingerprints (architecture, loss code) join the setup, so a changed model is never loaded stale
    pre_key = {"what": "pretrain", **s.pretraining_config(), "stage": exp.two_stage.pretrain.fingerprint()}

    def run_pre():
        return pretrain(exp.two_stage, **s.fit_kwargs())

    pre = cached(pre_key, run_pre, name=f"pretrain_{s.dataset}") if cache else run_pre()

    def run_ft():
        return finetune(exp.two_stage, pre.params, **s.fit_kwargs())

    ft_key = {"what": "finetune", **s.config(), "stages": [exp.two_stage.pretrain.fingerprint(),
                                                           exp.two_stage.finetune.fingerprint()]}
    ft = cached(ft_key, run_ft, name=f"finetune_{s.dataset}") if cache else run_ft()
    return pre, ft


def accuracy(exp, finetuned: Params) -> float:
    """Finetuned classifier's accuracy on the test split (fraction in [0, 1]); ``exp`` as in :func:`train`."""
    with torch.no_grad():
        logits = exp.two_stage.finetune.outputs(finetuned, exp.test_x)
    return float((logits.argmax(1) == exp.test_y).double().mean())
