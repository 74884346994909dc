"""msif_lab.train: stages fitted to a tight optimum of exactly the objective the influence calculus differentiates."""
import pytest
import torch
from torch import nn

try:
    from tiny_models import DT, TIGHT, assert_unchanged, data, make_two_stage, polish, snapshot, sq, trained
except ImportError:  # tests/ made a package
    from tests.tiny_models import DT, TIGHT, assert_unchanged, data, make_two_stage, polish, snapshot, sq, trained

from msif_lab.curvature import StageObjective
from msif_lab.stages import Stage
from msif_lab.train import FitResult, finetune, fit_stage, pretrain, train_two_stage


def _ridge_stage(wd=0.1):
    Z, _, *_ = data()
    y = Z @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=DT) + 0.1 * torch.sin(7 * Z[:, 0])
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).to(DT)
    return Stage(model, sq, Z, y, embedding="weight", weight_decay=wd), Z, y


def test_ridge_regression_matches_the_closed_form_with_example_weights():
    stage, Z, y = _ridge_stage()
    w = torch.ones(len(y), dtype=DT)
    w[4] = 0.0  # removed
    w[9] = 3.0  # up-weighted
    fit = fit_stage(stage, stage.initial_params(), ["weight"], sample_weights=w, tol=1e-9)
    n = len(y)
    A = (Z.T * w) @ Z / n + 0.1 * torch.eye(5, dtype=DT)
    theta = torch.linalg.solve(A, (Z.T * w) @ y / n)
    assert isinstance(fit, FitResult) and fit.converged and fit.grad_norm <= 1e-9
    assert torch.allclose(fit.params["weight"][0], theta, atol=1e-8)  # ||θ − θ*|| ≤ ||grad|| / λ_min
    r = (Z @ theta - y)
    assert fit.loss == pytest.approx(float((w * 0.5 * r**2).sum() / n + 0.05 * theta @ theta), rel=1e-12)


def test_logistic_fit_is_tight_and_reports_it():
    ts, _, _ = make_two_stage(None)
    fit = pretrain(ts, tol=1e-8, max_iter=2000)
    assert fit.grad_norm <= 1e-7 and fit.iterations > 0
    obj = StageObjective(ts.pretrain, fit.params, ts.pretrain.trainable_names)
    assert float(obj.value_and_grad()[1].norm()) == pytest.approx(fit.grad_norm, rel=1e-6)
    assert f"{fit.grad_norm:.2e}" in fit.summary()
    loose = pretrain(ts, tol=1e-14, max_iter=3)
    assert not loose.converged and "NOT converged" in loose.summary()


def test_converged_flag_agrees_with_the_optimisers_stopping_rule():
    ts, _, _ = make_two_stage(None)
    fit = pretrain(ts, tol=1e-8, max_iter=5000)
    assert fit.iterations < 5000  # L-BFGS stopped by itself ...
    assert fit.converged, fit.summary()  # ... so the fit should say it converged


def test_newton_polish_reaches_the_rounding_floor():
    ts, _, _ = make_two_stage(None)
    fit = pretrain(ts, **TIGHT)
    assert fit.grad_norm < 1e-13, fit.summary()


def test_newton_steps_finish_from_the_looser_lbfgs_stop_and_lbfgs_resumes_where_they_cannot():
    """L-BFGS hands over to Newton steps at ``newton_from`` (fewer iterations than crawling to ``tol``); where the
    Newton steps fail (here at the random start, whose Hessian is indefinite) L-BFGS resumes to ``tol``. Every
    route reaches the optimum of plain L-BFGS polished by the tests' own Newton steps."""
    ts, _, _ = make_two_stage(None)
    stage, names, init = ts.pretrain, ts.pretrain.trainable_names, ts.pretrain.initial_params()
    ref = polish(stage, fit_stage(stage, init, names, tol=1e-10, max_iter=5000).params, names)
    assert torch.linalg.eigvalsh(StageObjective(stage, init, names).hessian())[0] < 0
    handover = fit_stage(stage, init, names, tol=1e-11, newton_steps=5)  # newton_from 1e-4
    at_tol = fit_stage(stage, init, names, tol=1e-11, newton_steps=5, newton_from=1e-11)  # no early hand-over
    fallback = fit_stage(stage, init, names, tol=1e-11, newton_steps=5, newton_from=10.0)  # Newton tried at the start
    for fit in (handover, at_tol, fallback):
        assert fit.converged, fit.summary()
        assert all(torch.allclose(fit.params[n], ref.params[n], rtol=0, atol=1e-10) for n in names)
    assert handover.iterations < at_tol.iterations


def test_lbfgs_resumed_at_a_tighter_tolerance_continues_the_same_run():
    """Where the Newton steps fail after the looser stop (e.g. near a saddle), L-BFGS goes on with its curvature
    history: stopping at 1e-3 and resuming to 1e-9 gives exactly the iterates of one uninterrupted run."""
    from msif_lab.train import _LBFGS

    ts, _, _ = make_two_stage(None)
    obj = StageObjective(ts.pretrain, ts.pretrain.initial_params(), ts.pretrain.trainable_names)
    x_one, n_one = _LBFGS(obj, obj.theta, 2000).run(1e-9)
    resumed = _LBFGS(obj, obj.theta, 2000)
    _, n_first = resumed.run(1e-3)
    x_two, n_second = resumed.run(1e-9)
    assert 0 < n_first < n_one and n_first + n_second == n_one
    assert torch.equal(x_one, x_two)


