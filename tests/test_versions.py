"""Supported versions are a tested claim: pyproject.toml's ranges, the two constraint sets CI installs, the check
where training starts, and the wheel users install."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from rf_notebook import _versions

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = os.environ.get("RF_NOTEBOOK_INSTALLED") == "1"  # make test-lowest: the wheel, not the source tree


def declared() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name: Requirement(line) for line in project["dependencies"]}


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


def lower_bound(requirement: Requirement) -> str:
    (bound,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return bound


def test_the_lowest_set_is_the_lower_bound_of_every_checked_range():
    """constraints-lowest.txt pins each library the engine depends on in detail at its declared lower bound (torch
    stays at the local CPU wheel), so the range pyproject.toml declares is the one CI tests."""
    lowest = pins("constraints-lowest.txt")
    for name in _versions.CHECKED:
        if name != "torch":
            assert Version(lowest[name]) == Version(lower_bound(declared()[name])), name


def test_both_constraint_sets_fall_in_the_declared_ranges():
    for constraints in ("constraints.txt", "constraints-lowest.txt"):
        pinned = pins(constraints)
        for name, requirement in declared().items():
            if name in pinned:
                assert requirement.specifier.contains(pinned[name], prereleases=True), (constraints, name)


def test_a_version_outside_the_range_is_refused_naming_it_and_the_range(monkeypatch):
    assert _versions.problems({"trl": "1.16.0"}, {"trl": ">=1.16,<2"}) == []
    assert _versions.problems({"torch": "2.13.0+cpu"}, {"torch": ">=2.4"}) == []  # a local build label is fine
    assert _versions.problems({"torch": "2.4.0a0+git34c6371"}, {"torch": ">=2.4"}) == []  # a GPU image's build
    assert _versions.problems({"torch": "2.3.1"}, {"torch": ">=2.4"}) == [
        "torch>=2.4 is required, but torch 2.3.1 is installed"
    ]
    assert "cannot be read" in _versions.problems({"trl": "custom"}, {"trl": ">=1.16"})[0]
    assert _versions.problems({"trl": "2.0.0", "peft": None}, {"trl": ">=1.16,<2", "peft": ">=0.21"}) == [
        "trl>=1.16,<2 is required, but trl 2.0.0 is installed",
        "peft>=0.21 is required, but peft is not installed",
    ]
    monkeypatch.setattr(_versions, "requirements", lambda: {"trl": ">=1.16,<2"})
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.15.0")
    with pytest.raises(ImportError, match=r"trl>=1.16,<2 is required, but trl 1.15.0 is installed.*pip install"):
        _versions.check()


def test_the_installed_versions_pass_the_check():
    if not INSTALLED and not _versions.requirements():
        pytest.skip("rf_notebook is not installed (its requirements are read from the installed metadata)")
    _versions.check()


@pytest.mark.skipif(not INSTALLED, reason="only where make test-lowest installed the wheel")
def test_the_tests_run_against_the_installed_wheel():
    import rf_notebook

    assert "site-packages" in rf_notebook.__file__, rf_notebook.__file__
    assert _versions.requirements() == {
        name: str(r.specifier) for name, r in declared().items() if name in _versions.CHECKED
    }


@pytest.mark.skipif(INSTALLED, reason="built once, in the main suite")
def test_the_wheel_carries_the_panel_and_the_demo_model_and_no_sources_of_the_repo(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("rf_notebook-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rf_notebook/static/widget.js" in names and "rf_notebook/static/widget.css" in names
    assert "rf_notebook/demo/tiny-arith/model.safetensors" in names
    assert "rf_notebook/engine/torch_backend.py" in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", "js", "notebooks", "docs")]
    assert wheel.stat().st_size < 3_000_000, wheel.stat().st_size
