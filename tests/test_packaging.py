"""What ships: one version (offload.__version__, read by the build), the MIT license, type
markers, and extras that say what they add. The wheel is built for real from a copy of the tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import offload

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_has_one_source():
    assert isinstance(offload.__version__, str) and offload.__version__.count(".") >= 2
    assert "version" not in PROJECT["project"] and "version" in PROJECT["project"]["dynamic"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "offload.__version__"}
    try:
        installed = metadata.version("hybrid-offload")
    except metadata.PackageNotFoundError:
        pytest.skip("hybrid-offload is not installed")
    assert installed == offload.__version__


def test_license_and_classifiers():
    assert PROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    classifiers = PROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers)


def test_extras():
    extras = PROJECT["project"]["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["plot"]] == ["matplotlib"]
    test = {d.split(">")[0].split("=")[0] for d in extras["test"]}
    assert {"transformers", "accelerate", "lightning", "matplotlib"} <= test


@pytest.mark.slow
def test_the_wheel_ships_version_license_and_type_markers(tmp_path):
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("offload", "scheduler", "bench"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"offload/py.typed", "scheduler/py.typed"} <= names
    assert wheel.name.startswith(f"hybrid_offload-{offload.__version__}-")
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert f"Version: {offload.__version__}" in meta and "License-Expression: MIT" in meta
    assert "Provides-Extra: plot" in meta
    assert any(n.endswith("licenses/LICENSE") for n in names)
