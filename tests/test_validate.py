"""msif_lab.validate: which removals to check, and the re-run harness (predicted vs actual, noise floor, cache)."""
import pytest
import torch

try:
    from tiny_models import TIGHT, ce, trained, validation_problem
except ImportError:  # tests/ made a package
    from tests.tiny_models import TIGHT, ce, trained, validation_problem

from msif_lab.influence import MultiStageInfluence
from msif_lab.stages import Stage, TwoStage
from msif_lab.validate import Validation, choose_removals, validate_removals


# ------------------------------------------------------------------------------------------------ choose_removals
def test_choose_removals_covers_both_signs():
    s = torch.tensor([0.5, -3.0, 2.0, 0.1, -0.2, 4.0, -1.0, 0.0])
    chosen = choose_removals(s, 4)
    assert set(chosen.tolist()) == {5, 2, 1, 6}  # two most harmful, two most helpful
    assert chosen.dtype == torch.long
    odd = choose_removals(s, 3)
    assert set(odd.tolist()) == {5, 2, 1}  # the extra one goes to the harmful side


def test_choose_removals_sums_over_test_points_and_adds_random_ones_deterministically():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 30, generator=g)
    total = S.sum(0)
    chosen = choose_removals(S, 6, n_random=5, seed=1)
    assert len(chosen) == 11 and len(set(chosen.tolist())) == 11
    top = set(chosen[:6].tolist())
    assert top == set(torch.argsort(total)[-3:].tolist()) | set(torch.argsort(total)[:3].tolist())
    assert torch.equal(chosen, choose_removals(S, 6, n_random=5, seed=1))  # deterministic
    other = choose_removals(S, 6, n_random=5, seed=2)
    assert torch.equal(other[:6], chosen[:6]) and not torch.equal(other[6:], chosen[6:])


def test_choose_removals_with_few_examples_and_too_many_asked():
    s = torch.tensor([1.0, -2.0, 3.0])
    assert sorted(choose_removals(s, 3).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"Asked for 3 \+ 1 removals but there are only 3"):
        choose_removals(s, 3, n_random=1)


def test_choose_removals_with_one_signed_scores_still_returns_unique_indices():
    s = torch.arange(1.0, 11.0)  # all harmful
    chosen = choose_removals(s, 4)
    assert len(set(chosen.tolist())) == 4
    assert {9, 8} <= set(chosen.tolist())  # the most harmful are always in


# ------------------------------------------------------------------------------------------------ validate_removals
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path))
    return tmp_path


def _validation_inputs(alpha, problem=trained):
    ts, pre, ft, Xt, yt = problem(alpha)
    res = MultiStageInfluence(ts, pre.params, ft.params).scores(Xt, yt)
    removed = choose_removals(res.scores, 6, n_random=2)
    return ts, pre, ft, Xt, yt, res, removed


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_validate_removals_agrees_with_prediction_and_has_no_noise(alpha, cache_dir):
    ts, pre, ft, Xt, yt, res, removed = _validation_inputs(alpha, validation_problem)
    v = validate_removals(ts, pre.params, ft.params, Xt, yt, res.predicted_change, removed,
                          pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT, progress=False)
    assert isinstance(v, Validation)
    assert v.actual.shape == v.predicted.shape == (3, 8) and torch.equal(v.removed, removed)
    assert torch.equal(v.predicted, res.predicted_change[:, removed])
    assert v.metrics["pearson"] > 0.95 and v.metrics["spearman"] > 0.9, v.summary()
    assert v.metrics["n_pairs"] == 24
    assert v.metrics["noise_floor_max"] < 1e-10 and v.rerun_grad_norm < 1e-9, v.summary()
    assert v.metrics["fraction_above_noise"] > 0.9
    assert "Pearson" in v.summary()
    # the sign convention end to end: removing the most harmful example lowers the summed test loss
    harmful = int(res.scores.sum(0).argmax())
    k = removed.tolist().index(harmful)
    assert float(v.actual[:, k].sum()) < 0 and float(v.predicted[:, k].sum()) < 0
    # re-runs were cached under MSIF_CACHE_DIR; a second call reads them back and agrees exactly
    assert len(list(cache_dir.glob("rerun-*.pt"))) == len(removed) + 1
    again = validate_removals(ts, pre.params, ft.params, Xt, yt, res.predicted_change, removed,
                              pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT, progress=False)
    assert torch.equal(again.actual, v.actual) and torch.equal(again.noise_floor, v.noise_floor)


def test_validate_removals_without_cache_writes_nothing(cache_dir):
    ts, pre, ft, Xt, yt, res, removed = _validation_inputs(None)
    v = validate_removals(ts, pre.params, ft.params, Xt, yt, res.predicted_change, removed[:2],
                          pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT, cache=False, progress=False)
    assert not list(cache_dir.iterdir())
    assert v.actual.shape == (3, 2)


def test_validate_removals_rejects_bad_predictions(cache_dir):
    ts, pre, ft, Xt, yt, res, removed = _validation_inputs(None)
    with pytest.raises(ValueError, match=r"predicted_change must be \[T, m=40\], got \(3, 39\)"):
        validate_removals(ts, pre.params, ft.params, Xt, yt, res.predicted_change[:, :39], removed, progress=False)


def test_rerun_cache_is_keyed_on_the_loss_function(cache_dir):
    """Two problems that differ only in their loss must not share cached re-runs."""
    ts, pre, ft, Xt, yt, res, _ = _validation_inputs(None)
    removed = torch.tensor([0])
    kw = dict(pretrain_kwargs=dict(tol=1e-7, max_iter=100), finetune_kwargs=dict(tol=1e-7, max_iter=100),
              progress=False)
    a = validate_removals(ts, pre.params, ft.params, Xt, yt, res.predicted_change, removed, **kw)

    def ce2(out, y):
        return 2.0 * ce(out, y)

    P, F = ts.pretrain, ts.finetune
    ts2 = TwoStage(Stage(P.model, ce2, P.inputs, P.targets, weight_decay=P.weight_decay),
                   Stage(F.model, ce2, F.inputs, F.targets, weight_decay=F.weight_decay))
    b = validate_removals(ts2, pre.params, ft.params, Xt, yt, res.predicted_change, removed, **kw)
    fresh = validate_removals(ts2, pre.params, ft.params, Xt, yt, res.predicted_change, removed, cache=False, **kw)
    assert torch.allclose(b.actual, fresh.actual, rtol=1e-6, atol=1e-9), "stale cache entry of another problem"
    assert not torch.allclose(a.actual, fresh.actual, rtol=1e-3)  # precondition: the problems really differ
