"""The console scripts (pyproject.toml's [project.scripts]) as pip installs them: a wrapper that calls the named
function and passes what it returns to sys.exit."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLASSES, make_image_folder

import sdnet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _entry(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def test_every_console_script_returns_nothing_for_sys_exit(monkeypatch):
    """Pointed at main(), which returns its result, a run that succeeded exited with status 1 and printed the
    result on stderr."""
    assert set(SCRIPTS) == {"sdnet-train", "sdnet-evaluate", "sdnet-robust"}
    for script, target in SCRIPTS.items():
        module = importlib.import_module(f"sdnet.{script.removeprefix('sdnet-')}")
        calls = []
        monkeypatch.setattr(module, "main", lambda argv=None, calls=calls: calls.append(argv) or {"accuracy": 50.0})
        assert _entry(target)() is None and calls == [None], script


def test_the_installed_scripts_are_the_projects():
    """An install made before a change to [project.scripts] still runs the old targets: reinstall (pip install -e .)."""
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name in SCRIPTS}
    if not installed:  # tests run from a tree not pip-installed (CI installs it: there this runs)
        pytest.skip("sdnet's console scripts are not installed")
    assert installed == SCRIPTS


def test_sdnet_evaluate_as_its_console_script_exits_zero(tmp_path, calibrated_model):
    """The wrapper pip writes, run for real on a tiny checkpoint and image folder."""
    tree = make_image_folder(tmp_path / "tree", n_train=1, n_test=2)
    sdnet.save_checkpoint(tmp_path / "m.pt", calibrated_model("resnet18", 4, True), classes=CLASSES,
                          dataset="cifar10")
    module, name = SCRIPTS["sdnet-evaluate"].split(":")
    wrapper = f"import sys; from {module} import {name}; sys.exit({name}())"
    run = subprocess.run([sys.executable, "-c", wrapper, "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tree),
                          "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SDNET_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"accuracy"' in run.stdout
