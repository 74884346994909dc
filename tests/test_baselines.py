"""Baselines (msif_lab.baselines) and false-transfer detection (msif_lab.detection): shapes, sign conventions, and
cases with a known answer, on the tiny two-stage problem of tiny_models."""
import math

import pytest
import torch
import torch.nn.functional as F

from msif_lab.baselines import (METHODS, TEST_SPECIFIC, applicable_methods, embedding_features, entropy_scores,
                                features_only_scores, gradient_dot_scores, loss_scores, multi_stage_scores,
                                random_scores, score_methods, similarity_scores)
from msif_lab.detection import (FalseTransferSetup, average_precision, detection_report, flip_labels,
                                precision_at_k, precision_recall_curve, ranking, remove_and_rerun)
from msif_lab.influence import MultiStageInfluence

from tiny_models import DT, M, T, rerun_test_loss, tight_pretrain, trained


@pytest.fixture(scope="module")
def case_a():
    return trained(None)


@pytest.fixture(scope="module")
def case_b():
    return trained(1.0)


def call(fn, problem, **kw):
    ts, pre, ft, Xt, yt = problem
    return fn(ts, pre.params, ft.params, Xt, yt, **kw)


# ---------------------------------------------------------------------------------------------- shape, common API
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_returns_T_by_m_finite(case_a, name):
    s = call(METHODS[name], case_a)
    assert s.shape == (T, M) and s.dtype == DT and torch.isfinite(s).all()


@pytest.mark.parametrize("name", list(METHODS))
def test_test_specific_flag_matches_rows(case_a, name):
    s = call(METHODS[name], case_a)
    rows_equal = bool(torch.equal(s, s[:1].expand_as(s)))
    assert rows_equal == (not TEST_SPECIFIC[name]) or name == "random"
    if name == "random":
        assert not rows_equal  # independent rows


def test_case_b_skips_features_only(case_b):
    ts = case_b[0]
    assert "features-only" not in applicable_methods(ts)
    with pytest.raises(ValueError, match="case A"):
        call(features_only_scores, case_b)
    out = score_methods(*case_b[:1], case_b[1].params, case_b[2].params, case_b[3], case_b[4])
    assert list(out) == [n for n in METHODS if n != "features-only"]
    assert all(r.scores.shape == (T, M) for r in out.values())


def test_score_methods_times_and_options(case_a):
    ts, pre, ft, Xt, yt = case_a
    out = score_methods(ts, pre.params, ft.params, Xt, yt, names=["loss", "random"],
                        options={"random": {"seed": 3}}, repeats=2)
    assert list(out) == ["loss", "random"]
    assert all(r.seconds >= 0 for r in out.values())
    assert torch.equal(out["random"].scores, call(random_scores, case_a, seed=3))
    assert torch.allclose(out["loss"].total, out["loss"].scores.sum(0))
    with pytest.raises(ValueError, match="Unknown method"):
        score_methods(ts, pre.params, ft.params, Xt, yt, names=["nope"])


def test_bad_test_batch_is_rejected(case_a):
    ts, pre, ft, Xt, yt = case_a
    with pytest.raises(ValueError):
        loss_scores(ts, pre.params, ft.params, Xt, yt[:-1])


# ---------------------------------------------------------------------------------------------- known answers
def test_loss_is_the_pretraining_cross_entropy(case_a):
    ts, pre, ft, Xt, yt = case_a
    s = call(loss_scores, case_a)
    with torch.no_grad():
        ref = F.cross_entropy(ts.pretrain.outputs(pre.params, ts.pretrain.inputs), ts.pretrain.targets,
                              reduction="none")
    assert torch.allclose(s[0], ref, rtol=0, atol=1e-14)
    assert (s > 0).all()


