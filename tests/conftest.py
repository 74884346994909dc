"""Shared fixtures: throwaway output folders and tiny notebooks for the runner tests."""
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_outputs(tmp_path, monkeypatch):
    """Send outputs and the cache to a temporary folder and forget any profile set by the caller."""
    monkeypatch.setenv("MSIF_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path / "outputs" / "cache"))
    monkeypatch.delenv("MSIF_PROFILE", raising=False)
    return tmp_path / "outputs"


def write_notebook(folder: Path, name: str, parameters: str, *body: str, title: str | None = None) -> Path:
    """A small course-style notebook ``folder/name.ipynb``: title, a parameters cell, then code cells."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title or name}"))
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells.append(cell)
    nb.cells += [nbformat.v4.new_code_cell(src) for src in body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def make_notebook():
    """The :func:`write_notebook` helper, as a fixture."""
    return write_notebook
