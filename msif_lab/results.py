"""What a notebook records: seeds, figures and numbers, in ``outputs/<profile>/<notebook>/``.

A notebook's Setup cell creates one :class:`NotebookRun` named after the notebook file; its cells then call
``run.savefig(fig, "scatter")`` and ``run.record("pearson_case_a", r, paper="0.4–0.6")``; its last cell calls
``run.save()``, which writes ``results.json``::

    {"notebook": "03_fixed_embedding", "profile": "default", "params": {...}, "seed": 0,
     "torch": "2.14.1", "python": "3.11.7", "device": "cpu", "timestamp": "2026-01-01T12:00:00+00:00",
     "elapsed_s": 12.3, "results": {"pearson_case_a": 0.97}, "paper_reference": {"pearson_case_a": "0.4–0.6"},
     "figures": ["scatter.png"]}

``python -m msif_lab run`` collects these files into ``outputs/<profile>/summary.md``, showing ``results``
beside ``paper_reference`` where the notebook gave one.

Taught in notebook 00 (section "Where outputs go").
"""
from __future__ import annotations

import json
import math
import operator
import os
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .paths import atomic_path, check_name, profile, profile_dir

RESULTS_FILE = "results.json"


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator (if numpy is installed) and torch (CPU and CUDA).

    Seeding makes a CPU run repeatable; GPU kernels may still differ run to run and from the CPU in the last
    digits, which is why notebooks compare numbers with tolerances.
    """
    seed = operator.index(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_jsonable(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data: tensors/numpy become numbers or nested lists, tuples lists, paths strings,
    non-finite floats the strings ``"nan"``, ``"inf"``, ``"-inf"``; other types raise ``TypeError``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":
        return to_jsonable(torch.as_tensor(value).detach().cpu().tolist(), where)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be written to results.json. "
                    "Fix: record numbers, strings, lists, dicts or tensors.")


def device_description(device: str | torch.device) -> str:
    """``"cpu"`` or e.g. ``"cuda:0 (NVIDIA H200)"``: the device and, for a GPU, its name."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class NotebookRun:
    """The record of one notebook execution: its parameters, figures and key numbers.

    Args:
        notebook: the notebook's file name without ``.ipynb``, e.g. ``"03_fixed_embedding"`` (the runner
            finds ``results.json`` by this name).
        params: the notebook's parameters (the ``parameters`` cell's values), stored verbatim.
        seed: the seed the notebook passed to :func:`set_seed`.
        device: the device the notebook computes on; default ``params["DEVICE"]`` if present, else ``"cpu"``.

    Attributes:
        dir: ``outputs/<profile>/<notebook>/``, created on construction; figures and results.json go here.
        results, paper_reference: what :meth:`record` collected.
    """

    def __init__(self, notebook: str, params: dict | None = None, seed: int | None = None, *,
                 device: str | torch.device | None = None):
        self.notebook = check_name(notebook, "notebook name")
        self.params = to_jsonable(dict(params or {}), "params")
        self.seed = seed
        self.device = device_description(device or self.params.get("DEVICE", "cpu"))
        self.profile = profile()
        self.dir = profile_dir(self.profile) / notebook
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        self.paper_reference: dict[str, Any] = {}
        self.figures: list[str] = []
        self._start = time.perf_counter()

    def __repr__(self) -> str:
        return f"NotebookRun({self.notebook!r}, profile={self.profile!r}, dir={str(self.dir)!r})"

    def savefig(self, fig, name: str, *, dpi: int = 200) -> Path:
        """Save a matplotlib figure as ``<dir>/<name>.png`` at ``dpi`` (print resolution), atomically.

        Returns the path; the figure is listed in results.json and linked from summary.md.
        """
        name = check_name(name.removesuffix(".png"), "figure name") + ".png"
        with atomic_path(self.dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        if name not in self.figures:
            self.figures.append(name)
        return self.dir / name

    def record(self, key: str, value: Any, *, paper: Any = None) -> Any:
        """Record one result (a number, string, list, dict or tensor) under ``key``; returns ``value``.

        ``paper``: the paper's value for the same quantity (a number or a string such as ``"0.4–0.6"``);
        summary.md shows the two side by side.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"result key {key!r}: use a non-empty string such as 'pearson_case_a'.")
        self.results[key] = to_jsonable(value, key)
        if paper is not None:
            self.paper_reference[key] = to_jsonable(paper, f"paper[{key!r}]")
        return value

    def record_many(self, values: dict[str, Any] | None = None, /, **more: Any) -> None:
        """Record several results at once: ``run.record_many({"a": 1}, b=2)``."""
        for key, value in {**(values or {}), **more}.items():
            self.record(key, value)

    def as_dict(self) -> dict[str, Any]:
        """The content of results.json (see the module docstring)."""
        return {
            "notebook": self.notebook, "profile": self.profile, "params": self.params, "seed": self.seed,
            "torch": torch.__version__, "python": platform.python_version(), "device": self.device,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.perf_counter() - self._start, 2),
            "results": self.results, "paper_reference": self.paper_reference, "figures": self.figures,
        }

    def save(self) -> Path:
        """Write ``<dir>/results.json`` atomically (call it in the notebook's last code cell); returns its path."""
        path = self.dir / RESULTS_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.as_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                           encoding="utf-8")
        print(f"saved {len(self.results)} results and {len(self.figures)} figures to {self.dir}")
        return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results.json written by :meth:`NotebookRun.save`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