def test_entropy_is_log_k_for_a_zero_head_and_bounded(case_a):
    ts, pre, ft, Xt, yt = case_a
    s = call(entropy_scores, case_a)
    assert (s >= 0).all() and (s <= math.log(3) + 1e-12).all()
    flat = {n: (torch.zeros_like(p) if n.startswith("head.") else p) for n, p in pre.params.items()}
    s0 = entropy_scores(ts, flat, ft.params, Xt, yt)
    assert torch.allclose(s0, torch.full_like(s0, math.log(3)), atol=1e-14)
    # batching does not change anything
    assert torch.allclose(entropy_scores(ts, pre.params, ft.params, Xt, yt, batch_size=7), s, atol=1e-14)


def test_similarity_is_one_for_the_example_itself(case_a):
    ts, pre, ft, Xt, yt = case_a
    Z = ts.pretrain.inputs[0]
    idx = torch.tensor([4, 17])
    s = similarity_scores(ts, pre.params, ft.params, Z[idx], yt[:2])
    assert s.shape == (2, M)
    assert torch.allclose(s[torch.arange(2), idx], torch.ones(2, dtype=DT), atol=1e-12)
    assert (s.argmax(1) == idx).all() and (s.abs() <= 1 + 1e-12).all()
    phi = embedding_features(ts.finetune, ft.params, Z[:3])
    assert phi.shape == (3, 3)


def test_gradient_dot_sign_matches_a_gradient_step(case_a):
    """A step of size η along −∇_W f(z_i) changes the test loss by ≈ +η·score (case A: Θ held, W* = W)."""
    ts, pre, ft, Xt, yt = case_a
    s = call(gradient_dot_scores, case_a)
    from msif_lab.curvature import per_example_grads, ParamSpace
    w_pre = [a for a, _ in ts.w_pairs]
    i = 5
    g_f = per_example_grads(ts.pretrain, pre.params, w_pre, ts.pretrain.inputs, ts.pretrain.targets)[i]
    step = ParamSpace(pre.params, w_pre).unflatten(g_f)
    eta = 1e-5

    def test_loss(sign):
        p = dict(ft.params)
        for a, b in ts.w_pairs:
            p[b] = ft.params[b] - sign * eta * step[a]
        with torch.no_grad():
            return ts.finetune.losses(p, Xt, yt)

    fd = (test_loss(+1) - test_loss(-1)) / (2 * eta)
    assert torch.allclose(fd, s[:, i], rtol=1e-6, atol=1e-10)
    assert torch.allclose(call(gradient_dot_scores, case_a, scoring="grad"), s, atol=1e-12)


def test_multi_stage_and_features_only_match_the_core(case_a):
    ts, pre, ft, Xt, yt = case_a
    ref = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt).scores
    feat_ref = MultiStageInfluence(ts, pre.params, ft.params, head_refit=False).scores(Xt, yt).scores
    assert torch.allclose(call(multi_stage_scores, case_a), ref, atol=1e-12)
    feat = call(features_only_scores, case_a)
    assert torch.allclose(feat, feat_ref, atol=1e-12)
    assert (feat - ref).norm() > 1e-3 * ref.norm()  # the head-refit term matters


def test_features_only_is_the_derivative_with_the_head_held(case_a):
    """Known answer: features-only = d g(x_t; W*(ε), Θ* held) / dε (the pretraining re-fit only)."""
    ts, pre, ft, Xt, yt = case_a
    feat = call(features_only_scores, case_a)
    i, eps = 11, 1e-4

    def loss_with_weight(delta):
        w = torch.ones(M, dtype=DT)
        w[i] += M * delta
        p2 = tight_pretrain(ts, pre.params, w)
        p = dict(ft.params)
        p.update(ts.embedding_for_finetune(p2.params))
        with torch.no_grad():
            return ts.finetune.losses(p, Xt, yt)

    fd = (loss_with_weight(eps) - loss_with_weight(-eps)) / (2 * eps)
    assert float((fd - feat[:, i]).abs().max()) < 1e-4 * float(feat[:, i].abs().max()), (fd, feat[:, i])


def test_random_is_seeded(case_a):
    a, b, c = (call(random_scores, case_a, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean())) < 0.5


