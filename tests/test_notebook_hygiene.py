"""Every course notebook follows CONTRIBUTING.md ("How a notebook is written") and is stored clean."""
import ast
import io
import re
import tokenize

import nbformat
import papermill
import pytest

from msif_lab.run import declared_parameters, list_notebooks

NOTEBOOKS = list_notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_setup_and_tour.ipynb"


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_stored_clean_with_the_python3_kernel(notebook):
    path, nb = notebook
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    for i, cell in enumerate(_code(nb)):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: code cell {i} has outputs"
        assert "injected-parameters" not in cell.metadata.get("tags", []), f"{path.name}: an executed copy?"


def test_one_parameters_cell_of_commented_plain_literals(notebook):
    path, nb = notebook
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{path.name}: exactly one parameters code cell"
    source = tagged[0].source
    tree = ast.parse(source)
    assert tree.body, f"{path.name}: the parameters cell is empty"
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                 if tok.type == tokenize.COMMENT}
    for stmt in tree.body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else \
            getattr(stmt, "target", None) if isinstance(stmt, ast.AnnAssign) else None
        line = ast.get_source_segment(source, stmt)
        assert isinstance(target, ast.Name), f"{path.name}: `{line}` is not a single assignment NAME = value"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", target.id), f"{path.name}: parameter {target.id} is not UPPER_CASE"
        ast.literal_eval(stmt.value)  # raises for anything but a plain literal
        assert stmt.end_lineno in commented, f"{path.name}: parameter {target.id} has no # comment"
    names = [stmt.targets[0].id if isinstance(stmt, ast.Assign) else stmt.target.id for stmt in tree.body]
    seen = list(papermill.inspect_notebook(str(path)))
    assert seen == names, (
        f"{path.name}: papermill reads the parameters {seen}, the cell assigns {names}. papermill skips a line "
        "with a second '=' (e.g. in its comment): reword those comments without '=' so that "
        "`papermill --help-notebook` and the runner see every parameter.")


def test_anatomy(notebook):
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name}: no title cell"
    for part in ("What you'll do", "What you'll learn", "What you'll need"):
        assert part in first.source, f"{path.name}: the title cell lacks '{part}'"
    headings = [(i, line.strip()) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                for line in c.source.splitlines() if line.startswith("## ")]
    names = [h for _, h in headings]
    assert names[-2:] == ["## Summary", "## Exercises"], f"{path.name}: must end with ## Summary, ## Exercises"
    summary_at = headings[-2][0]
    assert all(c.cell_type == "markdown" for c in nb.cells[summary_at:]), f"{path.name}: code after the Summary"
    code = "\n".join(c.source for c in _code(nb))
    assert f'NotebookRun("{path.stem}"' in code, f'{path.name}: create NotebookRun("{path.stem}", ...) in Setup'
    assert "set_seed(" in code, f"{path.name}: seed with set_seed"
    assert "run.save()" in _code(nb)[-1].source, f"{path.name}: the last code cell must call run.save()"
    assert "assert " in code, f"{path.name}: check the numbers the prose relies on with assertions"
    assert not re.search(r"""['"]\.\./""", code), f"{path.name}: no ../ paths; use msif_lab.paths"


WITH_TEST_PARAMETERS = [p for p in NOTEBOOKS
                        if nbformat.read(p, as_version=4).metadata.get("msif_lab", {}).get("test_parameters")]


@pytest.mark.parametrize("path", WITH_TEST_PARAMETERS, ids=[p.stem for p in WITH_TEST_PARAMETERS])
def test_test_parameters_are_declared_and_not_the_defaults(path):
    test_params = nbformat.read(path, as_version=4).metadata["msif_lab"]["test_parameters"]
    declared = declared_parameters(path)
    assert set(test_params) <= set(declared), f"{path.name}: test parameters not declared: {set(test_params) - set(declared)}"
    assert any(declared[k] != v for k, v in test_params.items()), f"{path.name}: test parameters equal the defaults"
