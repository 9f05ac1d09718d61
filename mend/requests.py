"""EditRequest: one fact to write into a model, validated; built from inline values or JSON / JSONL files."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mend.errors import RequestError
from mend.io import read_json_or_lines

MAX_CHARS = 2000


@dataclass(frozen=True)
class EditRequest:
    """``prompt`` is a template with one ``{}`` where ``subject`` goes; targets carry their leading space."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()  # (prompt, expected continuation)
    portability: tuple[tuple[str, str], ...] = ()  # (question, answer) that should follow from the edit
    generation_prompts: tuple[str, ...] = ()  # prompts for free generation (fluency)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            _check_text(name, getattr(self, name))
        if self.target_true is not None:
            _check_text("target_true", self.target_true)
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(f"prompt must contain exactly one '{{}}' where the subject goes, found {n}: {self.prompt!r}")
        for p in self.paraphrases:
            _check_text("paraphrase", p)
        for p in self.generation_prompts:
            _check_text("generation prompt", p)
        for what in ("neighborhood", "portability"):
            for item in getattr(self, what):
                if len(item) != 2:
                    raise RequestError(f"{what} items must be (prompt, expected) pairs, got {item!r}")
                _check_text(f"{what} prompt", item[0])
                _check_text(f"{what} expected", item[1])

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject in ``text``."""
        start = self.prompt.index("{}")
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["neighborhood"] = [list(x) for x in self.neighborhood]
        d["portability"] = [list(x) for x in self.portability]
        d["generation_prompts"] = list(self.generation_prompts)
        return d


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(f"{name} is empty")
    if len(value) > MAX_CHARS:
        raise RequestError(f"{name} is longer than {MAX_CHARS} characters")


def make_request(
    prompt: Any,
    subject: Any,
    target_new: Any,
    target_true: Any = None,
    paraphrases: Iterable[str] = (),
    neighborhood: Iterable[tuple[str, str]] = (),
    meta: dict[str, Any] | None = None,
    portability: Iterable[tuple[str, str]] = (),
    generation_prompts: Iterable[str] = (),
) -> EditRequest:
    """Build a request; a prompt without ``{}`` is accepted only when it contains the subject (filled-in form)."""
    _check_text("prompt", prompt)
    _check_text("subject", subject)
    if "{}" not in prompt:
        if subject not in prompt:
            raise RequestError(f"subject {subject!r} does not occur in the prompt {prompt!r} (and it has no '{{}}')")
        prompt = prompt.replace(subject, "{}", 1)
    return EditRequest(
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrases=tuple(paraphrases),
        neighborhood=tuple(tuple(x) for x in neighborhood),
        portability=tuple(tuple(x) for x in portability),
        generation_prompts=tuple(generation_prompts),
        meta=dict(meta or {}),
    )


def request_from_record(rec: Any) -> EditRequest:
    """One request from a dict in our format (``target_new`` or ``target``) or the flat CounterFact format."""
    if not isinstance(rec, dict):
        raise RequestError(f"a request must be a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:  # ROME CounterFact format
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise RequestError("requested_rewrite must be an object")
        return make_request(
            rw.get("prompt"), rw.get("subject"), _target_str(rw.get("target_new")), _target_str(rw.get("target_true")),
            paraphrases=_strings(rec.get("paraphrase_prompts", ())),
        )
    target = rec.get("target_new", rec.get("target"))
    true = rec.get("target_true", rec.get("ground_truth"))
    neighborhood = [tuple(x) for x in rec.get("neighborhood", ())]
    if "locality_prompt" in rec and "locality_ground_truth" in rec:
        neighborhood.append((rec["locality_prompt"], _space(rec["locality_ground_truth"])))
    paraphrases = _strings(rec.get("paraphrases", ()))
    if isinstance(rec.get("rephrase_prompt"), str):
        paraphrases.append(rec["rephrase_prompt"])
    missing = [k for k, v in (("prompt", rec.get("prompt")), ("subject", rec.get("subject")), ("target", target)) if v is None]
    if missing:
        raise RequestError(f"missing field(s): {', '.join(missing)}")
    return make_request(
        rec["prompt"], rec["subject"], _space(target), _space(true) if true is not None else None,
        paraphrases=paraphrases, neighborhood=neighborhood,
    )


def _strings(x: Any) -> list[Any]:
    """A list of prompts; a lone string is one prompt, not a sequence of characters."""
    return [x] if isinstance(x, str) else list(x or ())


def _target_str(t: Any) -> Any:
    if isinstance(t, dict):
        t = t.get("str")
    return _space(t) if isinstance(t, str) else t


def with_leading_space(t: Any) -> Any:
    """Targets continue a prompt: give a non-empty string the leading space that separates words."""
    return t if not isinstance(t, str) or t.startswith(" ") or not t.strip() else " " + t


def _space(t: Any) -> Any:
    """A target from a record; a list holds alternatives: the first is taken."""
    if isinstance(t, list) and t:
        t = t[0]
    return with_leading_space(t)


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests from a JSON array, a single JSON object, or JSON lines; errors name the record index."""
    data = read_json_or_lines(path, "request", RequestError)
    records = data if isinstance(data, list) else [data]
    if not records:
        raise RequestError(f"'{path}' holds no requests")
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(request_from_record(rec))
        except RequestError as e:
            raise RequestError(f"{path}: record {i}: {e}") from e
    return out
