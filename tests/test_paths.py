"""Roots resolved from the package (not the cwd), environment overrides, profiles, atomic writes."""
import os
from pathlib import Path

import pytest

from msif_lab import paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MSIF_DATA_DIR", "MSIF_OUTPUT_DIR", "MSIF_CACHE_DIR", "MSIF_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_come_from_the_package_location_not_the_cwd(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    assert paths.repo_root() == REPO
    assert paths.data_dir() == REPO / "data"
    assert paths.output_root() == REPO / "outputs"
    assert paths.cache_dir() == REPO / "outputs" / "cache"
    assert paths.notebooks_dir() == REPO / "notebooks"
    assert paths.shared_data_dir() == REPO.parent / "shared" / "data"


def test_profile_defaults_to_interactive_and_follows_the_environment(clean_env):
    assert paths.profile() == "interactive"
    assert paths.profile_dir() == REPO / "outputs" / "interactive"
    clean_env.setenv("MSIF_PROFILE", "paper")
    assert paths.profile_dir() == REPO / "outputs" / "paper"
    assert paths.profile_dir("default") == REPO / "outputs" / "default"


def test_environment_overrides(clean_env, tmp_path):
    clean_env.setenv("MSIF_DATA_DIR", str(tmp_path / "d"))
    clean_env.setenv("MSIF_OUTPUT_DIR", str(tmp_path / "o"))
    assert paths.data_dir() == tmp_path / "d"
    assert paths.cache_dir() == tmp_path / "o" / "cache"  # the cache follows the output root ...
    clean_env.setenv("MSIF_CACHE_DIR", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"  # ... unless set itself
    clean_env.setenv("MSIF_PROFILE", "custom")
    assert paths.profile_dir() == tmp_path / "o" / "custom"


def test_relative_override_is_resolved_once(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    clean_env.setenv("MSIF_OUTPUT_DIR", "rel")
    assert paths.output_root() == tmp_path / "rel"


@pytest.mark.parametrize("bad", ["../up", "a/b", ".hidden", "sp ace"])
def test_unsafe_profile_names_are_rejected(clean_env, bad):
    clean_env.setenv("MSIF_PROFILE", bad)
    with pytest.raises(ValueError, match="MSIF_PROFILE"):
        paths.profile()


def test_empty_variables_count_as_unset(clean_env):
    clean_env.setenv("MSIF_PROFILE", "")
    clean_env.setenv("MSIF_DATA_DIR", " ")
    assert paths.profile() == "interactive"
    assert paths.data_dir() == REPO / "data"


def test_atomic_path_writes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with paths.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()
        tmp.write_text("first")
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError, match="boom"):
        with paths.atomic_path(target) as tmp:
            tmp.write_text("half of the sec")
            raise RuntimeError("boom")
    assert target.read_text() == "first"  # untouched
    assert sorted(os.listdir(target.parent)) == ["out.txt"]  # no temporary left behind
