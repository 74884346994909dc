"""Ground truth for msif_lab.influence: closed forms, leave-one-out retraining, finite differences of the full
two-stage re-optimisation, the α limits, and the formulas computed by hand with dense matrices."""
import warnings

import pytest
import torch
from torch import nn

try:
    from tiny_models import (DT, TIGHT, assert_unchanged, ce, data, fd_influence, make_two_stage, models, polish,
                             rel_err, snapshot, sq, tight_finetune, tight_pretrain, trained)
except ImportError:  # tests/ made a package
    from tests.tiny_models import (DT, TIGHT, assert_unchanged, ce, data, fd_influence, make_two_stage, models,
                                   polish, rel_err, snapshot, sq, tight_finetune, tight_pretrain, trained)

from msif_lab.curvature import NonFiniteError, ParamSpace, StageObjective, per_example_grads
from msif_lab.influence import InfluenceResult, MultiStageInfluence, single_stage_influence
from msif_lab.solvers import IndefiniteHessianWarning, Solver
from msif_lab.stages import LossError, Stage, TwoStage
from msif_lab.train import fit_stage


def _pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])


def _spearman(a, b):
    rank = lambda x: torch.argsort(torch.argsort(x.reshape(-1))).to(DT)  # noqa: E731  (no ties here)
    return _pearson(rank(a), rank(b))


def _by_hand(ts, pre, ft, Xt, yt, *, damping=0.0, head_refit=True, block=None):
    """PAPER.md §2 with dense Hessians: scores [T, m] (test-side vectors from explicit matrix blocks)."""
    P, Fs = ts.pretrain, ts.finetune
    block = P.trainable_names if block is None else block
    Hf = StageObjective(P, pre.params, block).hessian()
    Gf = per_example_grads(P, pre.params, block, P.inputs, P.targets)  # [m, p_P]
    w_ft = Fs.embedding_names
    p_w = ParamSpace(ft.params, w_ft).size
    g = per_example_grads(Fs, ft.params, w_ft + Fs.head_names, Xt, yt)  # [T, p_W + p_Θ]
    if ts.alpha is None:
        H = StageObjective(Fs, ft.params, w_ft + Fs.head_names, regularised=Fs.head_names).hessian()
        u = g[:, :p_w]
        if head_refit:
            H_wt, H_tt = H[:p_w, p_w:], H[p_w:, p_w:]
            u = u - (H_wt @ torch.linalg.solve(H_tt, g[:, p_w:].T)).T
    else:
        anchor = ts.embedding_for_finetune(pre.params)
        H = StageObjective(Fs, ft.params, w_ft + Fs.head_names, proximal=(ts.alpha, anchor)).hessian()
        u = ts.alpha * torch.linalg.solve(H, g.T).T[:, :p_w]
    # [u; 0_U] over the pretraining block (W of the finetuning model renamed to the pretraining model)
    u_named = [ParamSpace(ft.params, w_ft).unflatten(row) for row in u]
    space = ParamSpace(pre.params, block)
    rhs = torch.stack([space.flatten({n: (un[dict(ts.w_pairs)[n]] if n in dict(ts.w_pairs) else
                                          torch.zeros_like(pre.params[n])) for n in block}) for un in u_named])
    v = torch.linalg.solve(Hf + damping * torch.eye(len(Hf), dtype=DT), rhs.T).T
    return -(v @ Gf.T)


