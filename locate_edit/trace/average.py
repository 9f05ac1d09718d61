"""Averaging causal traces over facts, with the paper's token rows (Meng et al. 2022, Fig. 2): first subject
token, middle subject tokens, last subject token, first subsequent token, further tokens, last token.

Each token is one sample of its row (a fact with three middle subject tokens adds three), as in the reference
notebook. A token can fall in two rows (a one-token subject is its first and last token; a subject followed by a
single token has that token as first subsequent and last token). Rows no fact has are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from locate_edit.trace.core import FactTrace
from mend.errors import MendError

ROWS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
        "further tokens", "last token")
LAST_SUBJECT = ROWS.index("last subject token")


def token_rows(subject_range: Sequence[int], n_tokens: int) -> list[list[int]]:
    """For each of ``ROWS``, the token indices of one prompt that belong to it."""
    s0, s1 = subject_range
    last = n_tokens - 1
    return [[s0], list(range(s0 + 1, s1 - 1)), [s1 - 1], [s1] if s1 <= last else [],
            list(range(s1 + 1, last)), [last]]


@dataclass
class AverageTrace:
    """Mean indirect effects per kind, shape (len(ROWS), layers), and how many tokens each row averages."""

    effects: dict[str, torch.Tensor]
    counts: list[int]
    n_facts: int
    p_clean: float  # mean over facts
    p_corrupted: float

    @property
    def n_layers(self) -> int:
        return next(iter(self.effects.values())).shape[1]

    def to_json(self) -> dict[str, Any]:
        return {"rows": list(ROWS), "counts": self.counts, "n_facts": self.n_facts, "p_clean": self.p_clean,
                "p_corrupted": self.p_corrupted,
                "effects": {k: [[None if v != v else v for v in row] for row in m.tolist()]
                            for k, m in self.effects.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AverageTrace:
        if list(d.get("rows", [])) != list(ROWS):
            raise MendError(f"an averaged trace must have the rows {list(ROWS)}")
        eff = {k: torch.tensor([[float("nan") if v is None else v for v in row] for row in m], dtype=torch.float32)
               for k, m in d["effects"].items()}
        return cls(eff, list(d["counts"]), int(d["n_facts"]), float(d["p_clean"]), float(d["p_corrupted"]))


def average(traces: Sequence[FactTrace]) -> AverageTrace:
    """The mean indirect effect of each (row, layer) over every fact's tokens in that row."""
    if not traces:
        raise MendError("no traces to average")
    kinds = list(traces[0].effects)
    n_layers = traces[0].effects[kinds[0]].shape[1]
    sums = {k: torch.zeros(len(ROWS), n_layers, dtype=torch.float64) for k in kinds}
    counts = [0] * len(ROWS)
    for tr in traces:
        for r, idx in enumerate(token_rows(tr.subject_range, len(tr.tokens))):
            counts[r] += len(idx)
            for k in kinds:
                sums[k][r] += tr.effects[k][idx].double().sum(0)
    denom = torch.tensor(counts, dtype=torch.float64)[:, None]
    effects = {k: (s / denom).float() for k, s in sums.items()}  # 0 / 0 = NaN for empty rows
    n = len(traces)
    return AverageTrace(effects, counts, n, sum(t.p_clean for t in traces) / n, sum(t.p_corrupted for t in traces) / n)
