"""``make train`` picks the learned editor by the data it finds: MALMEN on CounterFact's training split when the
data root has it, else MEND on the built-in facts (``python -m mend.train``'s defaults). ``PY=echo`` prints the
command instead of running it; ``-o`` keeps make from setting up the environment."""

import shutil
import subprocess
from pathlib import Path

import pytest

from mend.paths import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make_train(data_root: Path) -> list[str]:
    out = subprocess.run(["make", "-s", "-o", ".venv/.mend-installed", "train", "PY=echo", f"DATA_ROOT={data_root}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()


def test_counterfact_found_trains_malmen(tmp_path):
    (tmp_path / "counterfact").mkdir()
    (tmp_path / "counterfact" / "counterfact-train.json").write_text("[]")
    said, command = make_train(tmp_path)
    assert "MALMEN on CounterFact" in said
    assert command.split()[:3] == ["-m", "mend.train", "configs/train/malmen.yaml"]
    assert "trainer.max_steps=250" in command.split()


def test_no_data_trains_mend_on_builtin(tmp_path):
    said, command = make_train(tmp_path)
    assert "built-in facts" in said
    assert command.split() == ["-m", "mend.train"]
