"""Timing helpers shared by the bench scripts."""

from __future__ import annotations

import statistics
import time

from mend.scoring import make_batch, target_nll


def fwd_bwd_seconds(model, tok, prompts: list[str], targets: list[str], repeats: int = 3) -> float:
    """Median seconds of one forward+backward of the whole model (every weight's gradient) on a prompt batch."""
    batch = make_batch(tok, prompts, targets, model)
    model.requires_grad_(True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        target_nll(model(**batch.inputs).logits, batch).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return statistics.median(times)
