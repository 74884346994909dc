"""Notebooks run through papermill with NON-default parameters, from another working directory, into a
temporary output folder; their results.json must reflect the injected parameters.

Which parameters: each notebook's ``metadata.msif_lab.test_parameters`` (small, fast, different from the
stored defaults; see CONTRIBUTING.md). Generic checks apply to every such notebook; ``SPECIFIC`` adds checks
that prove a parameter reached the computation.
"""
import nbformat
import papermill
import pytest
import torch

from msif_lab.metrics import pearson
from msif_lab.results import load_results
from msif_lab.run import check_parameters, list_notebooks

CASES = [(p, nbformat.read(p, as_version=4).metadata.get("msif_lab", {}).get("test_parameters"))
         for p in list_notebooks()]
CASES = [(p, params) for p, params in CASES if params]


def check_00(results, params):
    res = results["results"]
    assert res["mnist_train"] == 60_000 and res["cifar_test"] == 10_000
    g = torch.Generator().manual_seed(params["SEED"])  # the made-up scatter is drawn from SEED
    predicted = torch.randn(200, generator=g, dtype=torch.float64)
    actual = predicted + 1.6 * torch.randn(200, generator=g, dtype=torch.float64)
    assert res["synthetic_pearson"] == pytest.approx(pearson(predicted, actual), abs=1e-12)
    assert res["solve_error"]["torch.float64"] < 1e-6


SPECIFIC = {"00_setup_and_tour": check_00}


def test_notebook_00_declares_test_parameters():
    assert "00_setup_and_tour" in {p.stem for p, _ in CASES}


@pytest.mark.parametrize("path, params", CASES, ids=[p.stem for p, _ in CASES])
def test_runs_with_non_default_parameters(path, params, tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    monkeypatch.setenv("MSIF_OUTPUT_DIR", str(out))
    monkeypatch.setenv("MSIF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MSIF_PROFILE", "papermill-test")
    check_parameters(path, params)  # papermill alone would only warn about a misspelt name
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    executed = papermill.execute_notebook(str(path), str(tmp_path / path.name), parameters=params,
                                          cwd=str(workdir), progress_bar=False, kernel_name="python3")
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)

    folder = out / "papermill-test" / path.stem
    results = load_results(folder / "results.json")
    assert results["notebook"] == path.stem and results["profile"] == "papermill-test"
    for name, value in params.items():
        assert results["params"].get(name) == value, f"{name} was not recorded with the injected value"
    if "SEED" in params:
        assert results["seed"] == params["SEED"]
    assert results["results"], "the notebook recorded no results"
    for figure in results["figures"]:
        assert (folder / figure).stat().st_size > 1000
    assert list(workdir.iterdir()) == [], "the notebook wrote into its working directory"
    if path.stem in SPECIFIC:
        SPECIFIC[path.stem](results, params)