def test_case_a_finetuning_keeps_w_fixed_and_case_b_moves_it():
    ts, _, _ = make_two_stage(None)
    pre = pretrain(ts, tol=1e-8, max_iter=2000)
    w_star = ts.embedding_for_finetune(pre.params)
    ftA = finetune(ts, pre.params, tol=1e-8, max_iter=2000)
    assert all(torch.equal(ftA.params[n], w_star[n]) for n in w_star)
    assert ftA.grad_norm < 1e-7 and set(ftA.params) == set(ts.finetune.trainable_names)

    tsB, _, _ = make_two_stage(0.3)
    ftB = finetune(tsB, pre.params, tol=1e-8, max_iter=2000)
    assert ftB.grad_norm < 1e-7
    moved = sum(float((ftB.params[n] - w_star[n]).norm()) for n in w_star)
    assert moved > 1e-3
    # the result is a stationary point of G + (α/2)||W − W*||², checked independently of fit_stage
    obj = StageObjective(tsB.finetune, ftB.params, tsB.finetune_trained_names, proximal=(0.3, w_star))
    assert float(obj.value_and_grad()[1].norm()) < 1e-7
    # a huge α pins W to W*
    tsH, _, _ = make_two_stage(1e6)
    ftH = finetune(tsH, pre.params, tol=1e-8, max_iter=2000)
    assert sum(float((ftH.params[n] - w_star[n]).norm()) for n in w_star) < 1e-5 + 1e-6


def test_warm_started_rerun_stays_at_the_optimum():
    """Re-running from the optimum with nothing removed changes nothing (the validation noise floor)."""
    ts, _, _ = make_two_stage(1.0)
    pre, ft = train_two_stage(ts, pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT)
    pre2, ft2 = train_two_stage(ts, pretrain_init=pre.params, finetune_init=ft.params,
                                pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT)
    for a, b in [(pre, pre2), (ft, ft2)]:
        assert max(float((a.params[n] - b.params[n]).abs().max()) for n in a.params) < 1e-7


def test_training_leaves_the_users_model_alone_and_is_deterministic():
    ts, _, _ = make_two_stage(0.5)
    snaps = snapshot(ts.pretrain.model), snapshot(ts.finetune.model)
    kw = dict(tol=1e-8, max_iter=300, adam_epochs=2, batch_size=16)
    a = train_two_stage(ts, pretrain_kwargs=kw, finetune_kwargs=kw)
    b = train_two_stage(ts, pretrain_kwargs=kw, finetune_kwargs=kw)
    for x, y in zip(a, b):
        assert all(torch.equal(x.params[n], y.params[n]) for n in x.params)
    assert_unchanged(ts.pretrain.model, snaps[0])
    assert_unchanged(ts.finetune.model, snaps[1])


def test_batch_size_is_memory_not_stochasticity():
    ts, _, _ = make_two_stage(None)
    full = pretrain(ts, tol=1e-8, max_iter=2000)
    mb = pretrain(ts, tol=1e-8, max_iter=2000, batch_size=7)
    assert max(float((full.params[n] - mb.params[n]).abs().max()) for n in full.params) < 1e-7


@pytest.mark.parametrize("removed", [[2, 7], list(range(0, 40, 3))])
def test_lbfgs_whitened_by_a_reference_hessian_reaches_the_same_optimum_without_new_hessians(monkeypatch, removed):
    """A re-run warm-started from the original optimum after removing 2 examples (a small change) or 14 (a large
    one, where the optimum moves far along soft directions) reaches the optimum of a re-run with Newton steps,
    without forming any Hessian: L-BFGS runs in coordinates whitened by the original optimum's Hessian."""
    from msif_lab.train import hessian_factor

    ts, pre, _, _, _ = trained(None)
    stage, names = ts.pretrain, ts.pretrain.trainable_names
    w = torch.ones(stage.n, dtype=DT)
    w[removed] = 0
    reference = polish(stage, fit_stage(stage, pre.params, names, sample_weights=w, tol=1e-11, max_iter=5000,
                                        newton_steps=10).params, names, sample_weights=w)
    L = hessian_factor(stage, pre.params, names)
    calls = []
    monkeypatch.setattr(StageObjective, "hessian", lambda self, chunk=256: calls.append(1))
    whitened = fit_stage(stage, pre.params, names, sample_weights=w, tol=1e-11, newton_steps=10, hessian_factor=L)
    assert calls == [] and whitened.converged and whitened.grad_norm <= 1e-11, whitened.summary()
    assert all(torch.allclose(whitened.params[n], reference.params[n], rtol=0, atol=1e-9) for n in names)
    assert 1 < whitened.iterations < 100  # a few dozen gradients


def test_wrong_parameter_dicts_are_refused_before_fitting():
    ts, _, _ = make_two_stage(None)
    pre = pretrain(ts, tol=1e-8, max_iter=2000)
    w_name = ts.w_pairs[0][0]
    with pytest.raises(KeyError, match="pretrain"):
        finetune(ts, {}, tol=1e-8)
    bad = {**pre.params, w_name: pre.params[w_name][..., :-1]}
    with pytest.raises(ValueError, match=f"pretrained parameter '{w_name}' has shape.*Fix: pass pretrain"):
        finetune(ts, bad, tol=1e-8)
    with pytest.raises(ValueError, match="Fix: pass the pretraining model's parameters as `init`"):
        pretrain(ts, bad, tol=1e-8)
