"""Pearson, Spearman (average ranks for ties) and sign agreement, against hand-computed values."""
import math

import pytest
import torch

from msif_lab.metrics import average_ranks, pearson, sign_agreement, spearman


def test_pearson_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # invariant to shift and positive scale, computed in float64 even for float32 input
    a, b = torch.randn(50, generator=torch.Generator().manual_seed(0)), torch.randn(50)
    assert pearson(a.float(), b.float()) == pytest.approx(pearson(3 * a.double() + 7, b.double()), abs=1e-6)


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0])).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]


def test_spearman_with_and_without_ties():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -torch.exp(x)) == pytest.approx(-1.0)
    # ties: ranks of y are [1.5, 1.5, 3, 4, 5]; Pearson of the ranks, by hand
    y = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    rx, ry = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([1.5, 1.5, 3, 4, 5])
    expected = float(((rx - rx.mean()) @ (ry - ry.mean())) / ((rx - rx.mean()).norm() * (ry - ry.mean()).norm()))
    assert spearman(x, y) == pytest.approx(expected) and expected < 1


def test_sign_agreement():
    assert sign_agreement([1.0, -2.0, 3.0, 0.0], [0.5, 1.0, 2.0, 0.0]) == pytest.approx(0.75)
    assert sign_agreement([1.0], [-1.0]) == 0.0


def test_constant_input_gives_nan():
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))


@pytest.mark.parametrize("a, b, message", [
    ([1.0, 2.0], [1.0, 2.0, 3.0], "equal length"),
    ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ([1.0], [2.0], "at least 2"),
    ([1.0, float("nan")], [1.0, 2.0], "NaN"),
])
def test_bad_inputs_are_named(a, b, message):
    with pytest.raises(ValueError, match=message):
        pearson(a, b)
