"""The papermill runner: parameter checks, a tiny course run, failures, and what nbval collects."""
import subprocess
import sys

import pytest

from msif_lab import run as runner
from msif_lab.results import load_results

from conftest import REPO

SETUP = 'from msif_lab import NotebookRun\nrun = NotebookRun("{name}", params=dict(N=N), seed=0)'
PARAMS = "N = 3  # a count\nLABEL = 'x'  # a name"


@pytest.fixture
def course(tmp_path, make_notebook):
    """A throwaway course of two notebooks in tmp_path/notebooks."""
    folder = tmp_path / "notebooks"
    make_notebook(folder, "01_first", PARAMS, SETUP.format(name="01_first"),
                  "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([0, N])\n"
                  "run.savefig(fig, 'line')",
                  "run.record('double', 2 * N, paper=6)\nrun.record('label', LABEL)\nrun.save()",
                  title="First lesson")
    make_notebook(folder, "02_second", PARAMS, SETUP.format(name="02_second"),
                  "run.record_many({'triple': 3 * N})\nrun.save()")
    return folder


def test_runner_executes_in_order_and_writes_a_summary(course, isolated_outputs, capsys):
    summary = runner.run_course("default", folder=course, progress=False)
    assert summary == isolated_outputs / "default" / "summary.md"
    out = capsys.readouterr().out
    assert out.index("01_first") < out.index("02_second")
    for stem in ("01_first", "02_second"):
        assert (isolated_outputs / "default" / "notebooks" / f"{stem}.ipynb").is_file()
    first = load_results(isolated_outputs / "default" / "01_first" / "results.json")
    assert first["profile"] == "default" and first["results"] == {"double": 6, "label": "x"}
    assert first["paper_reference"] == {"double": 6} and first["figures"] == ["line.png"]
    assert (isolated_outputs / "default" / "01_first" / "line.png").stat().st_size > 1000
    text = summary.read_text()
    assert "01_first: First lesson" in text and "| double | 6 | 6 |" in text and "| triple | 9 |" in text
    assert "[line](01_first/line.png)" in text and "| quantity | this run | paper |" in text


def test_parameters_from_the_command_line_go_to_the_custom_profile(course, isolated_outputs, capsys):
    assert runner.main(["run", "--notebooks", str(course), "--only", "01", "-p", "N", "5", "-p", "LABEL", "7",
                        "--no-progress"]) == 0
    results = load_results(isolated_outputs / "custom" / "01_first" / "results.json")
    assert results["params"] == {"N": 5} and results["results"] == {"double": 10, "label": "7"}  # "7" stays text
    assert not (isolated_outputs / "custom" / "02_second").exists()
    assert not (isolated_outputs / "default").exists()


