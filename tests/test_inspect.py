"""msif_lab.inspect (top-k, class composition, random removals, remove-and-retrain) and the one re-training
protocol behind it, msif_lab.validate.retrain_without."""
import pytest
import torch

try:
    from tiny_models import DT, M, TIGHT, rerun_test_loss, trained
except ImportError:  # tests/ made a package
    from tests.tiny_models import DT, M, TIGHT, rerun_test_loss, trained

from msif_lab.inspect import class_composition, random_removals, remove_and_retrain, top_k
from msif_lab.validate import retrain_without


def test_top_k_orders_by_influence_and_keeps_only_the_requested_sign():
    s = torch.tensor([0.5, -3.0, 2.0, 0.0, -0.2, 4.0])
    harm = top_k(s, 3, "harmful")
    assert harm.indices.tolist() == [5, 2, 0] and torch.equal(harm.scores, s[[5, 2, 0]])
    help_ = top_k(s, 4, "helpful")
    assert help_.indices.tolist() == [1, 4]  # only two scores are negative; the 0 is neither
    with pytest.raises(ValueError, match="kind must be one of"):
        top_k(s, 2, "useful")
    with pytest.raises(ValueError, match="one test point's row"):
        top_k(s[None], 2)
    with pytest.raises(ValueError, match="k=7 must be in 1..6"):
        top_k(s, 7)


def test_class_composition_counts_shares_in_the_given_class_order():
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    assert class_composition(labels, None, [0, 1, 3]).tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    assert class_composition(labels, torch.tensor([3, 4]), [3, 0]).tolist() == [1.0, 0.0]
    assert class_composition(labels, torch.tensor([], dtype=torch.long), [0, 1]).tolist() == [0.0, 0.0]


def test_random_removals_are_deterministic_distinct_and_avoid_the_excluded():
    sets = random_removals(20, 5, [0, 1], exclude=[0, 1, 2])
    assert len(sets) == 2 and not torch.equal(sets[0], sets[1])
    for s in sets:
        assert len(set(s.tolist())) == 5 and not set(s.tolist()) & {0, 1, 2}
    assert all(torch.equal(a, b) for a, b in zip(sets, random_removals(20, 5, [0, 1], exclude=[0, 1, 2])))
    with pytest.raises(ValueError, match="Cannot draw 18"):
        random_removals(20, 18, [0], exclude=[0, 1, 2])


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_retrain_without_matches_an_independent_tight_rerun(alpha, tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path))
    ts, pre, ft, Xt, yt = trained(alpha)
    removed = torch.tensor([8, 3])
    p2, f2 = retrain_without(ts, pre.params, ft.params, removed, pretrain_kwargs=TIGHT, finetune_kwargs=TIGHT)
    w = torch.ones(M, dtype=DT)
    w[[3, 8]] = 0
    with torch.no_grad():
        got = ts.finetune.losses(f2.params, (Xt,), yt)
    assert torch.allclose(got, rerun_test_loss(ts, pre, ft, Xt, yt, w), rtol=1e-8, atol=1e-10)
    assert p2.grad_norm < 1e-8 and f2.grad_norm < 1e-8
    again = retrain_without(ts, pre.params, ft.params, torch.tensor([3, 8]), pretrain_kwargs=TIGHT,
                            finetune_kwargs=TIGHT)  # the same set in another order: loaded from the cache
    assert len(list(tmp_path.glob("rerun-*.pt"))) == 1
    assert all(torch.equal(again[1].params[n], f2.params[n]) for n in f2.params)


def test_remove_and_retrain_reports_losses_before_after_and_the_new_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path))
    ts, pre, ft, Xt, yt = trained(None)
    nothing = remove_and_retrain(ts, pre.params, ft.params, [], Xt, yt, fit_kwargs=TIGHT)
    assert torch.allclose(nothing.change, torch.zeros_like(nothing.change), atol=1e-9)  # a tight optimum
    two = remove_and_retrain(ts, pre.params, ft.params, [3, 8], Xt, yt, fit_kwargs=TIGHT, baseline=nothing.after)
    assert torch.equal(two.original, nothing.after) and two.grad_norm < 1e-8
    with torch.no_grad():
        assert torch.equal(ts.finetune.losses(two.finetuned, (Xt,), yt), two.after)
    assert two.change.abs().max() > 1e-6  # removing two of M examples moves the test losses
