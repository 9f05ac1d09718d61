"""zsRE question answering edits: MEND's format (src, alt, answers, rephrase, loc, loc_ans) and KnowEdit's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mend.data.records import EditDataset, case_id, convert, read_json_records, space, strings
from mend.errors import RequestError
from mend.requests import EditRequest, make_request


def template(question: str, subject: str) -> tuple[str, str]:
    """The question with ``{}`` at the subject (matched case-insensitively), and the subject as written there."""
    if not isinstance(question, str) or not isinstance(subject, str) or not subject.strip():
        raise RequestError("question and subject must be non-empty strings")
    m = re.search(re.escape(subject), question, flags=re.IGNORECASE)
    if m is None:
        raise RequestError(f"subject {subject!r} not found in {question!r}")
    return question[: m.start()] + "{}" + question[m.end():], m.group(0)


def mend_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    prompt, subject = template(rec["src"], rec["subject"])
    port = rec.get("portability") or {}
    portability = [(port["New Question"], space(port["New Answer"]))] if port.get("New Question") else []
    return [make_request(
        prompt, subject, space(rec["alt"]), space(rec["answers"]) if rec.get("answers") else None,
        paraphrases=strings(rec.get("rephrase")),
        neighborhood=[(rec["loc"], space(rec["loc_ans"]))] if rec.get("loc") else [],
        portability=portability, meta={"case_id": case_id(rec, i)},
    )]


def knowedit_record(rec: dict[str, Any], i: int) -> list[EditRequest]:
    prompt, subject = template(rec["prompt"], rec["subject"])
    loc = [(x["prompt"], space(x["ground_truth"])) for x in (rec.get("locality") or {}).get("Relation_Specificity", [])]
    port = [(x["prompt"], space(x["ground_truth"])) for group in (rec.get("portability") or {}).values()
            for x in group]
    true = rec.get("ground_truth")
    return [make_request(
        prompt, subject, space(rec["target_new"]), space(true) if true else None,
        paraphrases=strings(rec.get("rephrase_prompt")), neighborhood=loc, portability=port,
        meta={"case_id": case_id(rec, i)},
    )]


def load_zsre(path: str | Path, limit: int | None = None, on_error: str = "skip") -> EditDataset:
    """MEND format or KnowEdit ZsRE format; the first record decides which."""
    records = read_json_records(path)
    fn = mend_record if records and isinstance(records[0], dict) and "src" in records[0] else knowedit_record
    reqs, skipped = convert(records, fn, on_error, limit, str(path))
    return EditDataset("zsre", "zsre", reqs, str(path), skipped)