# ------------------------------------------------------------------------------------------------ single stage
def test_single_stage_matches_ridge_regression_closed_form():
    Z, _, _, _, Xt, _ = data()
    y = Z @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=DT) + 0.3 * torch.cos(3 * Z[:, 1])
    yt = Xt @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=DT)
    m, wd = len(y), 0.2
    model = nn.Linear(5, 1, bias=False).to(DT)
    stage = Stage(model, sq, Z, y, embedding="weight", weight_decay=wd)
    H = Z.T @ Z / m + wd * torch.eye(5, dtype=DT)
    theta = torch.linalg.solve(H, Z.T @ y / m)  # the exact optimum
    params = {"weight": theta[None].clone()}
    res = single_stage_influence(stage, params, Xt, yt)
    g_train = Z * (Z @ theta - y)[:, None]  # ∇ l(z_i) = z_i (z_iᵀθ − y_i)
    g_test = Xt * (Xt @ theta - yt)[:, None]
    expected = -g_test @ torch.linalg.solve(H, g_train.T)
    assert isinstance(res, InfluenceResult) and res.scores.shape == (3, m)
    assert torch.allclose(res.scores, expected, rtol=1e-10, atol=1e-13)
    assert torch.allclose(res.predicted_change, -expected / m, rtol=1e-10, atol=1e-15)
    assert torch.allclose(res.test_loss, 0.5 * (Xt @ theta - yt) ** 2)
    # ... and the score is the derivative of the re-fitted test loss: closed-form ridge with weights 1 + mε
    i, eps = 7, 1e-5

    def refit_test_loss(e):
        w = torch.ones(m, dtype=DT)
        w[i] += m * e
        th = torch.linalg.solve((Z.T * w) @ Z / m + wd * torch.eye(5, dtype=DT), (Z.T * w) @ y / m)
        return 0.5 * (Xt @ th - yt) ** 2

    fd = (refit_test_loss(eps) - refit_test_loss(-eps)) / (2 * eps)
    assert torch.allclose(res.scores[:, i], fd, rtol=1e-6, atol=1e-9)
    # the iterative solvers give the same scores
    for solver in [Solver("cg", options=dict(tol=1e-12)), Solver("lissa", options=dict(depth=100))]:
        got = single_stage_influence(stage, params, Xt[:1], yt[:1], solver=solver).scores
        assert torch.allclose(got, expected[:1], rtol=1e-7, atol=1e-9), solver.method


def test_single_stage_predicts_leave_one_out_retraining_of_logistic_regression():
    Z, yz, *_ = data()
    yb = (yz > 0).long()
    g = torch.Generator().manual_seed(3)
    Xt = torch.randn(4, 5, generator=g, dtype=DT)
    yt = (Xt[:, 0] + 0.5 * Xt[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DT)
    stage = Stage(model, ce, Z, yb, embedding="weight", weight_decay=0.05)
    names = stage.trainable_names
    fit = polish(stage, fit_stage(stage, stage.initial_params(), names, tol=1e-10, max_iter=500).params, names)
    assert fit.grad_norm < 1e-13
    res = single_stage_influence(stage, fit.params, Xt, yt)
    m = stage.n
    actual = torch.empty(len(yt), m, dtype=DT)
    for i in range(m):
        w = torch.ones(m, dtype=DT)
        w[i] = 0.0  # removed, keeping the 1/m normalisation
        loo = fit_stage(stage, fit.params, names, sample_weights=w, tol=1e-10, max_iter=500)
        assert loo.grad_norm < 1e-8
        with torch.no_grad():
            actual[:, i] = stage.losses(loo.params, Xt, yt) - res.test_loss
    pred = res.predicted_change
    assert _pearson(pred, actual) > 0.95 and _spearman(pred, actual) > 0.95, (_pearson(pred, actual),
                                                                            _spearman(pred, actual))


# ------------------------------------------------------------------------------------------------ multi stage
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_multi_stage_matches_finite_difference_of_full_reoptimisation(alpha):
    ts, pre, ft, Xt, yt = trained(alpha)
    res = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    assert res.scores.shape == (3, ts.pretrain.n)
    top = int(res.scores.abs().sum(0).argmax())
    for i in sorted({0, top}):
        fd = fd_influence(ts, pre, ft, Xt, yt, i)
        assert rel_err(res.scores[:, i], fd) < 1e-3, (i, res.scores[:, i], fd)


@pytest.mark.parametrize("alpha", [None, 0.7])
def test_multi_stage_matches_the_formulas_by_hand(alpha):
    ts, pre, ft, Xt, yt = trained(alpha)
    res = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    assert torch.allclose(res.scores, _by_hand(ts, pre, ft, Xt, yt), rtol=1e-9, atol=1e-12)
    assert torch.allclose(res.predicted_change, -res.scores / ts.pretrain.n)
    with torch.no_grad():
        assert torch.allclose(res.test_loss, ts.finetune.losses(ft.params, Xt, yt))
    assert set(res.diagnostics) == {"finetune", "pretrain"}
    assert res.diagnostics["pretrain"].n_negative == 0 and res.diagnostics["pretrain"].residual < 1e-10


def test_case_b_tends_to_case_a_as_alpha_grows():
    tsA, pre, ftA, Xt, yt = trained(None)
    tsB, _, ftB, _, _ = trained(1e4)
    a = MultiStageInfluence(tsA, pre.params, ftA.params).scores(Xt, yt).scores
    b = MultiStageInfluence(tsB, pre.params, ftB.params).scores(Xt, yt).scores
    assert rel_err(b, a) < 1e-2
    tsB2, _, ftB2, _, _ = trained(1.0)
    b2 = MultiStageInfluence(tsB2, pre.params, ftB2.params).scores(Xt, yt).scores
    assert rel_err(b2, a) > 5 * rel_err(b, a)  # and α = 1 is visibly further away


def test_case_b_vanishes_linearly_as_alpha_goes_to_zero():
    tsA, pre, ftA, Xt, yt = trained(None)
    out = {}
    init = None
    for alpha in [1e-3, 1e-4, 1e-5]:  # continuation: each finetuning starts from the previous one
        ts, _, _ = make_two_stage(alpha)
        ft = tight_finetune(ts, pre.params, init)
        assert ft.grad_norm < 1e-12
        init = ft.params
        out[alpha] = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt).scores
    ratio = float(out[1e-5].norm() / out[1e-4].norm())
    assert 0.098 < ratio < 0.102, ratio  # scores ∝ α (W~ itself still moves by O(α/wd))
    assert rel_err(out[1e-5] / 1e-5, out[1e-4] / 1e-4) < 0.05
    a = MultiStageInfluence(tsA, pre.params, ftA.params).scores(Xt, yt).scores
    assert float(out[1e-5].norm()) < 1e-2 * float(a.norm())