@pytest.mark.parametrize("argv, message", [
    (["-p", "N_TRAIN", "200"], "01_first.ipynb: unknown parameter(s) N_TRAIN. The notebook's parameters cell "
                               "declares: N, LABEL"),
    (["-p", "N", "lots"], "parameter N expects a int like its default 3, got 'lots'"),
    (["--only", "07"], "--only 07: no such notebook"),
])
def test_bad_requests_fail_before_anything_runs(course, isolated_outputs, capsys, argv, message):
    assert runner.main(["run", "--notebooks", str(course), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not isolated_outputs.exists()  # no kernel was started, nothing written


def test_unknown_parameter_in_the_python_wrapper(course, isolated_outputs):
    with pytest.raises(runner.UnknownParameterError, match="N_TRAIN"):
        runner.run_notebook(course / "01_first.ipynb", {"N_TRAIN": 200})
    runner.check_parameters(course / "01_first.ipynb", {"N": 4, "LABEL": "y"})  # fine


def test_a_failing_notebook_stops_the_run_with_its_name(course, isolated_outputs, capsys, make_notebook):
    make_notebook(course, "02_second", PARAMS, SETUP.format(name="02_second"),
                  "raise ValueError(f'deliberate failure, N={N}')")
    make_notebook(course, "03_third", PARAMS, SETUP.format(name="03_third"), "run.save()")
    assert runner.main(["run", "--notebooks", str(course), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "02_second.ipynb failed at In [3] (the cell starting `raise ValueError(f'deliberate" in err
    assert "ValueError: deliberate failure, N=3" in err
    assert not (isolated_outputs / "default" / "notebooks" / "03_third.ipynb").exists()  # the run stopped
    summary = (isolated_outputs / "default" / "summary.md").read_text()
    assert "| [01_first](#01_first) | First lesson | ok |" in summary
    assert "FAILED" in summary and "deliberate failure" in summary


def test_a_notebook_without_results_json_is_reported(tmp_path, isolated_outputs, make_notebook):
    path = make_notebook(tmp_path / "nb", "01_silent", PARAMS, "x = N + 1")
    with pytest.raises(runner.NotebookFailed, match=r"wrote no .*results.json.*NotebookRun\('01_silent'"):
        runner.run_notebook(path, progress=False)


def test_paper_profile_sets_the_device_only_where_declared(tmp_path, make_notebook):
    # numbers the paper profile does not list: only the DEVICE rule applies
    with_device = make_notebook(tmp_path, "97_gpu", "DEVICE = 'cpu'  # where to compute")
    without = make_notebook(tmp_path, "98_cpu", "N = 1  # a count")
    assert runner.profile_parameters("paper", with_device) == {"DEVICE": runner.CUDA_WHEN_AVAILABLE}
    assert runner.profile_parameters("paper", without) == {}
    assert runner.profile_parameters("default", with_device) == {}
    # a listed notebook gets its paper sizes, and DEVICE on top when it declares one
    listed = next(iter(runner.PROFILES["paper"]))
    sized = make_notebook(tmp_path, f"{listed}_sized", "DEVICE = 'cpu'  # where to compute")
    assert runner.profile_parameters("paper", sized) == {
        **runner.PROFILES["paper"][listed],
        "DEVICE": runner.PROFILES["paper"][listed].get("DEVICE", runner.CUDA_WHEN_AVAILABLE),
    }
    resolved = runner._resolve_device({"DEVICE": runner.CUDA_WHEN_AVAILABLE})
    assert resolved["DEVICE"] in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="unknown profile"):
        runner.profile_parameters("fast", without)


@pytest.mark.parametrize("profile", list(runner.PROFILES))
def test_every_profile_matches_the_real_notebooks(profile):
    notebooks = runner.list_notebooks()
    assert notebooks, "no notebooks/NN_*.ipynb found"
    for path in notebooks:
        runner.check_parameters(path, runner.profile_parameters(profile, path))


def test_select_and_list(course, capsys):
    notebooks = runner.list_notebooks(course)
    assert [p.stem for p in notebooks] == ["01_first", "02_second"]
    assert runner.select_notebooks(notebooks, ["02"]) == notebooks[1:]
    assert runner.select_notebooks(notebooks, ["02_second.ipynb", "01_first"]) == notebooks
    assert runner.main(["run", "--notebooks", str(course), "--list"]) == 0
    out = capsys.readouterr().out
    assert "01_first: First lesson" in out and "N = 3" in out and "LABEL = 'x'" in out


def test_parse_value():
    assert runner.parse_value("200") == 200 and runner.parse_value("0.5") == 0.5
    assert runner.parse_value("[0, 1]") == [0, 1] and runner.parse_value("True") is True
    assert runner.parse_value("cuda") == "cuda" and runner.parse_value("7", default="x") == "7"
    assert runner.parse_value("1,7", default=[4, 9]) == [1, 7]  # a tuple literal becomes the list notebooks take


def test_nbval_collects_exactly_the_course_notebooks():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--nbval-lax", "--nbval-current-env", "notebooks"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if ".ipynb::" in line}
    expected = {f"notebooks/{p.name}" for p in runner.list_notebooks()}
    assert collected == expected and expected


def test_parameters_papermill_cannot_parse_are_still_declared(tmp_path, make_notebook):
    path = make_notebook(tmp_path, "01_eq", "N = 3  # n = 3 things\nM = [1, 2]  # a list")
    assert runner.declared_parameters(path) == {"N": 3, "M": [1, 2]}
    runner.check_parameters(path, {"N": 4})


def test_a_failed_rerun_keeps_the_last_successful_outputs(course, isolated_outputs, make_notebook):
    runner.run_course("default", folder=course, progress=False)
    out = isolated_outputs / "default"
    good_notebook = (out / "notebooks" / "01_first.ipynb").read_text()
    make_notebook(course, "01_first", PARAMS, SETUP.format(name="01_first"),
                  "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nrun.savefig(fig, 'line')",
                  "raise RuntimeError('broken on purpose')", title="First lesson")
    with pytest.raises(runner.NotebookFailed, match="(?s)broken on purpose.*01_first.failed.ipynb"):
        runner.run_course("default", only=["01"], folder=course, progress=False)
    assert load_results(out / "01_first" / "results.json")["results"]["double"] == 6  # the good run's numbers
    assert (out / "notebooks" / "01_first.ipynb").read_text() == good_notebook
    assert "broken on purpose" in (out / "notebooks" / "01_first.failed.ipynb").read_text()
    assert (out / "01_first.failed" / "line.png").is_file()  # the failed attempt, kept aside for inspection
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
    summary = (out / "summary.md").read_text()
    assert "| [01_first](#01_first) | First lesson | FAILED |" in summary
    assert "Executed notebook: [notebooks/01_first.failed.ipynb](notebooks/01_first.failed.ipynb)" in summary
    assert "| [02_second](#02_second) | 02_second | ok (earlier run, " in summary and "| triple | 9 |" in summary
    assert "s in the notebook |" in summary  # the earlier run's own time

    make_notebook(course, "01_first", PARAMS, SETUP.format(name="01_first"), "run.record('double', 2 * N)\nrun.save()")
    runner.run_course("default", only=["01"], folder=course, progress=False)
    assert not (out / "01_first.failed").exists() and not (out / "notebooks" / "01_first.failed.ipynb").exists()
    assert not (out / "01_first" / "line.png").exists()  # this run's outputs only, no stale figure


def test_running_some_notebooks_keeps_the_others_in_the_summary(course, isolated_outputs):
    assert runner.main(["run", "--notebooks", str(course), "-p", "N", "4", "--no-progress"]) == 0
    assert runner.main(["run", "--notebooks", str(course), "--only", "02", "-p", "N", "5", "--no-progress"]) == 0
    summary = (isolated_outputs / "custom" / "summary.md").read_text()
    assert "| [01_first](#01_first) | First lesson | ok (earlier run, " in summary
    assert "parameters: `N=4`." in summary and "| double | 8 | 6 |" in summary  # 01 as its earlier run left it
    assert "| [02_second](#02_second) | 02_second | ok |" in summary and "| triple | 15 |" in summary


def test_summary_shows_recorded_tables_and_names_the_rest(tmp_path, isolated_outputs, make_notebook):
    path = make_notebook(tmp_path / "nb", "01_tables", PARAMS, SETUP.format(name="01_tables"),
                         "run.record('detection', {'influence': {'ap': 0.9, 'p@10': 1.0}, 'random': {'ap': 0.1}})\n"
                         "run.record('per_setting', {'mnist': {'loss': {'r': 0.5}}, 'cifar': {'loss': {'r': 0.25}}})\n"
                         "run.record('sizes', {'W': 10, 'U': 3})\n"
                         "run.record('scores', list(range(20)))\n"
                         "run.record('fit', {'pretrain': {'trace': list(range(20))}})\nrun.save()")
    runner.run_course("default", only=["01"], folder=path.parent, progress=False)
    summary = (isolated_outputs / "default" / "summary.md").read_text()
    assert "**detection**\n\n| | ap | p@10 |\n|---|---|---|\n| influence | 0.9 | 1 |\n| random | 0.1 | — |" in summary
    assert "**per_setting: mnist**" in summary and "| loss | 0.25 |" in summary
    assert "| sizes.W | 10 |" in summary
    assert "Also in results.json: `scores`, `fit`." in summary


def test_only_accepts_short_numbers_commas_and_paths(course):
    notebooks = runner.list_notebooks(course)
    assert runner.select_notebooks(notebooks, ["2"]) == notebooks[1:]
    assert runner.select_notebooks(notebooks, ["01,02"]) == notebooks
    assert runner.select_notebooks(notebooks, [str(course / "02_second.ipynb")]) == notebooks[1:]


def test_list_shows_only_the_selected_notebooks(course, capsys):
    assert runner.main(["run", "--notebooks", str(course), "--list", "--only", "02"]) == 0
    out = capsys.readouterr().out
    assert "02_second" in out and "01_first" not in out


def test_requests_that_cannot_work_here_fail_before_anything_runs(tmp_path, isolated_outputs, capsys, monkeypatch,
                                                                   make_notebook):
    import torch

    folder = tmp_path / "nb"
    make_notebook(folder, "01_gpu", "DEVICE = 'cpu'  # where to compute", "raise AssertionError('must not run')")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, whatever this one has
    assert runner.main(["run", "--notebooks", str(folder), "-p", "DEVICE", "cuda"]) == 1
    assert "DEVICE='cuda', but torch sees no CUDA GPU on this machine. Fix: -p DEVICE cpu" in capsys.readouterr().err
    assert runner.main(["run", "--notebooks", str(folder), "--output-profile", "cache"]) == 1
    assert "is the cache folder" in capsys.readouterr().err
    assert not isolated_outputs.exists()
