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


def test_scaling_runs_the_batch_sizes_and_draws_the_figure(tmp_path):
    """bench/scaling.py on a tiny model: a row per (N, editor) plus the unedited one, the JSON and the figure;
    an editor past its --max-n is left out of that N."""
    import os

    out = tmp_path / "scaling"
    data = tmp_path / "cf.json"  # three records in the EasyEdit CounterFact format of counterfact-edit.json
    data.write_text(json.dumps([
        {"case_id": i, "prompt": f"{s} is located in", "subject": s, "target_new": new, "ground_truth": true,
         "rephrase_prompt": f"Where is {s}? It is in", "locality_prompt": "Big Ben is located in",
         "locality_ground_truth": "London"}
        for i, (s, new, true) in enumerate([("The tower", "Rome", "Paris"), ("The bridge", "Oslo", "Lima"),
                                            ("The wall", "Cairo", "Delhi")])]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--model", "tiny-llama", "--editors", "ft",
                           "--sizes", "2,3", "--max-n", "ft=2", "--out", str(out), "--threads", "1",
                           "--data", str(data)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["n"], r["editor"]) for r in rows] == [(2, "unedited"), (2, "ft"), (3, "unedited")]
    assert out.with_suffix(".png").stat().st_size > 0