def test_dropping_the_head_refit_term_changes_case_a():
    ts, pre, ft, Xt, yt = trained(None)
    full = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt).scores
    feat = MultiStageInfluence(ts, pre.params, ft.params, head_refit=False).scores(Xt, yt).scores
    assert rel_err(feat, full) > 0.1
    assert torch.allclose(feat, _by_hand(ts, pre, ft, Xt, yt, head_refit=False), rtol=1e-9, atol=1e-12)


def test_pretraining_damping_changes_the_scores_as_h_plus_lambda_i():
    ts, pre, ft, Xt, yt = trained(None)
    base = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt).scores
    damped = MultiStageInfluence(ts, pre.params, ft.params, pretrain_solver=Solver("dense", 0.05)).scores(Xt, yt)
    assert rel_err(damped.scores, base) > 0.05
    assert torch.allclose(damped.scores, _by_hand(ts, pre, ft, Xt, yt, damping=0.05), rtol=1e-9, atol=1e-12)
    assert damped.diagnostics["pretrain"].damping == 0.05


def test_pretrain_block_uses_that_block_of_the_dense_hessian():
    ts, pre, ft, Xt, yt = trained(1.0)
    block = ["embed.net.1.weight", "head.weight"]
    res = MultiStageInfluence(ts, pre.params, ft.params, pretrain_block=block).scores(Xt, yt)
    assert torch.allclose(res.scores, _by_hand(ts, pre, ft, Xt, yt, block=block), rtol=1e-9, atol=1e-12)
    full = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    assert rel_err(res.scores, full.scores) > 1e-3  # a different (approximate) score, not silently the full one


def test_sharing_the_pretraining_factor_across_cases_gives_the_same_scores():
    tsA, pre, ftA, Xt, yt = trained(None)
    tsB, _, ftB, _, _ = trained(1.0)
    a = MultiStageInfluence(tsA, pre.params, ftA.params)
    a.scores(Xt, yt)  # factorises H_f
    b_shared = MultiStageInfluence(tsB, pre.params, ftB.params).share_pretrain_factor(a)
    assert b_shared._factors["pretrain"] is a._factors["pretrain"]
    b_own = MultiStageInfluence(tsB, pre.params, ftB.params).scores(Xt, yt).scores
    assert torch.equal(b_shared.scores(Xt, yt).scores, b_own)
    other = {n: p + 1e-3 for n, p in pre.params.items()}  # another optimum: another H_f
    with pytest.raises(ValueError, match="different pretraining Hessians"):
        MultiStageInfluence(tsB, other, ftB.params).share_pretrain_factor(a)
    block = MultiStageInfluence(tsB, pre.params, ftB.params, pretrain_block=["embed.net.1.weight", "head.weight"])
    with pytest.raises(ValueError, match="different pretraining Hessians"):
        block.share_pretrain_factor(a)


