"""Ground truth for msif_lab.scoring: every scoring method gives the same [T, N] dot products as per-example
gradients times Vᵀ, to 1e-10 in float64, on MLPs, small CNNs, frozen layers, parameter subsets, sequence layers,
shared and tied layers and unusual convolutions; unsupported models fall back loudly; nothing is left behind."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msif_lab.curvature import ParamSpace, per_example_grads
from msif_lab.models import MLPEmbedding, SmallCNN, classifier
from msif_lab.scoring import JVP_ALWAYS, JVP_MAX_TESTS, choose_method, factored_support, score_dots
from msif_lab.stages import Stage

DT = torch.float64
METHODS = ["jvp", "grad", "factored", "auto"]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference(stage, params, block, V, inputs=None, targets=None):
    inputs = stage.inputs if inputs is None else inputs
    targets = stage.targets if targets is None else targets
    return (per_example_grads(stage, params, block, inputs, targets) @ V.T).T


def _vectors(params, block, T, seed=3, dtype=DT):
    return torch.randn(T, ParamSpace(params, block).size, generator=_gen(seed), dtype=dtype)


def _assert_all_agree(stage, block=None, Ts=(1, 4), batch_sizes=(None, 7), tol=1e-10):
    block = stage.trainable_names if block is None else block
    params = stage.initial_params()
    for T in Ts:
        V = _vectors(params, block, T)
        ref = _reference(stage, params, block, V)
        assert ref.shape == (T, stage.n)
        combos = [(m, bs) for m in ("jvp", "factored") for bs in batch_sizes]
        combos += [("grad", batch_sizes[-1]), ("auto", batch_sizes[0])]
        for method, bs in combos:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = score_dots(stage, params, block, V, batch_size=bs, method=method)
            assert not [w for w in caught if "score_dots" in str(w.message)], "a supported model fell back"
            assert got.shape == ref.shape
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < tol, (method, T, bs, err)


def _mlp_stage(dtype=DT, n=23):
    torch.manual_seed(0)
    model = classifier(MLPEmbedding(12, width=6, depth=2), 4).to(dtype)
    X = torch.randn(n, 12, generator=_gen(1), dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=_gen(2))
    return Stage(model, ce, X, y, weight_decay=1e-2)


def _cnn_model(dtype=DT):
    torch.manual_seed(0)
    return classifier(SmallCNN(3, image_size=8, channels=4, width=5), 3).to(dtype)


def _cnn_stage(model=None, dtype=DT, n=11):
    model = _cnn_model(dtype) if model is None else model
    X = torch.randn(n, 3, 8, 8, generator=_gen(1), dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=_gen(2))
    return Stage(model, ce, X, y)


# ------------------------------------------------------------------------------------------ agreement, float64
def test_mlp_all_methods_agree():
    _assert_all_agree(_mlp_stage())


def test_small_cnn_all_methods_agree():
    _assert_all_agree(_cnn_stage())


def test_frozen_layer_and_parameter_subset():
    model = _cnn_model()
    model.embed.net[0].weight.requires_grad_(False)  # a frozen layer: its bias still trains
    stage = _cnn_stage(model)
    assert "embed.net.0.weight" not in stage.trainable_names
    block = ["embed.net.0.bias", "embed.net.3.weight", "embed.net.7.bias", "head.weight"]  # a subset, odd mix
    _assert_all_agree(stage, block)


def test_mlp_block_with_a_single_bias():
    stage = _mlp_stage()
    _assert_all_agree(stage, ["embed.net.3.bias"], Ts=(2,), batch_sizes=(None,))


class SeqModel(nn.Module):
    """Two inputs (tokens' features, mask); a linear layer over positions [B, L, d], called twice (shared);
    a second layer whose weight is tied to another module's; a masked mean."""

    def __init__(self, d=5, h=4, k=3):
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.mix = nn.Linear(h, h, bias=False)
        self.mix_again = nn.Linear(h, h, bias=False)
        self.mix_again.weight = self.mix.weight  # tied
        self.out = nn.Linear(h, k)

    def forward(self, x, mask):
        z = torch.tanh(self.proj(x))
        z = torch.tanh(self.proj(z[..., :1].expand(-1, -1, x.shape[-1]) * 0.5 + x) + z)  # proj used twice
        z = torch.tanh(self.mix_again(torch.tanh(self.mix(z))))
        m = mask.unsqueeze(-1).to(z.dtype)
        return self.out((z * m).sum(1) / m.sum(1))


def test_sequence_positions_shared_and_tied_layers():
    torch.manual_seed(0)
    model = SeqModel().double()
    n, L = 9, 6
    x = torch.randn(n, L, 5, generator=_gen(1), dtype=DT)
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (n, 1), generator=_gen(2))
    y = torch.randint(0, 3, (n,), generator=_gen(3))
    stage = Stage(model, ce, (x, mask), y, embedding=["proj", "mix"])
    assert factored_support(stage, stage.trainable_names)[0]
    _assert_all_agree(stage, Ts=(1, 3, 10), batch_sizes=(None, 4))


class OddConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 3, 3, dilation=2, padding="same")
        self.c = nn.Conv2d(3, 2, (3, 2), padding="valid", bias=False)
        self.head = nn.Linear(2 * 3 * 4, 2)

    def forward(self, x):
        z = torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))
        return self.head(z.flatten(1))


def test_strided_dilated_same_and_rectangular_convolutions():
    torch.manual_seed(0)
    model = OddConvs().double()
    x = torch.randn(8, 2, 9, 9, generator=_gen(1), dtype=DT)
    y = torch.randint(0, 2, (8,), generator=_gen(2))
    stage = Stage(model, ce, x, y, embedding=["a", "b", "c"])
    _assert_all_agree(stage, Ts=(1, 5), batch_sizes=(None, 3))


def test_scoring_other_examples_than_the_training_set():
    stage = _mlp_stage()
    params, block = stage.initial_params(), stage.trainable_names
    X = torch.randn(5, 12, generator=_gen(9), dtype=DT)
    y = torch.randint(0, 4, (5,), generator=_gen(8))
    V = _vectors(params, block, 3)
    ref = _reference(stage, params, block, V, (X,), y)
    for method in METHODS:
        got = score_dots(stage, params, block, V, inputs=X, targets=y, method=method, batch_size=2)
        assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max())), method


# ------------------------------------------------------------------------------------------ float32
def test_float32_cnn_agrees_to_single_precision():
    stage = _cnn_stage(dtype=torch.float32)
    params, block = stage.initial_params(), stage.trainable_names
    for T in (1, 6):
        V = _vectors(params, block, T, dtype=torch.float32)
        ref = _reference(stage, params, block, V)
        for method in METHODS:
            got = score_dots(stage, params, block, V, method=method, batch_size=5)
            assert got.dtype == torch.float32
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4, (method, T)


# ------------------------------------------------------------------------------------------ choosing and falling back
def test_auto_chooses_jvp_for_one_vector_then_factored_where_it_applies_else_jvp_then_grad():
    stage = _cnn_stage()
    assert choose_method(stage, stage.trainable_names, JVP_ALWAYS)[0] == "jvp"
    for T in (JVP_ALWAYS + 1, 50):
        method, why = choose_method(stage, stage.trainable_names, T)
        assert method == "factored" and "nn.Linear" in why
    unsupported = _small(OwnParameter())
    assert choose_method(unsupported, unsupported.trainable_names, JVP_MAX_TESTS)[0] == "jvp"
    method, why = choose_method(unsupported, unsupported.trainable_names, JVP_MAX_TESTS + 1)
    assert method == "grad" and "'scale'" in why


class UsesWeightOutsideForward(nn.Module):
    """The last layer's weight is also used directly (x @ W.T): the hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        z = torch.tanh(self.embed(x))
        return self.head(z) + 0.3 * torch.tanh(z @ self.head.weight.T)


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)) * self.scale)


class BatchCentred(nn.Module):
    """Examples interact (the batch mean is subtracted): the factored backward pass would mix them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        z = torch.tanh(self.embed(x))
        return self.head(z - z.mean(0, keepdim=True))


def _small(model):
    torch.manual_seed(0)
    model = model.double()
    x = torch.randn(10, 4, generator=_gen(1), dtype=DT)
    y = torch.randint(0, 2, (10,), generator=_gen(2))
    return Stage(model, ce, x, y)


