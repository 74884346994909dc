"""Looking at influential pretraining examples: top-k rankings, class composition, and "remove and retrain".

Scores follow the project's sign convention (``PAPER.md`` §1): I(z, x_t) > 0 means up-weighting z raises the test
loss (z is *harmful* to x_t), I < 0 means z *helps*. Removing a harmful example should therefore lower the test loss.

    top = top_k(result.scores[t], 10, "harmful")                  # indices and scores, most harmful first
    comp = class_composition(pretrain_labels, top.indices, classes)  # fractions per class vs the whole set
    trace = remove_and_retrain(two_stage, pre, ft, top.indices, x_t, y_t, fit_kwargs=setup.fit_kwargs())

Taught in notebook 06 (influential examples) and used by notebook 05 (CIFAR-10 grids).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .stages import Params, TwoStage
from .validate import retrain_without

KINDS = ("harmful", "helpful")


@dataclass
class TopK:
    """The k most harmful (largest positive score) or most helpful (most negative score) examples of one test point.

    indices: [k] pretraining indices, most influential first.  scores: [k] their influence scores I.
    """

    kind: str
    indices: Tensor
    scores: Tensor


def top_k(scores: Tensor, k: int, kind: str = "harmful") -> TopK:
    """The ``k`` most ``"harmful"`` (largest I > 0) or most ``"helpful"`` (smallest I < 0) examples.

    ``scores`` is [m], one test point's scores (a row of ``InfluenceResult.scores``). Only examples whose score has
    the requested sign are returned, so fewer than ``k`` come back when fewer have that sign. Taught in notebook 06.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if scores.dim() != 1:
        raise ValueError(f"scores must be one test point's row [m], got shape {tuple(scores.shape)}; "
                         "pass result.scores[t].")
    if not 0 < k <= len(scores):
        raise ValueError(f"k={k} must be in 1..{len(scores)} (the number of pretraining examples).")
    signed = scores if kind == "harmful" else -scores
    order = torch.argsort(signed, descending=True)[:k]
    order = order[signed[order] > 0]
    return TopK(kind, order, scores[order])


def class_composition(labels: Tensor, indices: Tensor | None, classes: Sequence) -> Tensor:
    """Fraction [len(classes)] of the examples ``labels[indices]`` (all when ``indices`` is None) in each class.

    ``labels`` are the examples' original class labels (e.g. ``ImageExperiment.pretrain_labels``); ``classes`` lists
    the labels to count, in the order of the result. Taught in notebook 06.
    """
    chosen = labels if indices is None else labels[torch.as_tensor(indices, dtype=torch.long)]
    if len(chosen) == 0:
        return torch.zeros(len(classes), dtype=torch.float64)
    return torch.tensor([float((chosen == c).sum()) for c in classes], dtype=torch.float64) / len(chosen)


@dataclass
class Retrained:
    """Test losses [T] before (``original``) and after removing ``removed`` and re-running both stages.

    ``change`` = after − original; ``grad_norm`` is the larger final gradient norm of the two re-run stages;
    ``finetuned`` the re-run finetuned parameters (to look at the new model's predictions).
    """

    removed: Tensor
    original: Tensor
    after: Tensor
    grad_norm: float
    finetuned: Params

    @property
    def change(self) -> Tensor:
        return self.after - self.original


def remove_and_retrain(two_stage: TwoStage, pretrained: Params, finetuned: Params, removed, test_inputs,
                       test_targets: Tensor, *, fit_kwargs: dict | None = None,
                       baseline: Tensor | None = None, cache: bool = True) -> Retrained:
    """Remove the pretraining examples ``removed`` together, re-run both stages
    (:func:`msif_lab.validate.retrain_without`, cached) and return the test losses before and after.

    ``baseline``: test losses of a re-run with nothing removed (the noise-floor reference). Default: the losses
    at ``finetuned`` itself. ``fit_kwargs`` are the fits' settings (``ImageSetup.fit_kwargs()``). Taught in
    notebook 06 (tracing a misclassified test image).
    """
    test_inputs = test_inputs if isinstance(test_inputs, tuple) else (test_inputs,)
    removed = torch.as_tensor(removed, dtype=torch.long)
    pre, ft = retrain_without(two_stage, pretrained, finetuned, removed, pretrain_kwargs=fit_kwargs,
                              finetune_kwargs=fit_kwargs, cache=cache)
    with torch.no_grad():
        after = two_stage.finetune.losses(ft.params, test_inputs, test_targets)
        original = two_stage.finetune.losses(finetuned, test_inputs, test_targets) if baseline is None else baseline
    return Retrained(removed, original.detach(), after.detach(), max(pre.grad_norm, ft.grad_norm), ft.params)


def random_removals(m: int, k: int, seeds: Sequence[int], exclude=()) -> list[Tensor]:
    """One set of ``k`` random pretraining indices (out of ``m``, none in ``exclude``) per seed: the baseline
    against which a top-k removal is compared. Taught in notebook 06."""
    excluded = set(torch.as_tensor(exclude, dtype=torch.long).tolist())
    pool = torch.tensor([i for i in range(m) if i not in excluded], dtype=torch.long)
    if k > len(pool):
        raise ValueError(f"Cannot draw {k} random examples from {len(pool)} candidates.")
    return [pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(s)))[:k]] for s in seeds]


def upscale(images: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upscaling of images [k, C, H, W] by an integer ``factor`` (to show 7×7 digits)."""
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def influence_titles(labels: Tensor, scores: Tensor, names: Sequence[str] | None = None) -> list[str]:
    """Titles "<class>\\nI=<score>" for an image grid of influential examples (``names`` maps labels to words)."""
    def name(label):
        return names[int(label)] if names is not None else str(int(label))
    return [f"{name(l)}\nI={float(s):+.2g}" for l, s in zip(labels, scores)]


def influence_grid(test_image: Tensor, test_title: str, helpful: Tensor, helpful_titles: Sequence[str],
                   harmful: Tensor, harmful_titles: Sequence[str], *, scale: float = 1.1, suptitle: str | None = None):
    """One test image (left) beside two rows of pretraining images: its most helpful (top) and most harmful
    (bottom) examples. Images are [k, C, H, W] in [0, 1]; returns the figure. Taught in notebook 06."""
    import matplotlib.pyplot as plt

    k = max(len(helpful), len(harmful), 1)
    fig, axes = plt.subplots(2, k + 1, figsize=(scale * (k + 1), 2 * scale + 0.6 + (0.3 if suptitle else 0)),
                             squeeze=False)

    def show(ax, img, title):
        img = torch.as_tensor(img).detach().cpu().double()
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_title(title, fontsize=8)

    for ax in axes.flat:
        ax.axis("off")
    show(axes[0, 0], test_image, test_title)
    for row, (images, titles, name) in enumerate(((helpful, helpful_titles, "helpful"),
                                                  (harmful, harmful_titles, "harmful"))):
        axes[row, 1].text(-0.15, 0.5, name, transform=axes[row, 1].transAxes, rotation=90, va="center", ha="right",
                          fontsize=9)
        for j, (img, title) in enumerate(zip(images, titles)):
            show(axes[row, j + 1], img, title)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig
