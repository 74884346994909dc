""""Train or load": keep the result of an expensive computation on disk, keyed by the content of what
produced it.

    model = cached({"stage": "pretrain", "x": x_pre, "epochs": 200, "seed": SEED},
                   lambda: train_model(...), name="pretrain_mnist")

The first call trains and saves (printing ``training … saving``); later calls with an equal configuration load
(``found … loading``). Equal means equal canonical JSON: dict key order does not matter, tuples equal lists,
and tensors compare **by content** (dtype, shape and a sha256 of their bytes), so changing one pixel of the
training data makes a new entry. Put everything that changes the result into the configuration, including the
device when results depend on it. Entries are written atomically, one ``<name>-<key>.pt`` file each, under
:func:`msif_lab.paths.cache_dir`; delete the folder (``make clean``) to recompute everything.

The cache holds your own results and is loaded with ``torch.load(weights_only=False)``: do not put files from
untrusted sources in it.

Taught in notebook 00 (section "Where outputs go"); used by the training notebooks and the re-run harness.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn

from .paths import atomic_path, cache_dir, check_name

T = TypeVar("T")

CACHE_VERSION = "1"
"""Bumped when the cache format changes; part of every key, so old entries are simply not found."""


def _tensor_digest(t: Tensor) -> dict:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"__tensor__": {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}}


def canonical(value: Any, where: str = "config") -> Any:
    """A JSON-ready copy of ``value`` in which tensors, modules and other objects are replaced by plain data.

    Supported: None, bool, int, float (NaN/±inf as strings), str, list/tuple, dict with str keys, tensors
    (by dtype, shape and sha256 of the bytes), ``torch.dtype``/``torch.device``, ``nn.Module`` (class, repr
    and its state dict), paths, numpy arrays and scalars. Anything else raises ``TypeError`` naming ``where``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Tensor):
        return _tensor_digest(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, nn.Module):
        return {"__module__": type(value).__qualname__, "repr": repr(value),
                "state": canonical(dict(value.state_dict()), f"{where}.state_dict()")}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: dict keys must be strings, got {bad[:3]!r}. Fix: use str(key).")
        return {k: canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    if type(value).__module__ == "numpy":  # arrays and scalars, without importing numpy here
        return canonical(torch.as_tensor(value) if hasattr(value, "shape") and value.shape else value.item(), where)
    raise TypeError(
        f"{where}: cannot key the cache on a {type(value).__name__}. Fix: describe it with plain values "
        "(numbers, strings, lists, dicts) or tensors."
    )


def config_key(key_config: dict, version: str = "") -> str:
    """sha256 (hex) of the canonical JSON of ``key_config`` plus :data:`CACHE_VERSION` and ``version``."""
    if not isinstance(key_config, dict):
        raise TypeError(f"key_config must be a dict, got {type(key_config).__name__}.")
    text = json.dumps({"cache_version": CACHE_VERSION, "version": version, "config": canonical(key_config)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(key_config: dict, *, name: str, version: str = "", root: str | os.PathLike | None = None) -> Path:
    """The file :func:`cached` uses for this configuration: ``<root>/<name>-<first 20 hex of the key>.pt``."""
    check_name(name, "cache entry name")
    return Path(root or cache_dir()) / f"{name}-{config_key(key_config, version)[:20]}.pt"


def cached(
    key_config: dict,
    compute: Callable[[], T],
    *,
    name: str,
    version: str = "",
    root: str | os.PathLike | None = None,
    refresh: bool = False,
    map_location: str | torch.device | None = None,
) -> T:
    """Return ``compute()``, from disk when an entry for an equal ``key_config`` exists.

    Args:
        key_config: everything that determines the result (see :func:`canonical` for what may appear).
        compute: no-argument function producing a ``torch.save``-able object (tensors, modules, dicts, ...).
        name: a short file-name-safe label, e.g. ``"pretrain_mnist"``; it prefixes the file and the messages.
        version: bump it when ``compute``'s code changes in a way that changes its result.
        root: cache folder (default :func:`msif_lab.paths.cache_dir`, i.e. ``$MSIF_CACHE_DIR``).
        refresh: recompute and overwrite even if an entry exists.
        map_location: passed to ``torch.load`` (e.g. ``"cpu"`` to load GPU results on a CPU machine).

    Returns:
        The computed or loaded object.
    """
    path = cache_path(key_config, name=name, version=version, root=root)
    if path.is_file() and not refresh:
        print(f"found {name} in the cache, loading {path}")
        try:
            return torch.load(path, map_location=map_location, weights_only=False)["value"]
        except Exception as err:
            raise RuntimeError(
                f"cache entry {path} cannot be loaded ({type(err).__name__}: {err}). "
                "Fix: delete it, or call cached(..., refresh=True) to recompute it."
            ) from err
    print(f"training {name} (not in the cache) ...")
    value = compute()
    with atomic_path(path) as tmp:
        torch.save({"config": canonical(key_config), "version": version, "value": value}, tmp)
    print(f"... saving {name} to {path}")
    return value
