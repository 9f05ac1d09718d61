"""The built-in fact table and the edit requests made from it (offline, fast)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from mend.data.builtin import RELATIONS, SPLITS, Fact, builtin_requests, load_fact_table, split_of
from mend.errors import MendError
from mend.requests import EditRequest


@pytest.fixture(scope="module")
def table() -> list[Fact]:
    return load_fact_table()


@pytest.fixture(scope="module")
def all_requests() -> list[EditRequest]:
    return builtin_requests("all")


def test_table_size_and_relations(table):
    assert len(table) >= 500
    counts = Counter(f.relation for f in table)
    assert len(counts) >= 12
    assert set(counts) <= set(RELATIONS)
    for rel, n in counts.items():
        assert n >= 25, rel
        assert len({f.object for f in table if f.relation == rel}) >= 2, rel
    for rel, templates in RELATIONS.items():
        assert len(templates) >= 3, rel
        assert all(t.count("{}") == 1 for t in templates), rel


def test_no_duplicates_or_empty_fields(table):
    keys = Counter((f.subject, f.relation) for f in table)
    assert [k for k, n in keys.items() if n > 1] == []
    assert all(f.subject.strip() and f.object.strip() and f.subject == f.subject.strip() for f in table)


def test_splits_fixed_disjoint_and_sized(table):
    subjects = {f.subject for f in table}
    first = {s: split_of(s) for s in subjects}
    assert first == {s: split_of(s) for s in subjects}  # stable across calls
    assert set(first.values()) == set(SPLITS)
    per_split = {sp: {s for s, v in first.items() if v == sp} for sp in SPLITS}
    assert not (per_split["train"] & per_split["test"] or per_split["train"] & per_split["validation"]
                or per_split["validation"] & per_split["test"])
    facts_per_split = Counter(split_of(f.subject) for f in table)
    assert 0.15 <= facts_per_split["test"] / len(table) <= 0.25
    assert 0.60 <= facts_per_split["train"] / len(table) <= 0.80
    assert facts_per_split["validation"] > 0


def test_requests_cover_splits(table, all_requests):
    assert len(all_requests) == len(table)
    n = {sp: len(builtin_requests(sp)) for sp in SPLITS}
    assert sum(n.values()) == len(table) and min(n.values()) > 0
    test_reqs = builtin_requests("test")
    assert all(r.meta["split"] == "test" and split_of(r.subject) == "test" for r in test_reqs)
    assert [r.subject for r in builtin_requests("test", limit=7)] == [r.subject for r in test_reqs[:7]]
    assert builtin_requests("test", limit=0) == []
    ids = [r.meta["case_id"] for r in all_requests]
    assert len(set(ids)) == len(ids)


def test_requests_deterministic_per_seed():
    a, b = builtin_requests("validation", seed=3), builtin_requests("validation", seed=3)
    assert a == b and [r.meta for r in a] == [r.meta for r in b]
    c = builtin_requests("validation", seed=4)
    assert [r.subject for r in c] == [r.subject for r in a]  # order does not depend on the seed
    assert [r.target_new for r in c] != [r.target_new for r in a]


def test_request_contents(table, all_requests):
    objects = defaultdict(set)
    truth = {}
    for f in table:
        objects[f.relation].add(" " + f.object)
        truth[(f.subject, f.relation)] = " " + f.object
    for r in all_requests:
        rel = r.meta["relation"]
        assert r.prompt == RELATIONS[rel][0]
        assert r.target_true == truth[(r.subject, rel)]
        assert r.target_new != r.target_true and r.target_new in objects[rel]
        assert len(r.paraphrases) == len(RELATIONS[rel]) - 1
        assert all("{}" not in p and r.subject in p for p in r.paraphrases)
        assert 2 <= len(r.neighborhood) <= 5
        prefix, suffix = RELATIONS[rel][0].split("{}")
        for prompt, expected in r.neighborhood:
            subject = prompt[len(prefix):len(prompt) - len(suffix)]
            assert prompt.startswith(prefix) and prompt.endswith(suffix)
            assert subject != r.subject
            assert expected == truth[(subject, rel)] and expected != r.target_new
        assert len(r.generation_prompts) == 2 and all("{}" not in g for g in r.generation_prompts)
        assert isinstance(r.meta["case_id"], int)


def test_neighbours_prefer_same_object(all_requests):
    r = next(r for r in all_requests if r.meta["relation"] == "city_country" and r.target_true == " Japan")
    assert len(r.neighborhood) == 5 and all(exp == " Japan" for _, exp in r.neighborhood)
    cap = next(r for r in all_requests if r.meta["relation"] == "capital_of")
    assert len(cap.neighborhood) == 5  # unique objects: filled with other subjects and their own answers


def test_unknown_split():
    with pytest.raises(MendError, match="valid splits: train, validation, test, all"):
        builtin_requests("dev")


def _write(tmp_path, text: str):
    p = tmp_path / "facts.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_user_csv(tmp_path):
    rows = ["subject,relation,object", '"Paris, France",city_country,France', "Kyoto,city_country,Japan",
            "Osaka,city_country,Japan", "Lyon,city_country,France"]
    p = _write(tmp_path, "\n".join(rows) + "\n")
    facts = load_fact_table(p)
    assert facts[0] == Fact("Paris, France", "city_country", "France") and len(facts) == 4
    reqs = builtin_requests("all", path=p, seed=1)
    assert len(reqs) == 4
    for r in reqs:
        assert r.target_new in {" France", " Japan"} and r.target_new != r.target_true
        assert all(r.subject not in prompt for prompt, _ in r.neighborhood)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("subject,object\nKyoto,Japan\n", r"row 1: missing column\(s\) relation"),
        ("subject,relation,object\nKyoto,city_country,Japan\nOsaka,located_in,Japan\n",
         r"row 3: unknown relation 'located_in'; allowed: .*capital_of"),
        ("subject,relation,object\nKyoto,city_country,Japan\nOsaka,city_country,Japan\nKyoto,city_country,China\n",
         r"row 4: duplicate fact .*'Kyoto'.*first on row 2"),
        ("subject,relation,object\nKyoto,city_country,\n", r"row 2: empty field\(s\) object"),
        ("subject,relation,object\n", "holds no facts"),
    ],
)
def test_bad_csv(tmp_path, text, pattern):
    with pytest.raises(MendError, match=pattern):
        load_fact_table(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(MendError, match="cannot read fact table"):
        load_fact_table(tmp_path / "nope.csv")


def test_single_object_relation_rejected(tmp_path):
    p = _write(tmp_path, "subject,relation,object\nKyoto,city_country,Japan\nOsaka,city_country,Japan\n")
    with pytest.raises(MendError, match="at least two different objects"):
        builtin_requests("all", path=p)


def test_scored_like_mend():
    """The built-in facts are MEND-style data: locality is agreement with the unedited model (see metrics.py)."""
    from mend.data.registry import load_dataset

    ds = load_dataset("builtin", None, limit=3)
    assert ds.style == "mend" and len(ds.requests) == 3
