"""Ground truth for msif_lab.curvature: objective, gradient, HVPs and mixed products against plain autograd."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

try:
    from tiny_models import DT, ce, data, make_two_stage, trained
except ImportError:  # tests/ made a package
    from tests.tiny_models import DT, ce, data, make_two_stage, trained

from msif_lab.curvature import NonFiniteError, ParamSpace, StageObjective, mixed_product, per_example_grads
from msif_lab.stages import Stage


def _reference_objective(stage, params, names, weights=None, alpha=0.0, anchor=None):
    """F(θ) written out by hand with nn.Module calls: (1/N) Σ w_i loss_i + wd/2 ||θ||² + α/2 ||θ_W − a||²."""
    space = ParamSpace(params, names)
    fixed = {n: p for n, p in params.items() if n not in names}
    model = stage._module
    w = torch.ones(stage.n, dtype=DT) if weights is None else weights

    def F(theta):
        p = {**fixed, **space.unflatten(theta)}
        out = functional_call(model, p, stage.inputs)
        val = (w * stage.loss_fn(out, stage.targets)).sum() / stage.n + 0.5 * stage.weight_decay * (theta**2).sum()
        if anchor is not None:
            val = val + 0.5 * alpha * sum(((p[k] - anchor[k]) ** 2).sum() for k in anchor)
        return val

    return F, space.flatten(params)


def _setup():
    ts, pre, ft, Xt, yt = trained(None)
    return ts.pretrain, pre.params, ts.pretrain.trainable_names


def test_param_space_round_trip_and_errors():
    stage, params, names = _setup()
    space = ParamSpace(params, names)
    assert space.size == sum(params[n].numel() for n in names)
    back = space.unflatten(space.flatten(params))
    assert all(torch.equal(back[n], params[n]) for n in names)
    mask = space.mask(["head.bias"], space.flatten(params))
    assert mask.sum() == params["head.bias"].numel() and mask[-params["head.bias"].numel():].all()
    with pytest.raises(KeyError, match="not in the given parameter dict"):
        ParamSpace(params, ["embed.nope"])
    with pytest.raises(ValueError, match="Expected a flat vector of shape"):
        space.unflatten(torch.zeros(space.size + 1, dtype=DT))


def test_value_grad_and_hessian_match_autograd():
    stage, params, names = _setup()
    w = torch.linspace(0.0, 2.0, stage.n, dtype=DT)  # non-uniform example weights, one of them 0
    obj = StageObjective(stage, params, names, sample_weights=w)
    F, theta = _reference_objective(stage, params, names, w)
    theta = theta + 0.1 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    val, g = obj.at(theta).value_and_grad()
    t = theta.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F(t), t)
    assert float(val) == pytest.approx(float(F(theta)), rel=1e-13)
    assert torch.allclose(g, g_ref, rtol=1e-11, atol=1e-14)
    H_ref = torch.autograd.functional.hessian(F, theta)
    H = obj.at(theta).hessian()
    assert torch.allclose(H, H_ref, rtol=1e-10, atol=1e-13)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert torch.allclose(obj.at(theta).hvp(v), H_ref @ v, rtol=1e-10, atol=1e-13)


def test_dense_hessian_is_built_once_per_content(monkeypatch):
    from collections import OrderedDict

    import msif_lab.curvature as curvature

    stage, params, names = _setup()
    monkeypatch.setattr(curvature, "_HESSIANS", OrderedDict())  # nothing remembered from other tests
    calls = []
    original = StageObjective.hvp_many
    monkeypatch.setattr(StageObjective, "hvp_many", lambda self, V: calls.append(1) or original(self, V))
    H1 = StageObjective(stage, params, names).hessian()
    built = len(calls)
    H1[0, 0] = 1e9  # the caller's copy: the remembered Hessian is untouched
    H2 = StageObjective(stage, {n: p.clone() for n, p in params.items()}, names).hessian()  # equal content
    assert len(calls) == built and H2[0, 0] != 1e9
    w = torch.ones(stage.n, dtype=DT)
    w[0] = 0.0
    H3 = StageObjective(stage, params, names, sample_weights=w).hessian()  # other content: built anew
    assert len(calls) == 2 * built and not torch.equal(H3, H2)


def test_hvp_matches_finite_difference_of_gradient():
    stage, params, names = _setup()
    obj = StageObjective(stage, params, names)
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(2), dtype=DT)
    h = 1e-5
    fd = (obj.value_and_grad(obj.theta + h * v)[1] - obj.value_and_grad(obj.theta - h * v)[1]) / (2 * h)
    assert torch.allclose(obj.hvp(v), fd, rtol=1e-6, atol=1e-9)


def test_proximal_term_and_regularised_subset():
    ts, pre, ft, _, _ = trained(1.0)
    stage = ts.finetune
    anchor = ts.embedding_for_finetune(pre.params)
    names = stage.trainable_names
    obj = StageObjective(stage, ft.params, names, proximal=(3.0, anchor))
    F, theta = _reference_objective(stage, ft.params, names, alpha=3.0, anchor=anchor)
    val, g = obj.value_and_grad()
    t = theta.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F(t), t)
    assert float(val) == pytest.approx(float(F(theta)), rel=1e-13)
    assert torch.allclose(g, g_ref, rtol=1e-11, atol=1e-14)
    assert torch.allclose(obj.hessian(), torch.autograd.functional.hessian(F, theta), rtol=1e-10, atol=1e-13)
    # weight decay only on the head: the Hessian differs from the fully regularised one by wd on the W block only
    partial = StageObjective(stage, ft.params, names, regularised=stage.head_names)
    full = StageObjective(stage, ft.params, names)
    diff = full.hessian() - partial.hessian()
    mask = 1 - full.space.mask(stage.head_names, theta)
    assert torch.allclose(diff, torch.diag(stage.weight_decay * mask), atol=1e-14)


@pytest.mark.parametrize("bs", [1, 7])
def test_mini_batches_sum_to_the_full_objective(bs):
    stage, params, names = _setup()
    full = StageObjective(stage, params, names)
    mb = StageObjective(stage, params, names, batch_size=bs)
    v0, g0 = full.value_and_grad()
    v1, g1 = mb.value_and_grad()
    assert float(v1) == pytest.approx(float(v0), rel=1e-13)
    assert torch.allclose(g1, g0, atol=1e-14)
    V = torch.randn(3, full.space.size, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert torch.allclose(mb.hvp_many(V), full.hvp_many(V), atol=1e-13)
    assert torch.allclose(mb.hvp(V[0]), full.hvp(V[0]), atol=1e-13)
    if bs == 7:
        assert torch.allclose(mb.hessian(chunk=5), full.hessian(), atol=1e-13)
    G0 = per_example_grads(stage, params, names, stage.inputs, stage.targets)
    G1 = per_example_grads(stage, params, names, stage.inputs, stage.targets, batch_size=bs)
    assert torch.allclose(G0, G1, atol=1e-14)


def test_hvp_on_index_is_the_minibatch_hessian():
    stage, params, names = _setup()
    obj = StageObjective(stage, params, names)
    idx = torch.tensor([3, 17, 5, 30])
    sub = Stage(stage.model, ce, stage.inputs[0][idx], stage.targets[idx], weight_decay=stage.weight_decay)
    v = torch.randn(obj.space.size, generator=torch.Generator().manual_seed(4), dtype=DT)
    assert torch.allclose(obj.hvp(v, index=idx), StageObjective(sub, params, names).hvp(v), atol=1e-13)


def test_per_example_grads_match_a_loop():
    stage, params, names = _setup()
    G = per_example_grads(stage, params, names, stage.inputs, stage.targets)
    assert G.shape == (stage.n, ParamSpace(params, names).size)
    space = ParamSpace(params, names)
    for i in [0, 11, stage.n - 1]:
        t = space.flatten(params).clone().requires_grad_(True)
        loss = stage.losses(space.unflatten(t), stage.inputs[0][i:i + 1], stage.targets[i:i + 1])[0]
        (g,) = torch.autograd.grad(loss, t)
        assert torch.allclose(G[i], g, atol=1e-14)


def test_mixed_product_is_the_off_diagonal_block():
    ts, pre, ft, _, _ = trained(None)
    stage = ts.finetune
    w, h = stage.embedding_names, stage.head_names
    joint = StageObjective(stage, ft.params, w + h)
    H = joint.hessian()
    p_w = ParamSpace(ft.params, w).size
    a = torch.randn(2, H.shape[0] - p_w, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert torch.allclose(mixed_product(stage, ft.params, w, h, a), a @ H[p_w:, :p_w], atol=1e-13)
    assert torch.allclose(mixed_product(stage, ft.params, w, h, a, batch_size=4), a @ H[p_w:, :p_w], atol=1e-13)


def test_non_finite_values_raise_nonfinite_error():
    ts, _, _ = make_two_stage(None)
    Z, yz, *_ = data()
    Zbad = Z.clone()
    Zbad[3, 1] = float("nan")
    stage = Stage(ts.pretrain.model, ce, Zbad, yz)
    params = stage.initial_params()
    obj = StageObjective(stage, params, stage.trainable_names)
    with pytest.raises(NonFiniteError, match="training objective is not finite"):
        obj.value_and_grad()
    with pytest.raises(NonFiniteError, match="Hessian-vector product is not finite"):
        obj.hvp(torch.ones(obj.space.size, dtype=DT))
    with pytest.raises(NonFiniteError, match="per-example gradient is not finite"):
        per_example_grads(stage, params, stage.trainable_names, Zbad, yz)


def test_bad_sample_weights_and_batch_size():
    stage, params, names = _setup()
    with pytest.raises(ValueError, match=r"sample_weights must have shape \(40,\)"):
        StageObjective(stage, params, names, sample_weights=torch.ones(39, dtype=DT))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        StageObjective(stage, params, names, batch_size=0)


def test_frozen_parameters_are_held_at_the_models_values():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh()).to(DT)
    emb[0].weight.requires_grad_(False)
    model = nn.Sequential(emb, nn.Linear(3, 2)).to(DT)
    Z, yz, X, yx, *_ = data()
    stage = Stage(model, ce, X, yx, embedding="0", weight_decay=1e-2)
    assert "0.0.weight" not in stage.trainable_names and "0.0.bias" in stage.embedding_names
    obj = StageObjective(stage, stage.initial_params(), stage.trainable_names)
    F, theta = _reference_objective(stage, stage.initial_params(), stage.trainable_names)
    assert float(obj.value_and_grad()[0]) == pytest.approx(float(F(theta)), rel=1e-13)
    assert not model[0][0].weight.requires_grad  # the user's flag is untouched


def test_batchnorm_eval_mode_gives_per_example_losses():
    """A BatchNorm in the embedding uses its running statistics: a loss does not depend on the rest of the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[1].running_mean.fill_(0.3)
    model[1].running_var.fill_(2.0)
    model.train()  # the user's model in training mode: the stage must still use running statistics
    Z, yz, X, yx, *_ = data()
    stage = Stage(model, ce, X, yx, embedding=["0", "1"], weight_decay=1e-2)
    params = stage.initial_params()
    alone = torch.stack([stage.losses(params, X[i:i + 1], yx[i:i + 1])[0] for i in range(5)])
    together = stage.losses(params, X[:5], yx[:5])
    assert torch.allclose(alone, together, atol=1e-14)
    ref = model.eval()(X[:5])
    model.train()
    assert torch.allclose(together, ce(ref, yx[:5]), atol=1e-14)
    G = per_example_grads(stage, params, stage.trainable_names, X, yx, batch_size=7)
    G1 = per_example_grads(stage, params, stage.trainable_names, X, yx)
    assert torch.allclose(G, G1, atol=1e-14)
    obj = StageObjective(stage, params, stage.trainable_names)
    obj.hessian()
    assert model.training and float(model[1].running_mean[0]) == 0.3 and int(model[1].num_batches_tracked) == 0
