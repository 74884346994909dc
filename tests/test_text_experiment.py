"""msif_lab.text_experiment: the NLP pipeline of notebook 07 on the text fixtures, and its measurements with known
answers. The multi-stage scores of the real mini-ELMo two-stage model are checked against a central finite
difference of re-training both stages (cases A and B)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

try:
    from tiny_models import fd_influence, rel_err
except ImportError:  # tests/ made a package
    from tests.tiny_models import fd_influence, rel_err

from msif_lab import text as T
from msif_lab.experiments import accuracy, train
from msif_lab.influence import MultiStageInfluence
from msif_lab.text_experiment import (TextSetup, build_text, commonality, influence_table, sentence_polarity,
                                      sentence_properties, sentiment_lexicon, unigram_loss, word_overlap)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "text"
GENSIM, VADER = FIXTURES / "gensim-4.4.0-py3-none-any.whl", FIXTURES / "vaderSentiment-3.3.2.tar.gz"

TINY = dict(n_pretrain=10, n_train=4, n_test=2, max_tokens=30, min_count=1, max_vocab=50, dim=3, hidden=2,
            weight_decay_pretrain=1e-2, weight_decay_finetune=1e-3, tol=1e-10, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_data")
    T.extract_text_sources(GENSIM, VADER, folder, pinned=False)
    return folder


def test_setup_checks_and_keys():
    with pytest.raises(ValueError, match="dtype"):
        TextSetup(dtype="float16")
    with pytest.raises(ValueError, match="alpha"):
        TextSetup(alpha=0.0)
    a, b = TextSetup(), TextSetup(alpha=1.0, n_train=10, weight_decay_finetune=0.5)
    assert a.pretraining_config() == b.pretraining_config()  # cases A and B share pretraining
    assert a.config() != b.config() and a.config()["dataset"] == "text"
    assert TextSetup(newton_from=1e-5).fit_kwargs()["newton_from"] == 1e-5


def test_word_overlap_lexicon_and_polarity():
    test = torch.tensor([T.BOS, 5, 6, T.UNK, 7, T.EOS, T.PAD])
    pre = torch.tensor([[T.BOS, 5, 9, T.EOS, 0, 0, 0], [T.BOS, 6, 7, 5, T.EOS, 0, 0], [T.BOS, T.UNK, T.EOS, 0, 0, 0, 0]])
    assert word_overlap(test, pre).tolist() == pytest.approx([1 / 3, 1.0, 0.0])  # <unk> never counts
    assert word_overlap(torch.tensor([T.BOS, T.UNK, T.EOS]), pre).tolist() == [0.0, 0.0, 0.0]
    ids = torch.tensor([[T.BOS, 4, 5, T.EOS], [T.BOS, 4, T.EOS, 0], [T.BOS, 6, T.EOS, 0], [T.BOS, 6, 5, T.EOS]])
    labels = torch.tensor([1, 1, 0, 0])
    lex = sentiment_lexicon(ids, labels, vocab_size=8)
    assert lex[4] > 0 > lex[6] and lex[5] == pytest.approx(0.0, abs=1e-12)  # 5 is in one sentence of each label
    assert lex[[T.PAD, T.UNK, T.BOS, T.EOS]].abs().sum() == 0 and lex[7] == pytest.approx(0.0, abs=1e-12)
    pol = sentence_polarity(torch.tensor([[T.BOS, 4, 6, T.EOS], [T.BOS, T.UNK, T.EOS, 0]]), lex)
    assert pol.tolist() == pytest.approx([float(lex[4] + lex[6]) / 2, 0.0])


def test_commonality_and_table():
    scores = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0])
    values = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    c = commonality("v", values, scores, k=2)
    assert (c.helpful_mean, c.harmful_mean, c.all_mean) == (15.0, 45.0, 30.0)
    assert c.spearman_with_score == pytest.approx(1.0) and c.spearman_with_magnitude == pytest.approx(0.3)
    lines = influence_table(scores, [f"sentence {i}" for i in range(5)], k=2)
    assert "#0" in lines[1] and "#1" in lines[2] and "#4" in lines[4] and "#3" in lines[5]
    assert "-3.000e+00" in lines[1] and "+4.000e+00" in lines[4]


def test_unigram_loss_by_hand():
    vocab = T.Vocab([*T.SPECIALS, "a", "b"])
    ids, _ = T.encode([["a", "b"], ["a"]], vocab)
    # targets: forward a b <eos> | a <eos>; backward <bos> a b | <bos> a  -> counts a 4, b 2, <eos> 2, <bos> 2 of 10
    p = {"a": 0.4, "b": 0.2, "<eos>": 0.2, "<bos>": 0.2}
    first = -(2 * math.log(p["a"]) + 2 * math.log(p["b"]) + math.log(p["<eos>"]) + math.log(p["<bos>"])) / 6
    second = -(2 * math.log(p["a"]) + math.log(p["<eos>"]) + math.log(p["<bos>"])) / 4
    assert unigram_loss(ids, len(vocab)) == pytest.approx((first + second) / 2, rel=1e-12)


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_pipeline_on_the_fixture_matches_finite_differences_of_retraining(root, alpha):
    exp = build_text(TextSetup(alpha=alpha, **TINY), root)
    ts = exp.two_stage
    pre, ft = train(exp, cache=False)
    assert pre.converged and ft.converged and 0.0 <= accuracy(exp, ft.params) <= 1.0
    res = MultiStageInfluence(ts, pre.params, ft.params).scores(exp.test_x, exp.test_y)
    assert res.scores.shape == (2, 10) and torch.isfinite(res.scores).all()
    for i in (0, 7):
        fd = fd_influence(ts, pre, ft, (exp.test_x,), exp.test_y, i, eps=1e-4)
        assert rel_err(res.scores[:, i], fd) < 2e-3, (i, res.scores[:, i], fd)
    losses = ts.pretrain.losses(pre.params, ts.pretrain.inputs, ts.pretrain.targets)
    props = sentence_properties(exp, 0, losses)
    assert set(props) == {"overlap", "polarity_agreement", "length", "unk_rate", "pretrain_loss"}
    assert all(v.shape == (10,) and torch.isfinite(v).all() for v in props.values())
    assert (props["length"] == (exp.task.pretrain_lengths - 2).double()).all()
    assert losses.mean() < unigram_loss(exp.task.pretrain_ids, len(exp.task.vocab))  # context helps


def test_conjugate_gradient_scores_match_the_exact_ones_on_the_text_model(root):
    """The iterative route of the paper profile (CG on H_f + λI, no dense Hessian) against dense solves with the
    same damping, on the real mini-ELMo two-stage model."""
    from msif_lab.solvers import Solver

    exp = build_text(TextSetup(alpha=None, **TINY), root)
    pre, ft = train(exp, cache=False)
    lam = 1e-3
    dense = MultiStageInfluence(exp.two_stage, pre.params, ft.params, pretrain_solver=Solver("dense", damping=lam))
    cg = MultiStageInfluence(exp.two_stage, pre.params, ft.params,
                             pretrain_solver=Solver("cg", damping=lam, options={"tol": 1e-10}))
    exact, iterative = dense.scores(exp.test_x, exp.test_y), cg.scores(exp.test_x, exp.test_y)
    info = iterative.diagnostics["pretrain"]
    assert info.method == "cg" and info.converged and info.residual < 1e-9
    assert rel_err(iterative.scores, exact.scores) < 1e-6
