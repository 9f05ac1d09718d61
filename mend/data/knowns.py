"""ROME's "known facts" (``known_1000.json``: ``subject``, ``prompt``, ``attribute``): facts a model is expected to
know, used for causal tracing. As edit requests they are zsRE-style: ``target_new`` is the known attribute, and
there is no counterfactual."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mend.data.records import EditDataset, convert, read_json_records, space
from mend.errors import RequestError
from mend.requests import EditRequest, make_request


def known_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    """``prompt`` holds the subject written out (``{}`` is put in its place); ``attribute`` is the answer."""
    prompt, subject = rec["prompt"], rec["subject"]
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise RequestError("prompt and subject must be strings")
    if "{}" not in prompt and subject not in prompt:
        raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return [make_request(prompt, subject, space(rec["attribute"]),
                         meta={"known_id": rec.get("known_id", i), "relation": rec.get("relation_id")})]


def load_knowns(path: str | Path, limit: int | None = None, on_error: str = "skip") -> EditDataset:
    reqs, skipped = convert(read_json_records(path), known_record, on_error, limit, str(path))
    return EditDataset("known", "zsre", reqs, str(path), skipped)
