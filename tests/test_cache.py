"""The "train or load" cache: content keys, atomic entries, the printed messages."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from msif_lab import cache


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_train_then_load(cache_in_tmp, capsys):
    calls = []

    def train():
        calls.append(1)
        return {"w": torch.arange(3.0), "loss": 0.5}
    config = {"x": torch.ones(4), "epochs": 10}
    first = cache.cached(config, train, name="toy")
    out = capsys.readouterr().out
    assert "training toy" in out and "saving toy" in out
    second = cache.cached({"epochs": 10, "x": torch.ones(4)}, train, name="toy")  # key order is irrelevant
    assert "found toy in the cache, loading" in capsys.readouterr().out
    assert calls == [1] and torch.equal(first["w"], second["w"]) and second["loss"] == 0.5
    assert [p.name for p in cache_in_tmp.iterdir()] == [cache.cache_path(config, name="toy").name]
    cache.cached(config, train, name="toy", refresh=True)
    assert calls == [1, 1]


def test_tensors_hash_by_content_dtype_and_shape():
    base = {"x": torch.zeros(2, 3)}
    assert cache.config_key(base) == cache.config_key({"x": torch.zeros(2, 3)})
    assert cache.config_key(base) == cache.config_key({"x": torch.zeros(2, 3, requires_grad=True)})
    assert cache.config_key(base) == cache.config_key({"x": torch.zeros(3, 2).t()})  # layout does not matter
    changed = torch.zeros(2, 3)
    changed[1, 2] = 1e-9
    for other in (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.float64), changed):
        assert cache.config_key(base) != cache.config_key({"x": other})
    assert cache.config_key({"x": np.zeros((2, 3), dtype=np.float32)}) == cache.config_key(base)


def test_keys_distinguish_what_json_would_merge():
    key = cache.config_key
    assert key({"a": 1}) != key({"a": 1.0}) != key({"a": True})
    assert key({"a": (1, 2)}) == key({"a": [1, 2]})
    assert key({"a": 1}) != key({"a": 1}, version="2")  # bump the version when compute() changes
    assert key({"a": float("nan")}) == key({"a": float("nan")})


def test_modules_key_on_architecture_and_weights():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    assert cache.config_key({"m": a}) != cache.config_key({"m": b})
    b.load_state_dict(a.state_dict())
    assert cache.config_key({"m": a}) == cache.config_key({"m": b})
    assert cache.config_key({"m": nn.Sequential(a, nn.Tanh())}) != cache.config_key({"m": nn.Sequential(a, nn.ReLU())})


@pytest.mark.parametrize("config, message", [
    ({"f": lambda: 0}, r"config\['f'\]: cannot key the cache on a function"),
    ({"s": {1, 2}}, "cannot key the cache on a set"),
    ({1: "a"}, "dict keys must be strings"),
])
def test_unsupported_config_values_are_named(config, message):
    with pytest.raises(TypeError, match=message):
        cache.config_key(config)


def test_bad_name_and_failed_compute_leave_nothing(cache_in_tmp):
    with pytest.raises(ValueError, match="cache entry name"):
        cache.cached({}, lambda: 1, name="../escape")

    def fails():
        raise RuntimeError("diverged")
    with pytest.raises(RuntimeError, match="diverged"):
        cache.cached({"a": 1}, fails, name="toy")
    assert not cache_in_tmp.exists() or os.listdir(cache_in_tmp) == []


def test_interrupted_save_leaves_no_entry(cache_in_tmp, monkeypatch):
    def torn_save(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"half an entry")
        raise KeyboardInterrupt
    monkeypatch.setattr(cache.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        cache.cached({"a": 1}, lambda: torch.ones(2), name="toy")
    assert os.listdir(cache_in_tmp) == []


def test_unreadable_entry_says_how_to_fix(cache_in_tmp):
    path = cache.cache_path({"a": 1}, name="toy")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="refresh=True"):
        cache.cached({"a": 1}, lambda: 1, name="toy")
    assert cache.cached({"a": 1}, lambda: 2, name="toy", refresh=True) == 2
    assert cache.cached({"a": 1}, lambda: 3, name="toy") == 2


def test_modules_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    loaded = cache.cached({"k": 1}, lambda: model, name="model", root=tmp_path)
    again = cache.cached({"k": 1}, lambda: None, name="model", root=tmp_path)
    assert loaded is model and isinstance(again, nn.Sequential)
    assert torch.equal(again[0].weight, model[0].weight)