def test_iterative_solvers_agree_with_dense_inside_the_pipeline():
    ts, pre, ft, Xt, yt = trained(1.0)
    lam = 0.3
    ref = MultiStageInfluence(ts, pre.params, ft.params, pretrain_solver=Solver("dense", lam),
                              finetune_solver=Solver("dense", 0.0)).scores(Xt[:1], yt[:1]).scores
    cg = MultiStageInfluence(ts, pre.params, ft.params, pretrain_solver=Solver("cg", lam, dict(tol=1e-12)),
                             finetune_solver=Solver("cg", 0.0, dict(tol=1e-12))).scores(Xt[:1], yt[:1]).scores
    lissa = MultiStageInfluence(ts, pre.params, ft.params,
                                pretrain_solver=Solver("lissa", lam, dict(depth=90, scale=1.4)),
                                finetune_solver=Solver("cg", 0.0, dict(tol=1e-12))).scores(Xt[:1], yt[:1]).scores
    assert rel_err(cg, ref) < 1e-8
    assert rel_err(lissa, ref) < 1e-6


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_scoring_methods_and_batch_size_do_not_change_results(alpha):
    ts, pre, ft, Xt, yt = trained(alpha)
    ref = MultiStageInfluence(ts, pre.params, ft.params, scoring="jvp").scores(Xt, yt).scores
    for kw in [dict(scoring="grad"), dict(scoring="auto"), dict(batch_size=7), dict(batch_size=3, scoring="grad")]:
        got = MultiStageInfluence(ts, pre.params, ft.params, **kw).scores(Xt, yt).scores
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-13), kw


def test_repeated_calls_are_identical_and_nothing_is_mutated():
    ts, pre, ft, Xt, yt = trained(1.0)
    snaps = snapshot(ts.pretrain.model), snapshot(ts.finetune.model)
    pre_copy = {n: p.clone() for n, p in pre.params.items()}
    inf = MultiStageInfluence(ts, pre.params, ft.params)
    a = inf.scores(Xt, yt)
    inf.scores(Xt[:1], yt[:1])
    b = inf.scores(Xt, yt)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.test_loss, b.test_loss)
    c = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    assert torch.equal(a.scores, c.scores)
    # order of test points does not matter: one test point alone gives that row
    assert torch.allclose(inf.scores(Xt[2:], yt[2:]).scores[0], a.scores[2], rtol=1e-12, atol=1e-15)
    # scoring other examples (a subset of the pretraining set) gives those columns
    idx = torch.tensor([5, 1, 30])
    sub = inf.score_vectors(inf.test_vectors(Xt, yt), inputs=ts.pretrain.inputs[0][idx],
                            targets=ts.pretrain.targets[idx])
    assert torch.allclose(sub.scores, a.scores[:, idx], rtol=1e-12, atol=1e-15)
    assert_unchanged(ts.pretrain.model, snaps[0])
    assert_unchanged(ts.finetune.model, snaps[1])
    assert all(torch.equal(pre.params[n], pre_copy[n]) for n in pre_copy)
    # and the whole pipeline (training included) left the models at their initial values and flags
    fresh_pre, fresh_ft = models()
    for mine, fresh in [(ts.pretrain.model, fresh_pre), (ts.finetune.model, fresh_ft)]:
        for (n, p), (_, q) in zip(mine.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q) and p.requires_grad and mine.training == fresh.training, n


def test_float32_works_with_a_looser_tolerance():
    ts32, Xt, yt = make_two_stage(None, dtype=torch.float32)
    kw = dict(tol=1e-6, max_iter=500)
    pre = fit_stage(ts32.pretrain, ts32.pretrain.initial_params(), ts32.pretrain.trainable_names, **kw)
    from msif_lab.train import finetune
    ft = finetune(ts32, pre.params, **kw)
    res32 = MultiStageInfluence(ts32, pre.params, ft.params).scores(Xt.float(), yt)
    assert res32.scores.dtype == torch.float32 and torch.isfinite(res32.scores).all()
    ts64, Xt64, _ = make_two_stage(None)
    to64 = lambda p: {n: v.double() for n, v in p.items()}  # noqa: E731
    res64 = MultiStageInfluence(ts64, to64(pre.params), to64(ft.params)).scores(Xt64, yt)
    assert rel_err(res32.scores.double(), res64.scores) < 1e-3


