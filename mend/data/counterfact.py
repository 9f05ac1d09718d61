"""CounterFact (Meng et al. 2022), in ROME's format and in the flat EasyEdit / MEND format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mend.data.records import EditDataset, case_id, convert, read_json_records, space, strings
from mend.requests import EditRequest, make_request


def rome_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    rw = rec["requested_rewrite"]
    true = space(rw["target_true"])
    return [make_request(
        rw["prompt"], rw["subject"], space(rw["target_new"]), true,
        paraphrases=strings(rec.get("paraphrase_prompts")),
        neighborhood=[(p, true) for p in strings(rec.get("neighborhood_prompts"))],
        generation_prompts=strings(rec.get("generation_prompts")),
        meta={"case_id": case_id(rec, i), "relation": rw.get("relation_id")},
    )]


def flat_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    loc = [(rec["locality_prompt"], space(rec["locality_ground_truth"]))] if rec.get("locality_prompt") else []
    return [make_request(
        rec["prompt"], rec["subject"], space(rec["target_new"]), space(rec["ground_truth"]),
        paraphrases=strings(rec.get("rephrase_prompt")), neighborhood=loc,
        meta={"case_id": case_id(rec, i)},
    )]


def load_counterfact(path: str | Path, limit: int | None = None, on_error: str = "skip") -> EditDataset:
    """Either format; the first record decides which. ROME's format is scored as CounterFact (locality: the true
    target stays more likely than the new one on the neighbourhood prompts); the flat MEND / EasyEdit format as
    MEND and EasyEdit score it (locality: agreement with the unedited model on the locality prompt's answer)."""
    records = read_json_records(path)
    rome = bool(records) and isinstance(records[0], dict) and "requested_rewrite" in records[0]
    reqs, skipped = convert(records, rome_record if rome else flat_record, on_error, limit, str(path))
    return EditDataset("counterfact", "counterfact" if rome else "mend", reqs, str(path), skipped)
