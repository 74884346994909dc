"""Where msif-lab reads data and writes outputs, and how it writes files (atomically).

Every root is resolved from the location of this package, never from the current working directory, so a
notebook finds the same folders whether it runs in JupyterLab (cwd ``notebooks/``), under nbval, or under
papermill (cwd anywhere). Environment variables override the defaults:

==================  ==================================  ============================================
variable            default                             holds
==================  ==================================  ============================================
``MSIF_DATA_DIR``   ``<repo>/data``                     datasets (``python -m msif_lab data``)
``MSIF_OUTPUT_DIR`` ``<repo>/outputs``                  one folder per profile: figures, results.json
``MSIF_CACHE_DIR``  ``<output root>/cache``             "train or load" cache (:mod:`msif_lab.cache`)
``MSIF_PROFILE``    ``interactive``                     name of the output folder ``<output root>/<profile>``
==================  ==================================  ============================================

``MSIF_PROFILE`` is set by the runner (``python -m msif_lab run --profile default|paper``); a notebook opened
by hand in JupyterLab writes to ``outputs/interactive/``.

Taught in notebook 00 (section "Where outputs go").
"""
from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGE_DIR = Path(__file__).resolve().parent
"""The installed ``msif_lab`` package folder."""

DEFAULT_PROFILE = "interactive"
"""Profile used when ``MSIF_PROFILE`` is not set: a notebook run by hand."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as a single file or folder name (letters, digits, ``._+-``), else raise."""
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"{what} {name!r} is not a plain file name. Fix: use letters, digits and '._+-' only, "
            "starting with a letter or digit, e.g. '03_fixed_embedding'."
        )
    return name


def _env_path(variable: str) -> Path | None:
    value = os.environ.get(variable, "").strip()
    return Path(value).expanduser().resolve() if value else None


def repo_root() -> Path:
    """The checkout that holds this package (the folder with ``pyproject.toml`` and ``notebooks/``)."""
    root = PACKAGE_DIR.parent
    if not (root / "pyproject.toml").is_file():
        raise RuntimeError(
            f"msif_lab is installed at {PACKAGE_DIR}, outside its source checkout, so there is no repository "
            "folder to put data and outputs in. Fix: install it editable from the checkout "
            "(`pip install -e .`, which `make setup` does), or set MSIF_DATA_DIR and MSIF_OUTPUT_DIR."
        )
    return root


def data_dir() -> Path:
    """Root of the datasets: ``$MSIF_DATA_DIR``, else ``<repo>/data``."""
    return _env_path("MSIF_DATA_DIR") or repo_root() / "data"


def output_root() -> Path:
    """Root of all outputs: ``$MSIF_OUTPUT_DIR``, else ``<repo>/outputs``."""
    return _env_path("MSIF_OUTPUT_DIR") or repo_root() / "outputs"


def cache_dir() -> Path:
    """Root of the "train or load" cache: ``$MSIF_CACHE_DIR``, else ``<output root>/cache``."""
    return _env_path("MSIF_CACHE_DIR") or output_root() / "cache"


def profile() -> str:
    """The active profile: ``$MSIF_PROFILE`` (set by the runner), else ``"interactive"``."""
    name = os.environ.get("MSIF_PROFILE", "").strip() or DEFAULT_PROFILE
    return check_name(name, "MSIF_PROFILE")


def profile_dir(name: str | None = None) -> Path:
    """Output folder of a profile (default: the active one): ``<output root>/<profile>``."""
    return output_root() / check_name(name or profile(), "profile")


def notebooks_dir() -> Path:
    """The course notebooks: ``<repo>/notebooks``."""
    return repo_root() / "notebooks"


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout: where CI (and this project's machines) keep offline data."""
    return repo_root().parent / "shared" / "data"


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path beside ``target``, then move it onto ``target``.

    The caller writes the temporary path (which does not exist yet). If the block finishes, the file is moved
    into place with ``os.replace`` (atomic on one filesystem); if it raises, the temporary file is removed and
    ``target`` is untouched, so readers never see a half-written file. Parent folders are created.

    Example::

        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(text)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
