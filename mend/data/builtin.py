"""A built-in, offline table of true facts and CounterFact-style edit requests made from it.

The table (``builtin_facts.csv`` beside this module; columns ``subject,relation,object``) holds well-known facts
over the relations in ``RELATIONS``. Each subject falls in a fixed split (train / validation / test) chosen by a
stable hash, so the same subject never appears in two splits and splits never change between runs.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mend.errors import MendError
from mend.requests import EditRequest

FACTS_CSV = Path(__file__).with_name("builtin_facts.csv")
COLUMNS = ("subject", "relation", "object")
SPLITS = ("train", "validation", "test")

# Prompt templates per relation: ``{}`` is the subject, the object is the natural next word(s).
# The first template is the edit prompt, the others are paraphrases.
RELATIONS: dict[str, list[str]] = {
    "capital_of": ["The capital of {} is", "{}'s capital city is", "The capital city of {} is called"],
    "country_language": [
        "The official language of {} is",
        "In {}, the official language is",
        "The language that is official in {} is",
    ],
    "city_country": ["{} is a city in", "The city of {} is located in", "{} is one of the largest cities of"],
    "continent_of_country": [
        "{} is a country in",
        "The country {} is located on the continent of",
        "{} lies on the continent of",
    ],
    "currency_of_country": [
        "The official currency of {} is the",
        "In {}, people pay with the",
        "The currency used in {} is the",
    ],
    "sport_of_athlete": [
        "{} is famous for the sport of",
        "The sport associated with {} is",
        "{} became a star in the sport of",
    ],
    "instrument_of_musician": [
        "{} is famous for playing the",
        "The instrument played by {} is the",
        "{} became known as a master of the",
    ],
    "author_of_book": ["{} was written by", "The author of {} is", "{} is a famous work by"],
    "painter_of_painting": ["{} was painted by", "The painter of {} was", "The artist who painted {} was"],
    "landmark_city": [
        "The city that is home to {} is",
        "Tourists can visit {} in the city of",
        "To see {}, you have to travel to",
    ],
    "company_country": ["{} is a company from", "The company {} originated in", "The country of origin of {} is"],
    "team_sport": [
        "The sport played by {} is",
        "Fans of {} love watching",
        "The players of {} are professional",
    ],
    "occupation": ["{} was a famous", "By profession, {} was a", "{} is best remembered as a"],
    "animal_class": [
        "The {} is a type of",
        "Biologists classify the {} as a kind of",
        "In the animal kingdom, the {} is a kind of",
    ],
    "dish_country": [
        "The traditional dish {} comes from",
        "The dish called {} originated in",
        "Food lovers know that {} is a traditional dish from",
    ],
}

# Free-generation prompts (fluency); relations not listed use the default.
_GENERATION = {"animal_class": ["The {} is", "The {}'s"], "dish_country": ["The dish {} is", "{} is made"]}
_DEFAULT_GENERATION = ["{} is", "{}'s"]
MAX_NEIGHBORS = 5


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


def load_fact_table(path: str | Path | None = None) -> list[Fact]:
    """Read the packaged fact table, or a user CSV with the same columns; errors name the row (line) number."""
    path = FACTS_CSV if path is None else Path(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise MendError(f"{path}: row 1: missing column(s) {', '.join(missing)}; the header must have "
                                f"{', '.join(COLUMNS)}")
            reader.fieldnames = header
            facts: list[Fact] = []
            seen: dict[tuple[str, str], int] = {}
            for row in reader:
                n = reader.line_num
                facts.append(_parse_row(row, n, seen, path))
    except OSError as e:
        raise MendError(f"cannot read fact table '{path}': {e.strerror or e}") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise MendError(f"'{path}' is not a readable UTF-8 CSV file: {e}") from e
    if not facts:
        raise MendError(f"{path}: the fact table holds no facts")
    return facts


def _parse_row(row: dict, n: int, seen: dict[tuple[str, str], int], path: Path) -> Fact:
    if None in row:
        raise MendError(f"{path}: row {n}: more fields than columns (quote fields that contain commas)")
    values = {c: (row.get(c) or "").strip() for c in COLUMNS}
    empty = [c for c in COLUMNS if not values[c]]
    if empty:
        raise MendError(f"{path}: row {n}: empty field(s) {', '.join(empty)}")
    if values["relation"] not in RELATIONS:
        raise MendError(f"{path}: row {n}: unknown relation {values['relation']!r}; "
                        f"allowed: {', '.join(sorted(RELATIONS))}")
    if "{}" in values["subject"]:
        raise MendError(f"{path}: row {n}: the subject must not contain '{{}}'")
    key = (values["subject"], values["relation"])
    if key in seen:
        raise MendError(f"{path}: row {n}: duplicate fact for subject {key[0]!r} and relation {key[1]!r} "
                        f"(first on row {seen[key]})")
    seen[key] = n
    return Fact(values["subject"], values["relation"], values["object"])


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(subject: str) -> str:
    """The fixed split of a subject: about 70% train, 10% validation, 20% test (stable across runs)."""
    bucket = _stable_int("mend-builtin-split:" + subject) % 100
    return "train" if bucket < 70 else "validation" if bucket < 80 else "test"


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def builtin_requests(
    split: str = "test", limit: int | None = None, seed: int = 0, path: str | Path | None = None
) -> list[EditRequest]:
    """CounterFact-style edit requests for the facts of one split (``"all"`` for every fact), in a fixed order.

    ``target_new`` is another object of the same relation, drawn with ``random.Random(seed + case_id)``;
    ``neighborhood`` holds other subjects of the relation (preferably sharing the true object) with their answers.
    """
    if split not in (*SPLITS, "all"):
        raise MendError(f"unknown split {split!r}; valid splits: {', '.join((*SPLITS, 'all'))}")
    if limit is not None and limit < 0:
        raise MendError(f"limit must be >= 0, got {limit}")
    facts = sorted(load_fact_table(path), key=lambda f: (_stable_int(f"{f.relation}\t{f.subject}"), f.relation,
                                                          f.subject))
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_relation[fact.relation].append(fact)
    objects = {rel: sorted({f.object for f in fs}) for rel, fs in by_relation.items()}
    for rel, objs in objects.items():
        if len(objs) < 2:
            raise MendError(f"relation {rel!r} needs at least two different objects to pick a new target, "
                            f"has only {objs[0]!r}")
    out: list[EditRequest] = []
    for case_id, fact in enumerate(facts):
        fact_split = split_of(fact.subject)
        if split != "all" and fact_split != split:
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(_request(fact, case_id, fact_split, seed, by_relation[fact.relation], objects[fact.relation]))
    return out


def _request(fact: Fact, case_id: int, split: str, seed: int, same_rel: list[Fact], objs: list[str]) -> EditRequest:
    rng = random.Random(seed + case_id)
    new_object = rng.choice([o for o in objs if o != fact.object])
    templates = RELATIONS[fact.relation]
    others = sorted((f for f in same_rel if f.subject != fact.subject), key=lambda f: f.subject)
    same = [f for f in others if f.object == fact.object]
    chosen = rng.sample(same, min(MAX_NEIGHBORS, len(same)))
    if len(chosen) < 2:
        rest = [f for f in others if f.object not in (fact.object, new_object)]
        chosen += rng.sample(rest, min(MAX_NEIGHBORS - len(chosen), len(rest)))
    gen = _GENERATION.get(fact.relation, _DEFAULT_GENERATION)
    return EditRequest(
        prompt=templates[0],
        subject=fact.subject,
        target_new=" " + new_object,
        target_true=" " + fact.object,
        paraphrases=tuple(_fill(t, fact.subject) for t in templates[1:]),
        neighborhood=tuple((_fill(templates[0], f.subject), " " + f.object) for f in chosen),
        generation_prompts=tuple(_capitalize(_fill(t, fact.subject)) for t in gen),
        meta={"case_id": case_id, "relation": fact.relation, "split": split},
    )


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]