def test_frozen_layer_inside_the_embedding():
    """depth-2 embedding with its first layer frozen: W is the second layer only; FD still agrees (case B)."""
    pre_m, ft_m = models(depth=2)
    for m_ in (pre_m, ft_m):
        m_.embed.net[1].weight.requires_grad_(False)
        m_.embed.net[1].bias.requires_grad_(False)
    ft_m.embed.net[1].load_state_dict(pre_m.embed.net[1].state_dict())  # the same frozen layer in both models
    ts, Xt, yt = make_two_stage(1.0, pre_model=pre_m, ft_model=ft_m)
    assert ts.pretrain.embedding_names == ["embed.net.3.weight", "embed.net.3.bias"]
    pre = tight_pretrain(ts)
    ft = tight_finetune(ts, pre.params)
    assert pre.grad_norm < 1e-12 and ft.grad_norm < 1e-12
    res = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    fd = fd_influence(ts, pre, ft, Xt, yt, 3)
    assert rel_err(res.scores[:, 3], fd) < 1e-3
    assert not pre_m.embed.net[1].weight.requires_grad


def test_models_with_several_inputs():
    """forward(x, z): a tuple of input tensors flows through every pass (training, HVPs, scoring, re-runs)."""
    class TwoInputs(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.embed = nn.Linear(5, 3)
            self.head = nn.Linear(4, k)

        def forward(self, x, z):
            return self.head(torch.cat([torch.tanh(self.embed(x)), z], dim=1))

    torch.manual_seed(0)
    Z, yz, X, yx, Xt, yt = data()
    g = torch.Generator().manual_seed(5)
    zz, xz, tz = (torch.randn(k, 1, generator=g, dtype=DT) for k in (len(Z), len(X), len(Xt)))
    ts = TwoStage(Stage(TwoInputs(3).to(DT), ce, (Z, zz), yz, weight_decay=1e-2),
                  Stage(TwoInputs(2).to(DT), ce, (X, xz), yx, weight_decay=1e-2), alpha=1.0)
    pre = tight_pretrain(ts)
    ft = tight_finetune(ts, pre.params)
    a = MultiStageInfluence(ts, pre.params, ft.params, scoring="jvp").scores((Xt, tz), yt).scores
    b = MultiStageInfluence(ts, pre.params, ft.params, scoring="grad", batch_size=7).scores((Xt, tz), yt).scores
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert rel_err(a[:, 2], fd_influence(ts, pre, ft, (Xt, tz), yt, 2)) < 1e-3


@pytest.mark.filterwarnings("ignore::msif_lab.solvers.IndefiniteHessianWarning")  # untrained: batching only
def test_batchnorm_embedding_scores_do_not_depend_on_batching():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Tanh())
            self.head = nn.Linear(3, k)

        def forward(self, x):
            return self.head(self.embed(x))

    pre_m, ft_m = Net(3).to(DT), Net(2).to(DT)
    for m_ in (pre_m, ft_m):
        m_.embed[1].running_mean.fill_(0.2)
        m_.embed[1].running_var.fill_(1.5)
    snap = snapshot(pre_m)
    ts, Xt, yt = make_two_stage(0.5, pre_model=pre_m, ft_model=ft_m)
    assert "embed.1.weight" in ts.pretrain.embedding_names
    pre = {n: p.detach() for n, p in pre_m.named_parameters()}
    ft = {n: p.detach() for n, p in ft_m.named_parameters()}
    a = MultiStageInfluence(ts, pre, ft).scores(Xt, yt).scores
    b = MultiStageInfluence(ts, pre, ft, batch_size=3, scoring="grad").scores(Xt, yt).scores
    assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    assert_unchanged(pre_m, snap)


# ------------------------------------------------------------------------------------------------ bad input
def _inf(alpha=None, **kw):
    ts, pre, ft, Xt, yt = trained(alpha)
    return MultiStageInfluence(ts, pre.params, ft.params, **kw), Xt, yt


