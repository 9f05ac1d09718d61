"""Turning data-set records into EditRequests: shared error handling (``data.on_error=skip|fail``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mend.errors import MendError, RequestError
from mend.io import read_json_or_lines
from mend.requests import EditRequest, with_leading_space

log = logging.getLogger(__name__)


@dataclass
class EditDataset:
    """Requests from one source, with the metric style their fields call for."""

    name: str
    style: str  # "counterfact", "zsre" or "mend" (see mend.evaluation.metrics)
    requests: list[EditRequest]
    path: str | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)


def read_json_records(path: str | Path) -> list[Any]:
    """A JSON array (or JSON lines) from a file; errors are MendErrors that name the file."""
    data = read_json_or_lines(path, "data")
    if not isinstance(data, list):
        raise MendError(f"'{path}' must hold a JSON array of records")
    return data


def convert(
    records: Iterable[Any],
    fn: Callable[[dict[str, Any], int], list[EditRequest]],
    on_error: str = "skip",
    limit: int | None = None,
    source: str = "",
) -> tuple[list[EditRequest], list[tuple[int, str]]]:
    """Apply ``fn`` to each record; a malformed record is skipped (and reported) or stops the load.

    ``limit`` counts records that converted, so ``data.limit=50`` gives 50 usable records.
    """
    if on_error not in ("skip", "fail"):
        raise MendError(f"data.on_error must be skip or fail, got '{on_error}'")
    out: list[EditRequest] = []
    skipped: list[tuple[int, str]] = []
    n_ok = 0
    for i, rec in enumerate(records):
        if limit is not None and n_ok >= limit:
            break
        try:
            if not isinstance(rec, dict):
                raise RequestError(f"a record must be a JSON object, got {type(rec).__name__}")
            out.extend(fn(rec, i))
            n_ok += 1
        except (RequestError, KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if on_error == "fail":
                raise MendError(f"{source}: record {i}: {reason} (data.on_error=skip skips such records)") from e
            skipped.append((i, reason))
    for i, reason in skipped[:5]:
        log.warning("%s: skipped record %d: %s", source, i, reason)
    return out, skipped


def case_id(rec: dict[str, Any], i: int) -> int | str:
    """The record's ``case_id`` (an integer or a string: it keys the per-record results), else its index."""
    cid = rec.get("case_id", i)
    if isinstance(cid, bool) or not isinstance(cid, (int, str)):
        raise RequestError(f"case_id must be an integer or a string, got {type(cid).__name__}")
    return cid


def space(t: Any) -> str:
    """Targets continue a prompt after a space; lists hold alternatives: the first is taken."""
    while isinstance(t, list):
        if not t:
            raise RequestError("empty answer list")
        t = t[0]
    if isinstance(t, dict) and "str" in t:
        t = t["str"]
    if not isinstance(t, str):
        raise RequestError(f"a target must be a string, got {type(t).__name__}")
    return with_leading_space(t.rstrip())


def strings(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    if not isinstance(x, list) or not all(isinstance(s, str) for s in x):
        raise RequestError("expected a string or a list of strings")
    return x
