"""Two-process CPU DDP (gloo): both ranks end with identical editor weights; each rank sees its own data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mend.learned.lit_data import StreamSampler


def test_ranks_draw_disjoint_slices_of_every_global_batch():
    ranks = [list(StreamSampler(3, 0, 4, rank, 2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(24))
    assert list(StreamSampler(3, 2, 4, 1, 2)) == ranks[1][6:]  # a resumed rank continues where it stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["mend", "malmen"])
def test_two_process_ddp_gives_both_ranks_the_same_editor(tmp_path, method):
    """MEND through Lightning's DDP reducer; MALMEN (several backward passes per step) with the reducer off and its
    gradients averaged over the ranks once per step."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mend.train", "model=tiny-gpt2", "trainer.strategy=ddp", "trainer.devices=2",
           "trainer.max_steps=3", "trainer.batch_size=2", "trainer.val_check_interval=3", "data.val_limit=8",
           "data.variants=1", "norm_warmup=2", "hypernet.rank=32", "trainer.progress=false", "eval.enabled=false",
           "trainer.threads=1", f"out={out}", f"method={method}"]
    if method == "malmen":
        cmd += ["edit.kinds=[mlp_out]", "hypernet.positions=target", "hypernet.precondition_tokens=256",
                "malmen.fact_rows=8"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    digests = metrics["editor_sha256_per_rank"]
    assert metrics["steps"] == 3 and len(digests) == 2 and digests[0] == digests[1]
    from safetensors.torch import load_file

    from mend.learned.checkpointing import state_digest
    from mend.learned.run_dir import build_hypernet, read_info

    info, _ = read_info(out)
    assert info.method == method
    hn = build_hypernet(info)
    hn.load_state_dict(load_file(out / "editor.safetensors"))
    assert state_digest(hn) == digests[0]  # the file rank 0 wrote is what both ranks hold
    assert int(hn.stats_u[info.specs()[0].key].count) > 0