def test_test_batch_of_the_wrong_shape():
    inf, Xt, yt = _inf()
    with pytest.raises(ValueError, match=r"Test input 0 has shape \(3, 1, 5\).*add the batch dimension"):
        inf.scores(Xt[:, None], yt)
    with pytest.raises(ValueError, match=r"Test input 0 has shape \(3, 4\), the training inputs \(30, 5\)"):
        inf.scores(Xt[:, :4], yt)
    with pytest.raises(ValueError, match="Test input 0 has 3 rows but there are 2 test targets"):
        inf.scores(Xt, yt[:2])
    with pytest.raises(ValueError, match="test batch has 2 input tensor"):
        inf.scores((Xt, Xt), yt)
    with pytest.raises(ValueError, match="one target per test point"):
        inf.scores(Xt, yt[:, None])


def test_single_test_point_without_batch_dimension():
    inf, Xt, yt = _inf()
    with pytest.raises(ValueError, match=r"Test targets have shape \(\).*add the batch dimension"):
        inf.scores(Xt[0], yt[0])
    with pytest.raises(ValueError, match=r"Test input 0 has shape \(5,\).*add the batch dimension"):
        inf.scores(Xt[0], yt[:1])


def test_test_batch_of_the_wrong_dtype():
    inf, Xt, yt = _inf()
    with pytest.raises(ValueError, match="dtype"):
        inf.scores(Xt.float(), yt)


def test_bad_blocks_params_and_methods():
    ts, pre, ft, Xt, yt = trained(None)
    with pytest.raises(ValueError, match=r"pretrain_block names \['embed.nope'\] are not trainable"):
        MultiStageInfluence(ts, pre.params, ft.params, pretrain_block=["embed.nope"])
    with pytest.raises(ValueError, match="holds no embedding parameter"):
        MultiStageInfluence(ts, pre.params, ft.params, pretrain_block=["head.weight"])
    with pytest.raises(KeyError, match=r"pretrained parameters lack \['head.bias'\]"):
        MultiStageInfluence(ts, {n: v for n, v in pre.params.items() if n != "head.bias"}, ft.params)
    with pytest.raises(KeyError, match="finetuned parameters lack"):
        MultiStageInfluence(ts, pre.params, {})
    with pytest.raises(ValueError, match="Unknown scoring method 'fast'"):
        MultiStageInfluence(ts, pre.params, ft.params, scoring="fast").scores(Xt, yt)


def test_non_finite_test_point_raises():
    inf, Xt, yt = _inf()
    bad = Xt.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="not finite"):
        inf.scores(bad, yt)


def test_indefinite_pretraining_hessian_is_reported_not_hidden():
    """Away from a minimum H_f can be indefinite: dense reports it, CG refuses."""
    ts, _, _ = make_two_stage(None)
    # a saddle-ish point: the initial parameters scaled up (not trained)
    pre = {n: 3.0 * p for n, p in ts.pretrain.initial_params().items()}
    ft = ts.finetune.initial_params()
    ft.update(ts.embedding_for_finetune(pre))
    H = StageObjective(ts.pretrain, pre, ts.pretrain.trainable_names).hessian()
    n_neg = int((torch.linalg.eigvalsh(H) <= 0).sum())
    assert n_neg > 0  # precondition of this test
    _, Xt, yt = make_two_stage(None)
    with pytest.warns(IndefiniteHessianWarning, match=rf"pretraining Hessian H_f \+ λI is indefinite: {n_neg} "
                      r"eigenvalue.*saddle point.*train to a minimum.*pretrain_solver=Solver\(\.\.\., damping=λ\)"):
        res = MultiStageInfluence(ts, pre, ft).scores(Xt, yt)
    assert res.diagnostics["pretrain"].n_negative == n_neg
    assert torch.isfinite(res.scores).all()  # scores still come back, with the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteHessianWarning)  # enough damping: a positive definite system
        MultiStageInfluence(ts, pre, ft, pretrain_solver=Solver("dense", 1.0)).scores(Xt, yt)
    from msif_lab.solvers import NegativeCurvatureError
    with pytest.raises(NegativeCurvatureError, match="increase the damping"):
        MultiStageInfluence(ts, pre, ft, pretrain_solver=Solver("cg")).scores(Xt, yt)


