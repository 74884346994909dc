"""msif_lab.stages: the two-stage description; bad input is refused with a message that names the problem."""
import pytest
import torch
from torch import nn

try:
    from tiny_models import DT, assert_unchanged, ce, ce_mean, data, make_two_stage, models, snapshot
except ImportError:  # tests/ made a package
    from tests.tiny_models import DT, assert_unchanged, ce, ce_mean, data, make_two_stage, models, snapshot

from msif_lab.models import MLPEmbedding, classifier
from msif_lab.stages import LossError, Stage, TwoStage


def test_names_of_w_u_theta():
    ts, _, _ = make_two_stage(None)
    assert ts.pretrain.embedding_names == ["embed.net.1.weight", "embed.net.1.bias"]
    assert ts.pretrain.head_names == ["head.weight", "head.bias"]
    assert ts.case == "A" and ts.finetune_trained_names == ["head.weight", "head.bias"]
    tsb, _, _ = make_two_stage(0.5)
    assert tsb.case == "B" and tsb.finetune_trained_names == tsb.finetune.embedding_names + ["head.weight", "head.bias"]


def test_embedding_matched_between_differently_named_models():
    """W is matched by order within the embedding selection, so the two models may name it differently."""
    Z, yz, X, yx, *_ = data()
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 3)).to(DT)
    ft = classifier(MLPEmbedding(5, width=3), 2).to(DT)
    ts = TwoStage(Stage(pre, ce, Z, yz, embedding="0"), Stage(ft, ce, X, yx))
    assert ts.w_pairs == [("0.weight", "embed.net.1.weight"), ("0.bias", "embed.net.1.bias")]
    params = {n: p.detach() for n, p in pre.named_parameters()}
    renamed = ts.embedding_for_finetune(params)
    assert set(renamed) == {"embed.net.1.weight", "embed.net.1.bias"}
    assert renamed["embed.net.1.weight"] is params["0.weight"]
    assert set(ts.embedding_from_finetune(renamed)) == {"0.weight", "0.bias"}


def test_parameter_name_lists_and_explicit_head():
    pre, _ = models()
    Z, yz, *_ = data()
    st = Stage(pre, ce, Z, yz, embedding=["embed.net.1.weight"], head="head")
    assert st.embedding_names == ["embed.net.1.weight"] and st.head_names == ["head.weight", "head.bias"]
    # not in either: held fixed at the model's value
    assert "embed.net.1.bias" in st._fixed


def test_stage_does_not_touch_the_users_model():
    pre, _ = models()
    pre.train()
    pre.head.bias.requires_grad_(False)
    snap = snapshot(pre)
    Z, yz, *_ = data()
    st = Stage(pre, ce, Z, yz)
    params = st.initial_params()
    params["head.weight"].add_(1.0)  # a copy: mutating it leaves the model alone
    st.losses(params, Z[:3], yz[:3])
    assert_unchanged(pre, snap)
    assert "head.bias" not in st.head_names  # frozen: not a head parameter


# ---------------------------------------------------------------------------------------------------- bad input
def test_unknown_embedding_name():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="embedding: 'encoder' is neither a parameter nor a sub-module.*embed"):
        Stage(pre, ce, Z, yz, embedding="encoder")
    with pytest.raises(ValueError, match="head: 'classifier' is neither"):
        Stage(pre, ce, Z, yz, head="classifier")
    with pytest.raises(ValueError, match="empty selection"):
        Stage(pre, ce, Z, yz, embedding=[])


def test_prefix_is_not_a_sub_module():
    """'embed.net.1.w' is a prefix of a parameter name but names nothing: refused, not silently matched."""
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="neither a parameter nor a sub-module"):
        Stage(pre, ce, Z, yz, embedding="embed.net.1.w")


def test_head_overlapping_embedding():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match=r"in both the embedding and the head"):
        Stage(pre, ce, Z, yz, embedding="embed", head=["head", "embed.net.1.bias"])


def test_fully_frozen_embedding():
    pre, _ = models()
    for p in pre.embed.parameters():
        p.requires_grad_(False)
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="has no trainable parameters"):
        Stage(pre, ce, Z, yz)


