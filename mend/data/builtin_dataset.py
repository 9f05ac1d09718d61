"""The built-in facts as an EditDataset (MEND-style metrics: see mend.evaluation.metrics)."""

from __future__ import annotations

from mend.data.records import EditDataset


def load_builtin(split: str = "test", limit: int | None = None, seed: int = 0, path: str | None = None) -> EditDataset:
    from mend.data.builtin import builtin_requests

    reqs = builtin_requests(split=split, limit=limit, seed=seed, path=path)
    return EditDataset("builtin", "mend", reqs, path or "builtin", [])