# ---------------------------------------------------------------------------------------------- detection metrics
def test_precision_and_average_precision_known_values():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    rel = torch.tensor([1, 0, 1, 0, 0]).bool()
    assert precision_at_k(scores, rel, 1) == 1.0
    assert precision_at_k(scores, rel, 2) == 0.5
    assert precision_at_k(scores, rel, 3) == pytest.approx(2 / 3)
    assert average_precision(scores, rel) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(-scores, rel) == pytest.approx((1 / 3 + 2 / 5) / 2)
    p, r = precision_recall_curve(scores, rel)
    assert torch.allclose(r, torch.tensor([0.5, 0.5, 1, 1, 1], dtype=torch.float64))
    assert torch.allclose(p[-1], torch.tensor(0.4, dtype=torch.float64))
    rep = detection_report(scores, rel, ks=(2, 10))
    assert set(rep) == {"ap", "p@2"}
    assert ranking(torch.tensor([1.0, 3.0, 2.0])).tolist() == [1, 2, 0]


def test_perfect_and_random_rankings():
    rel = torch.zeros(200, dtype=torch.bool)
    rel[:20] = True
    assert average_precision(rel.double(), rel) == 1.0
    g = torch.Generator().manual_seed(0)
    aps = [average_precision(torch.randn(200, generator=g), rel) for _ in range(200)]
    assert abs(sum(aps) / len(aps) - 0.1) < 0.03  # chance level ≈ prevalence


def test_detection_input_errors():
    with pytest.raises(ValueError, match="relevant"):
        average_precision(torch.randn(5), torch.zeros(5))
    with pytest.raises(ValueError, match="entries"):
        precision_at_k(torch.randn(5), torch.ones(4), 1)
    with pytest.raises(ValueError, match="k must"):
        precision_at_k(torch.randn(5), torch.ones(5), 6)


# ---------------------------------------------------------------------------------------------- planting
def test_flip_labels_with_mapping_and_at_random():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 4, 5, 4, 5])
    y2, idx = flip_labels(y, torch.arange(4, 10), 4, {4: 5, 5: 4}, seed=1)
    assert len(idx) == 4 and set(idx.tolist()) <= set(range(4, 10))
    assert torch.equal(y2[idx], 9 - y[idx])
    keep = torch.ones(10, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(y2[keep], y[keep])
    y3, idx3 = flip_labels(y, torch.arange(0, 4), 4, seed=2)
    assert (y3[idx3] != y[idx3]).all() and set(y3[idx3].tolist()) <= {0, 1, 2, 3}
    assert torch.equal(flip_labels(y, torch.arange(0, 4), 3, seed=5)[0], flip_labels(y, torch.arange(0, 4), 3, seed=5)[0])
    with pytest.raises(ValueError):
        flip_labels(y, torch.arange(3), 4)


def test_false_transfer_setup_checks():
    with pytest.raises(ValueError, match="disjoint"):
        FalseTransferSetup(pretrain_classes=(0, 4))
    with pytest.raises(ValueError, match="binary"):
        FalseTransferSetup(finetune_classes=(4, 7, 9))
    with pytest.raises(ValueError, match="More planted"):
        FalseTransferSetup(n_pretrain=5, n_planted=20)


def test_remove_and_rerun_matches_reference(case_a):
    ts, pre, ft, Xt, yt = case_a
    none = remove_and_rerun(ts, pre.params, ft.params, [], Xt, yt, fit_kwargs=dict(tol=1e-11, newton_steps=5),
                            cache=False)
    with torch.no_grad():
        original = ts.finetune.losses(ft.params, Xt, yt)
    assert none.test_loss == pytest.approx(float(original.mean()), abs=1e-9)
    gone = remove_and_rerun(ts, pre.params, ft.params, torch.tensor([3, 8]), Xt, yt,
                            fit_kwargs=dict(tol=1e-11, newton_steps=5), cache=False)
    w = torch.ones(M, dtype=DT)
    w[[3, 8]] = 0
    ref = rerun_test_loss(ts, pre, ft, Xt, yt, w)
    assert gone.test_loss == pytest.approx(float(ref.mean()), abs=1e-8)
    assert 0 <= gone.accuracy <= 1 and gone.grad_norm < 1e-8
