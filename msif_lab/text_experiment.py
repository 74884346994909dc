"""The NLP experiment's pipeline and its measurements: one place that builds the text task and its two stages, and
says what the most influential pretraining sentences have in common.

Notebook 07 and its tests call :func:`build_text` with a :class:`TextSetup`, then :func:`msif_lab.experiments.train`
and :func:`msif_lab.experiments.accuracy` (shared with the image experiments: train or load, pretraining shared by
cases A and B). Pretraining is a bidirectional language model on real Wikipedia and news sentences; finetuning is
binary sentiment of real movie-review sentences (:mod:`msif_lab.text`).

A pretraining example z is one sentence and f(z) its mean token NLL under the forward and the backward language
model (nats); the finetuning loss g(x) is the cross-entropy of one review sentence (nats). Scores follow the
project's sign convention: I > 0 harmful (up-weighting the sentence raises the test loss), I < 0 helpful.

Taught in notebook 07.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .experiments import DTYPES
from .metrics import spearman
from .text import BOS, EOS, IGNORE, PAD, UNK, TextTask, lm_targets, load_text_task, text_two_stage
from .stages import TwoStage


@dataclass(frozen=True)
class TextSetup:
    """Everything that determines the NLP experiment (data sizes, vocabulary, model, regularisers, tolerances).

    ``n_pretrain`` sentences (m) of ``min_tokens``..``max_tokens`` tokens; ``n_train``/``n_test`` class-balanced
    review sentences. The vocabulary is the ``max_vocab`` most frequent words of the pretraining sentences
    (every other word is ``<unk>``). ``alpha=None`` is case A (embedding fixed), a float case B.
    ``encoder``/``window``/``dim``/``hidden``: the mini-ELMo (:class:`msif_lab.models.MiniELMo`).
    ``newton_from``: L-BFGS hands over to Newton steps at this gradient norm (:func:`msif_lab.train.fit_stage`):
    each dense Hessian of the language model costs one HVP per parameter, so L-BFGS goes far first.
    """

    n_pretrain: int = 240
    n_train: int = 1000
    n_test: int = 200
    min_tokens: int = 5
    max_tokens: int = 12
    min_count: int = 2
    max_vocab: int = 60
    encoder: str = "conv"
    window: int = 3
    dim: int = 6
    hidden: int = 6
    weight_decay_pretrain: float = 1e-2
    weight_decay_finetune: float = 1e-3
    alpha: float | None = None
    tol: float = 1e-9
    max_iter: int = 1000
    newton_steps: int = 2
    newton_from: float = 1e-6
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"

    dataset = "text"  # cache names: pretrain_text-…, finetune_text-…

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be None (case A) or a finite α > 0 (case B), got {self.alpha!r}.")

    def replace(self, **changes) -> "TextSetup":
        return dataclasses.replace(self, **changes)

    def fit_kwargs(self) -> dict:
        """Settings of every fit (also of the validation re-runs)."""
        return {"tol": self.tol, "max_iter": self.max_iter, "newton_steps": self.newton_steps,
                "newton_from": self.newton_from}

    def config(self) -> dict:
        return {"dataset": self.dataset, **dataclasses.asdict(self)}

    def pretraining_config(self) -> dict:
        """The fields pretraining depends on (the finetuning data are drawn from the same seed but do not enter)."""
        skip = ("n_train", "n_test", "weight_decay_finetune", "alpha")
        return {k: v for k, v in self.config().items() if k not in skip}


@dataclass
class TextExperiment:
    """The built task and stages. ``test_x`` [T, L] token ids and ``test_y`` [T] labels (1 = positive) of the test
    sentences, ``task`` the whole :class:`~msif_lab.text.TextTask` (sentences, vocabulary, tensors)."""

    setup: TextSetup
    task: TextTask
    two_stage: TwoStage
    test_x: Tensor
    test_y: Tensor


def build_text(setup: TextSetup, root=None) -> TextExperiment:
    """Load the prepared text data (``root``: data folder, default the project's) and build the two stages."""
    s = setup
    task = load_text_task(root, n_pretrain=s.n_pretrain, n_train=s.n_train, n_test=s.n_test, min_tokens=s.min_tokens,
                          max_tokens=s.max_tokens, min_count=s.min_count, max_vocab=s.max_vocab, seed=s.seed)
    dev = torch.device(s.device)
    ts = text_two_stage(task.pretrain_ids.to(dev), task.pretrain_targets.to(dev), task.train_ids.to(dev),
                        task.train_labels.to(dev), len(task.vocab), alpha=s.alpha, dim=s.dim, hidden=s.hidden,
                        encoder=s.encoder, window=s.window, pretrain_weight_decay=s.weight_decay_pretrain,
                        finetune_weight_decay=s.weight_decay_finetune, seed=s.seed, dtype=DTYPES[s.dtype])
    ts.pretrain.model.to(dev)
    ts.finetune.model.to(dev)
    return TextExperiment(s, task, ts, task.test_ids.to(dev), task.test_labels.to(dev))


def unigram_loss(ids: Tensor, vocab_size: int) -> float:
    """The pretraining loss (mean over sentences of the mean token NLL of both directions, nats, as
    :func:`msif_lab.text.lm_loss`) of a unigram model fitted to the same sentences ids [m, L]: every target token
    predicted by its frequency among all targets, with no context. The baseline a language model must beat."""
    targets = lm_targets(ids.cpu())
    valid = targets != IGNORE
    counts = torch.bincount(targets[valid], minlength=vocab_size).double()
    nll = torch.where(valid, -torch.log(counts / counts.sum())[targets.clamp(min=0)], 0.0)
    per_sentence = nll.sum((1, 2)) / valid.sum((1, 2))
    return float(per_sentence.mean())


# ----------------------------------------------------------------------------------- what the top sentences share
def word_types(ids: Tensor) -> set[int]:
    """The word ids of one encoded sentence [L], without ``<pad> <unk> <bos> <eos>``: what the model can match."""
    return {int(i) for i in ids if int(i) not in (PAD, UNK, BOS, EOS)}


def word_overlap(test_ids: Tensor, pretrain_ids: Tensor) -> Tensor:
    """Overlap [m] of one test sentence [L] with every pretraining sentence [m, L]: the fraction of the test
    sentence's in-vocabulary word types that occur in the pretraining sentence (0 when the test sentence has none)."""
    words = sorted(word_types(test_ids))
    if not words:
        return torch.zeros(len(pretrain_ids), dtype=torch.float64)
    hits = (pretrain_ids.unsqueeze(-1) == torch.tensor(words, device=pretrain_ids.device)).any(1)  # [m, k]
    return hits.double().mean(1).cpu()


def sentiment_lexicon(train_ids: Tensor, train_labels: Tensor, vocab_size: int, prior: float = 1.0) -> Tensor:
    """Log-odds [V] of each word id between positive and negative finetuning training sentences (a data-driven
    sentiment lexicon): log((c₊ + prior)/(N₊ + V·prior)) − log((c₋ + prior)/(N₋ + V·prior)) with c± the number of
    positive/negative training sentences containing the word. > 0: the word leans positive. Specials get 0."""
    present = torch.zeros(len(train_ids), vocab_size, dtype=torch.float64)
    present.scatter_(1, train_ids.cpu(), 1.0)
    pos, neg = train_labels.cpu() == 1, train_labels.cpu() == 0
    c_pos, c_neg = present[pos].sum(0), present[neg].sum(0)
    n_pos, n_neg = c_pos.sum(), c_neg.sum()
    lex = torch.log((c_pos + prior) / (n_pos + vocab_size * prior)) - torch.log((c_neg + prior) / (n_neg + vocab_size * prior))
    lex[[PAD, UNK, BOS, EOS]] = 0.0
    return lex


def sentence_polarity(ids: Tensor, lexicon: Tensor) -> Tensor:
    """Mean lexicon log-odds [N] of the in-vocabulary words of each sentence ids [N, L] (0 for none)."""
    ids = ids.cpu()
    known = (ids != PAD) & (ids != UNK) & (ids != BOS) & (ids != EOS)
    total = (lexicon[ids] * known).sum(1)
    return total / known.sum(1).clamp(min=1)


@dataclass
class Commonality:
    """For one test sentence: a property of every pretraining sentence [m], its mean over the top-k helpful, the
    top-k harmful and all sentences, and its Spearman correlation across all m sentences with the score I (does it
    make a sentence harmful rather than helpful?) and with |I| (does it make a sentence influential at all?)."""

    name: str
    values: Tensor
    helpful_mean: float
    harmful_mean: float
    all_mean: float
    spearman_with_score: float
    spearman_with_magnitude: float


def commonality(name: str, values: Tensor, scores: Tensor, k: int) -> Commonality:
    """Summarise ``values`` [m] against ``scores`` [m] (I > 0 harmful) for the top-``k`` of each sign."""
    values, scores = values.double().cpu(), scores.double().cpu()
    order = torch.argsort(scores)
    return Commonality(name, values, float(values[order[:k]].mean()), float(values[order[-k:]].mean()),
                       float(values.mean()), spearman(scores, values), spearman(scores.abs(), values))


def sentence_properties(exp: TextExperiment, test_index: int, pretrain_losses: Tensor) -> dict[str, Tensor]:
    """Properties [m] of every pretraining sentence relative to test sentence ``test_index`` (row of ``exp.test_x``):
    ``overlap`` (:func:`word_overlap`), ``polarity_agreement`` (sentence polarity from :func:`sentiment_lexicon`, sign
    flipped for a negative test sentence, so > 0 means it leans towards the test sentence's true label),
    ``length`` (tokens), ``unk_rate`` and ``pretrain_loss`` (f(z) at W*, U*, nats; ``pretrain_losses`` [m])."""
    task = exp.task
    ids = task.pretrain_ids
    words = (ids != PAD) & (ids != BOS) & (ids != EOS)
    lexicon = sentiment_lexicon(task.train_ids, task.train_labels, len(task.vocab))
    sign = 1.0 if int(exp.test_y[test_index]) == 1 else -1.0
    return {
        "overlap": word_overlap(exp.test_x[test_index].cpu(), ids),
        "polarity_agreement": sign * sentence_polarity(ids, lexicon),
        "length": words.sum(1).double(),
        "unk_rate": ((ids == UNK) & words).sum(1).double() / words.sum(1).clamp(min=1),
        "pretrain_loss": pretrain_losses.double().cpu(),
    }


def influence_table(scores: Tensor, sentences: Sequence[str], k: int, width: int = 110) -> list[str]:
    """Lines of a readable table: the ``k`` most helpful (most negative I) and ``k`` most harmful (most positive I)
    pretraining sentences for one test point, with their scores (``scores`` [m])."""
    order = torch.argsort(scores.cpu())

    def line(rank, i):
        text = sentences[i] if len(sentences[i]) <= width else sentences[i][:width - 1] + "…"
        return f"  {rank:>2d}. I = {float(scores[i]):+.3e}  #{i:<4d} {text}"

    lines = [f"most helpful (I < 0: up-weighting lowers the test loss):"]
    lines += [line(r + 1, int(i)) for r, i in enumerate(order[:k])]
    lines += [f"most harmful (I > 0: up-weighting raises the test loss):"]
    lines += [line(r + 1, int(i)) for r, i in enumerate(order.flip(0)[:k])]
    return lines