def test_mean_reduced_loss_is_refused():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match=r"one loss per example.*reduction='none'"):
        Stage(pre, ce_mean, Z, yz)


def test_empty_and_mismatched_data():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="empty training set"):
        Stage(pre, ce, Z[:0], yz[:0])
    with pytest.raises(ValueError, match="inputs have 39 rows but targets have 40"):
        Stage(pre, ce, Z[:39], yz)


def test_bad_weight_decay_and_model():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="weight_decay must be ≥ 0"):
        Stage(pre, ce, Z, yz, weight_decay=-0.1)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        Stage(lambda x: x, ce, Z, yz)


@pytest.mark.parametrize("wd", [float("nan"), float("inf")])
def test_non_finite_weight_decay(wd):
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(ValueError, match="weight_decay"):
        Stage(pre, ce, Z, yz, weight_decay=wd)


def test_embeddings_the_models_do_not_share():
    Z, yz, X, yx, *_ = data()
    torch.manual_seed(0)
    pre = classifier(MLPEmbedding(5, width=3), 3).to(DT)
    wider = classifier(MLPEmbedding(5, width=4), 2).to(DT)
    deeper = classifier(MLPEmbedding(5, width=3, depth=2), 2).to(DT)
    with pytest.raises(ValueError, match=r"shape \(3, 5\) in the pretraining model.*shape \(4, 5\)"):
        TwoStage(Stage(pre, ce, Z, yz), Stage(wider, ce, X, yx))
    with pytest.raises(ValueError, match="2 parameter tensors in the pretraining model.*but 4 in"):
        TwoStage(Stage(pre, ce, Z, yz), Stage(deeper, ce, X, yx))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_bad_alpha(alpha):
    pre, ft = models()
    Z, yz, X, yx, *_ = data()
    with pytest.raises(ValueError, match="alpha must be > 0"):
        TwoStage(Stage(pre, ce, Z, yz), Stage(ft, ce, X, yx), alpha=alpha)


def test_infinite_alpha_is_refused():
    pre, ft = models()
    Z, yz, X, yx, *_ = data()
    with pytest.raises(ValueError, match="alpha"):
        TwoStage(Stage(pre, ce, Z, yz), Stage(ft, ce, X, yx), alpha=float("inf"))


def test_batches_cover_the_data_in_order():
    ts, _, _ = make_two_stage(None)
    st = ts.pretrain
    rows = torch.cat([x[0] for _, x, _ in st.batches(7)])
    assert torch.equal(rows, st.inputs[0])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        list(st.batches(0))


def test_loss_that_fails_on_the_training_data_is_explained():
    pre, _ = models()
    Z, yz, *_ = data()
    with pytest.raises(LossError, match=r"(?s)Building the Stage of EmbeddingWithHead.*the model failed with "
                                        r"RuntimeError.*model parameters torch.float32.*use one dtype for the model "
                                        r"and its data") as err:
        Stage(pre.float(), ce, Z, yz)
    assert isinstance(err.value.__cause__, RuntimeError)
    pre, _ = models()
    with pytest.raises(LossError, match=r"(?s)integer class targets, got torch.float64"):
        Stage(pre, ce, Z, yz.to(DT))
    bad = yz.clone()
    bad[17] = 3  # one label out of the head's range 0..2, far from the first rows
    with pytest.raises(LossError, match=r"(?s)training examples \[0, 1, 17\].*labels range over 0\.\.3 but the model "
                                        r"has 3 outputs"):
        Stage(pre, ce, Z, bad)


def test_parameter_dicts_are_checked_against_both_models():
    ts, _, _ = make_two_stage(None)
    pre, ft = ts.pretrain.initial_params(), ts.finetune.initial_params()
    ts.check_params(pre, ft)
    with pytest.raises(ValueError, match="did you pass the pretrained parameters as the finetuned ones"):
        ts.check_params(pre, pre)
    with pytest.raises(KeyError, match=r"finetuned parameters lack \['head.bias'\]"):
        ts.check_params(pre, {n: p for n, p in ft.items() if n != "head.bias"})
    with pytest.raises(TypeError, match="pretrained parameter 'head.bias' is a list, not a tensor"):
        ts.check_params({**pre, "head.bias": [0.0]}, ft)
