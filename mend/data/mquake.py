"""MQuAKE (Zhong et al. 2023): several edits per case, then multi-hop questions whose answer should change.

Each case becomes one request per rewrite, sharing ``meta["group"]`` so the evaluator applies them together;
the multi-hop questions (with the new answer) are the first request's ``portability`` probes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mend.data.records import EditDataset, case_id, convert, read_json_records, space, strings
from mend.requests import EditRequest, make_request


def mquake_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    case = case_id(rec, i)
    rewrites = rec["requested_rewrite"]
    if not isinstance(rewrites, list) or not rewrites:
        raise ValueError("requested_rewrite must be a non-empty list")
    new_answer = space(rec["new_answer"])
    out = []
    for k, rw in enumerate(rewrites):
        questions = strings(rec.get("questions")) if k == 0 else []
        out.append(make_request(
            rw["prompt"], rw["subject"], space(rw["target_new"]), space(rw["target_true"]),
            portability=[(q, new_answer) for q in questions],
            meta={"case_id": f"{case}.{k}", "group": case},
        ))
    return out


def load_mquake(path: str | Path, limit: int | None = None, on_error: str = "skip") -> EditDataset:
    reqs, skipped = convert(read_json_records(path), mquake_record, on_error, limit, str(path))
    return EditDataset("mquake", "counterfact", reqs, str(path), skipped)
