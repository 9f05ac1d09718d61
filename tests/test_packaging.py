"""The configs travel with the package: a wheel built from the tree, installed into a fresh venv, finds the
per-model defaults (and a missing config tree is a loud error, never an empty set of defaults)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mend.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import mend, mend.config
from mend.config import model_file_for
mf = model_file_for("smollm2-135m", "llama")
print(mend.__file__)
print(mf.n_layers, mf.editors["rome"]["layer"])
"""


def test_wheel_ships_the_configs_and_an_installed_copy_finds_the_smollm2_defaults(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mend/configs/model/smollm2-135m.yaml" in names and "mend/configs/train/default.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    # the dependencies come from this environment's site-packages (a plain path: its editable finder stays out)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MEND_CONFIG_DIR", "PYTHONPATH")}
    out = subprocess.run([str(py), "-c", PROBE], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    where, defaults = out.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(venv), f"imported the source tree, not the wheel: {where}"
    assert defaults.split() == ["30", "4"]


def test_a_missing_config_tree_is_an_error(tmp_path, monkeypatch):
    from mend.config import model_file_for

    monkeypatch.setenv("MEND_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="no config tree"):
        model_file_for("smollm2-135m", "llama")
