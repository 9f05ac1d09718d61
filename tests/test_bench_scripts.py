"""The bench scripts still run end to end on a tiny model (their figures are measured on SmolLM2, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_mend_speed_times_the_default_editor_on_a_tiny_model(tmp_path):
    """The default training config's editor (preconditioned) is built, edited with and timed."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(BENCH / "mend_speed.py"), "--model", "tiny-llama", "--n", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["median"]["edit_s"] > 0 and result["median"]["ratio"] > 0