def test_single_stage_warns_at_a_saddle_and_is_quiet_at_a_minimum():
    ts, pre, _, Xt, yt = trained(None)
    stage = ts.pretrain
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteHessianWarning)
        single_stage_influence(stage, pre.params, Xt[:1], torch.tensor([0]))  # a tight minimum: no warning
    saddle = {n: 3.0 * p for n, p in stage.initial_params().items()}
    with pytest.warns(IndefiniteHessianWarning, match=r"Hessian H of the training objective.*solver=Solver") as rec:
        single_stage_influence(stage, saddle, Xt[:1], torch.tensor([0]))
    assert rec[0].filename == __file__  # points at the caller, not at msif_lab


def test_empty_test_batch_is_refused():
    inf, Xt, yt = _inf()
    with pytest.raises(ValueError, match=r"test batch is empty \(0 test points\).*at least one test point"):
        inf.scores(Xt[:0], yt[:0])
    ts, pre, _, _, _ = trained(None)
    Z, yz = ts.pretrain.inputs[0], ts.pretrain.targets
    with pytest.raises(ValueError, match="test batch is empty"):
        single_stage_influence(ts.pretrain, pre.params, Z[:0], yz[:0])


def test_swapped_parameter_dicts_are_named():
    ts, pre, ft, _, _ = trained(None)
    with pytest.raises(ValueError, match=r"pretrained parameter 'head.weight' has shape \(2, 3\) but the model's has "
                                         r"shape \(3, 3\).*did you pass the finetuned parameters as the pretrained"):
        MultiStageInfluence(ts, ft.params, pre.params)


def test_parameters_of_the_wrong_shape_or_dtype():
    ts, pre, ft, Xt, yt = trained(None)
    bad = {**pre.params, "embed.net.1.weight": pre.params["embed.net.1.weight"][:, :1]}
    with pytest.raises(ValueError, match=r"pretrained parameter 'embed.net.1.weight' has shape \(3, 1\) but the "
                                         r"model's has shape \(3, 5\).*Fix: pass the `params` of the pretrain fit"):
        MultiStageInfluence(ts, bad, ft.params)
    bad = {**ft.params, "head.bias": ft.params["head.bias"].float()}
    with pytest.raises(ValueError, match=r"finetuned parameter 'head.bias' has dtype torch.float32 but the model's "
                                         r"is torch.float64"):
        MultiStageInfluence(ts, pre.params, bad)
    with pytest.raises(ValueError, match=r"given parameter 'head.weight' has shape \(2, 3\)"):
        single_stage_influence(ts.pretrain, ft.params, Xt, yt)


def test_a_failing_test_loss_says_which_stage_and_why():
    inf, Xt, yt = _inf()
    with pytest.raises(LossError, match=r"(?s)finetuning stage's loss on the test batch.*IndexError.*labels range "
                                        r"over 0\.\.5 but the model has 2 outputs") as err:
        inf.scores(Xt, torch.tensor([0, 1, 5]))
    assert isinstance(err.value.__cause__, IndexError)
    with pytest.raises(LossError, match=r"(?s)targets \(3,\) torch.float64.*integer class targets.*y.long\(\)"):
        inf.scores(Xt, yt.to(DT))
    ts, pre, _, _, _ = trained(None)
    with pytest.raises(LossError, match="single_stage_influence: the stage's loss on the test batch"):
        single_stage_influence(ts.pretrain, pre.params, Xt, torch.tensor([0, 1, 7]))


def test_a_solver_given_by_name_is_refused_with_the_fix():
    ts, pre, ft, Xt, yt = trained(None)
    with pytest.raises(TypeError, match=r"pretrain_solver must be a Solver, got 'cg'\. Fix: pretrain_solver=Solver\('cg'\)"):
        MultiStageInfluence(ts, pre.params, ft.params, pretrain_solver="cg")
    with pytest.raises(TypeError, match=r"solver must be a Solver"):
        single_stage_influence(ts.pretrain, pre.params, Xt[:1], yt[:1], solver="dense")


def test_settings_that_cannot_apply_are_refused_when_the_object_is_made():
    ts, pre, ft, _, _ = trained(0.5)
    with pytest.raises(ValueError, match="head_refit=False is the features-only ablation of case A"):
        MultiStageInfluence(ts, pre.params, ft.params, head_refit=False)
    with pytest.raises(ValueError, match=r"Unknown scoring method 'jvpp'; choose from \['auto', 'jvp', 'grad', 'factored'\]"):
        MultiStageInfluence(ts, pre.params, ft.params, scoring="jvpp")