def test_unsupported_parameter_falls_back_to_grad_with_a_reason():
    stage = _small(OwnParameter())
    block = stage.trainable_names
    ok, why = factored_support(stage, block)
    assert not ok and "'scale'" in why and "OwnParameter" in why
    params = stage.initial_params()
    V = _vectors(params, block, 4)
    with pytest.warns(UserWarning, match="'factored' method does not apply.*scale"):
        got = score_dots(stage, params, block, V, method="factored")
    assert torch.allclose(got, _reference(stage, params, block, V), rtol=1e-12, atol=1e-14)
    # a block without the unsupported parameter is fine
    assert factored_support(stage, ["embed.weight", "head.bias"])[0]


def test_weight_used_outside_its_layer_is_caught_by_the_check():
    stage = _small(UsesWeightOutsideForward())
    block = stage.trainable_names
    assert factored_support(stage, block)[0]  # the structure looks fine ...
    params = stage.initial_params()
    V = _vectors(params, block, 4)
    ref = _reference(stage, params, block, V)
    with pytest.warns(UserWarning, match="used outside its layer's forward.*using 'grad'"):  # the check sees it
        got = score_dots(stage, params, block, V, method="factored")
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
    with pytest.warns(UserWarning, match="using 'jvp'"):  # auto falls back by the number of vectors
        got = score_dots(stage, params, block, V[:2], method="auto")
    assert torch.allclose(got, ref[:2], rtol=1e-12, atol=1e-14)


def test_interacting_examples_are_caught_by_the_check():
    stage = _small(BatchCentred())
    params, block = stage.initial_params(), stage.trainable_names
    V = _vectors(params, block, 4)
    with pytest.warns(UserWarning, match="depend on each other"):
        score_dots(stage, params, block, V, method="factored")


# ------------------------------------------------------------------------------------------ no state, errors
def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in module.modules())


def test_no_hooks_or_state_left_and_results_do_not_depend_on_call_order():
    stage = _cnn_stage()
    params, block = stage.initial_params(), stage.trainable_names
    before = {n: p.clone() for n, p in params.items()}
    V = _vectors(params, block, 5)
    first = score_dots(stage, params, block, V, method="factored", batch_size=4)
    score_dots(stage, params, block, V[:1], method="jvp")
    score_dots(stage, params, ["head.weight"], _vectors(params, ["head.weight"], 2), method="factored")
    again = score_dots(stage, params, block, V, method="factored", batch_size=4)
    assert torch.equal(first, again)
    assert _hooks(stage._module) == 0 and _hooks(stage.model) == 0
    assert all(torch.equal(params[n], before[n]) and not params[n].requires_grad for n in params)
    assert not first.requires_grad


def test_hooks_are_removed_when_the_forward_pass_fails():
    stage = _mlp_stage()
    params, block = stage.initial_params(), stage.trainable_names
    V = _vectors(params, block, 3)
    four = stage.inputs[0][:4]
    broken = Stage(stage.model, lambda o, y: (_ for _ in ()).throw(RuntimeError("boom")) if len(y) == 4 else ce(o, y),
                   stage.inputs, stage.targets)
    with pytest.raises(RuntimeError, match="boom"):
        score_dots(broken, params, block, V, inputs=four, targets=stage.targets[:4], method="factored")
    assert _hooks(broken._module) == 0


def test_bad_arguments_are_explained():
    stage = _mlp_stage()
    params, block = stage.initial_params(), stage.trainable_names
    V = _vectors(params, block, 2)
    with pytest.raises(ValueError, match=r"vectors must be \[T, "):
        score_dots(stage, params, block, V[:, :-1])
    with pytest.raises(ValueError, match="Unknown scoring method"):
        score_dots(stage, params, block, V, method="fast")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        score_dots(stage, params, block, V, batch_size=0)
    assert score_dots(stage, params, block, V[:0]).shape == (0, stage.n)


def test_non_finite_scores_are_refused():
    stage = _mlp_stage()
    params, block = stage.initial_params(), stage.trainable_names
    V = _vectors(params, block, 3)
    V[1, 0] = float("inf")
    for method in ("jvp", "factored", "grad"):
        with pytest.raises(FloatingPointError, match="not finite"):
            score_dots(stage, params, block, V[1:2] if method == "jvp" else V, method=method)
