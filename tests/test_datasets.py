"""Data-set loaders (mend.data), their handling of malformed records, and python -m mend.evaluate end to end.

Tests marked ``data`` read the shared data folder: $MEND_DATA_DIR, else ../shared/data beside the repository. When
it is missing they are skipped, or fail when CI=true. The other tests here write their own small files.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

from mend.data.counterfact import load_counterfact
from mend.data.mquake import load_mquake
from mend.data.registry import load_dataset
from mend.data.zsre import load_zsre
from mend.errors import MendError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root() -> Path:
    root = Path(os.environ.get("MEND_DATA_DIR") or REPO_ROOT.parent / "shared" / "data").expanduser()
    if not root.is_dir():
        msg = f"data folder '{root}' not found (set MEND_DATA_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def _check_requests(reqs) -> None:
    for r in reqs:
        assert r.prompt.count("{}") == 1
        assert r.subject in r.text
        for t in (r.target_new, r.target_true, *(e for _, e in r.neighborhood), *(a for _, a in r.portability)):
            if t is not None:
                assert t.startswith(" ") and not t.startswith("  ") and t.strip(), repr(t)
        assert all("{}" not in p for p in r.paraphrases)


# name, file under the data root, style, (paraphrases, neighbourhood, portability, generation prompts) expected
REAL = [
    ("counterfact", "counterfact/counterfact_rome.json", "counterfact", (True, True, False, True)),
    ("counterfact", "counterfact/counterfact-val.json", "mend", (True, True, False, False)),
    ("zsre", "zsre/zsre_mend_eval_portability_gpt4.json", "zsre", (True, True, True, False)),
    ("knowedit", "knowedit/ZsRE/ZsRE-test-all.json", "zsre", (True, True, True, False)),
]


@pytest.mark.data
@pytest.mark.parametrize("name,rel,style,has", REAL, ids=[r[1].split("/")[-1] for r in REAL])
def test_load_real_data(data_root, name, rel, style, has):
    path = data_root / rel
    ds = load_dataset(name, str(path), limit=20)
    assert ds.name == ("zsre" if name == "knowedit" else name) and ds.style == style
    assert ds.path == str(path) and ds.skipped == []
    assert len(ds.requests) == 20
    _check_requests(ds.requests)
    reqs = ds.requests
    assert all(r.target_true is not None for r in reqs)  # (KnowEdit has records where it equals target_new)
    para, nb, port, gen = has
    for expected, field in ((para, "paraphrases"), (nb, "neighborhood"), (port, "portability"),
                            (gen, "generation_prompts")):
        present = [bool(getattr(r, field)) for r in reqs]
        assert present == [expected] * 20, field  # every record has it, or none does
    assert len({r.meta["case_id"] for r in reqs}) == 20
    if rel.endswith("rome.json"):  # ROME's neighbourhood prompts share the true target
        assert all(e == r.target_true for r in reqs for _, e in r.neighborhood)


@pytest.mark.data
def test_load_real_mquake(data_root):
    ds = load_dataset("mquake", str(data_root / "mquake/AKEW-MQuAKE-CF-354.json"), limit=20)
    assert ds.style == "counterfact" and ds.skipped == []
    _check_requests(ds.requests)
    groups = defaultdict(list)
    for r in ds.requests:
        groups[r.meta["group"]].append(r)
    assert len(groups) == 20  # limit counts cases, each may hold several rewrites
    assert len(ds.requests) > 20 and any(len(g) > 1 for g in groups.values())
    for case, reqs in groups.items():
        assert [r.meta["case_id"] for r in reqs] == [f"{case}.{k}" for k in range(len(reqs))]
        assert reqs[0].portability, case  # the multi-hop questions ride on the first rewrite
        assert all(not r.portability for r in reqs[1:])
        assert len({a for _, a in reqs[0].portability}) == 1  # one new answer per case
        assert all(r.target_true is not None for r in reqs)


@pytest.mark.data
def test_default_file_under_the_data_root(data_root, monkeypatch):
    monkeypatch.setenv("MEND_DATA_DIR", str(data_root))
    ds = load_dataset("counterfact", limit=2)
    assert ds.path == str(data_root / "counterfact/counterfact_rome.json") and len(ds.requests) == 2
    monkeypatch.setenv("MEND_DATA_DIR", str(data_root / "no-such-folder"))
    with pytest.raises(MendError, match="does not exist"):
        load_dataset("zsre", limit=2)


# --- malformed records in small files ------------------------------------------------------------------------


def flat(i: int, subject: str = "The tower", **kw) -> dict:
    rec = {"case_id": i, "prompt": f"{subject} is located in", "subject": subject, "target_new": "Rome",
           "ground_truth": "Paris", "rephrase_prompt": f"Where is {subject}? It is in",
           "locality_prompt": "The Louvre is located in", "locality_ground_truth": "Paris"}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


MALFORMED_FLAT = [
    flat(0),
    flat(1, target_new=None),  # missing field
    flat(2, target_new=5),  # wrong type
    flat(3, prompt="Paris is lovely in"),  # subject not in the prompt
    "not a record",  # not an object
    flat(5, subject="The bridge"),
]


def _write(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_malformed_records_are_skipped_and_listed(tmp_path):
    path = _write(tmp_path, MALFORMED_FLAT)
    ds = load_counterfact(path, on_error="skip")
    assert [r.meta["case_id"] for r in ds.requests] == [0, 5]
    assert [i for i, _ in ds.skipped] == [1, 2, 3, 4]
    reasons = dict(ds.skipped)
    assert "target_new" in reasons[1]
    assert "string" in reasons[2]
    assert "does not occur" in reasons[3]
    assert "JSON object" in reasons[4]
    r = ds.requests[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("{} is located in", "The tower", " Rome", " Paris")
    assert r.paraphrases == ("Where is The tower? It is in",)
    assert r.neighborhood == (("The Louvre is located in", " Paris"),)
    # the limit counts usable records: the second one is record 5
    assert [r.meta["case_id"] for r in load_counterfact(path, limit=2).requests] == [0, 5]
    assert load_counterfact(path, limit=1).skipped == []


@pytest.mark.parametrize("bad,needle", [(1, "target_new"), (2, "string"), (3, "does not occur")])
def test_malformed_record_fails_naming_it(tmp_path, bad, needle):
    path = _write(tmp_path, [MALFORMED_FLAT[0], MALFORMED_FLAT[bad]])
    with pytest.raises(MendError, match=f"record 1: .*{needle}") as exc:
        load_dataset("counterfact", str(path), on_error="fail")
    assert str(path) in str(exc.value)


def test_rome_format_and_its_errors(tmp_path):
    good = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle",
                                                "target_new": {"str": "English"}, "target_true": {"str": "French"},
                                                "relation_id": "P103"},
            "paraphrase_prompts": ["Danielle speaks"], "neighborhood_prompts": ["Léon Blum speaks"],
            "generation_prompts": ["Danielle's mother tongue is"]}
    no_subject = json.loads(json.dumps(good))
    del no_subject["requested_rewrite"]["subject"]
    bad_para = {**good, "paraphrase_prompts": [1, 2]}
    path = _write(tmp_path, [good, no_subject, bad_para])
    ds = load_counterfact(path)
    assert len(ds.requests) == 1 and [i for i, _ in ds.skipped] == [1, 2]
    r = ds.requests[0]
    assert (r.target_new, r.target_true) == (" English", " French")
    assert r.neighborhood == (("Léon Blum speaks", " French"),)
    assert r.meta == {"case_id": 7, "relation": "P103"}
    with pytest.raises(MendError, match="record 1"):
        load_counterfact(path, on_error="fail")


def test_zsre_formats_and_errors(tmp_path):
    mend_fmt = [
        {"src": "What is the capital of france?", "subject": "France", "alt": "Lyon", "answers": ["Paris"],
         "rephrase": "Which city is France's capital?", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
         "portability": {"New Question": "Which river flows through the capital of France?", "New Answer": "Rhone"}},
        {"src": "Who founded Rome?", "subject": "Carthage", "alt": "Dido", "answers": ["Romulus"]},  # subject absent
        {"src": "Who founded Rome?", "subject": "Rome", "alt": 3},  # wrong type
    ]
    ds = load_zsre(_write(tmp_path, mend_fmt, "mend.json"))
    assert ds.style == "zsre" and len(ds.requests) == 1 and [i for i, _ in ds.skipped] == [1, 2]
    r = ds.requests[0]
    assert (r.prompt, r.subject) == ("What is the capital of {}?", "france")  # case-insensitive match
    assert (r.target_new, r.target_true) == (" Lyon", " Paris")
    assert r.neighborhood == (("nq question: who wrote hamlet", " Shakespeare"),)
    assert r.portability == (("Which river flows through the capital of France?", " Rhone"),)
    knowedit = [{"subject": "ZIC3", "prompt": "What species is ZIC3 specific to?", "target_new": "male",
                 "ground_truth": "human", "rephrase_prompt": "Where is ZIC3 found?",
                 "locality": {"Relation_Specificity": [{"prompt": "ZIC3 strand", "ground_truth": ["forward"]}]},
                 "portability": {"Reasoning": [{"prompt": "What does ZIC3 do?", "ground_truth": [["male"]]}]}},
                {"subject": "ZIC3", "prompt": "What species?", "target_new": "male"}]
    ds = load_zsre(_write(tmp_path, knowedit, "knowedit.json"))
    assert len(ds.requests) == 1 and ds.skipped[0][0] == 1 and "not found" in ds.skipped[0][1]
    r = ds.requests[0]
    assert r.neighborhood == (("ZIC3 strand", " forward"),) and r.portability == (("What does ZIC3 do?", " male"),)
    with pytest.raises(MendError, match="record 1: .*not found"):
        load_zsre(_write(tmp_path, knowedit, "knowedit.json"), on_error="fail")


def test_mquake_groups_and_errors(tmp_path):
    case = {"case_id": 9, "new_answer": "Zagreb", "questions": ["Q1 about Ellie?", "Q2 about Ellie?"],
            "requested_rewrite": [
                {"prompt": "{} is a citizen of", "subject": "Ellie", "target_new": {"str": "Croatia"},
                 "target_true": {"str": "USA"}},
                {"prompt": "The capital of {} is", "subject": "Croatia", "target_new": {"str": "Zagreb"},
                 "target_true": {"str": "Split"}}]}
    path = _write(tmp_path, [case, {**case, "case_id": 10, "requested_rewrite": []}, {"case_id": 11}])
    ds = load_mquake(path)
    assert ds.style == "counterfact" and [i for i, _ in ds.skipped] == [1, 2]
    assert [r.meta for r in ds.requests] == [{"case_id": "9.0", "group": 9}, {"case_id": "9.1", "group": 9}]
    assert ds.requests[0].portability == (("Q1 about Ellie?", " Zagreb"), ("Q2 about Ellie?", " Zagreb"))
    assert ds.requests[1].portability == ()
    with pytest.raises(MendError, match="record 1: .*non-empty"):
        load_mquake(path, on_error="fail")


def test_registry_errors(tmp_path):
    with pytest.raises(MendError, match="unknown data set 'nope'"):
        load_dataset("nope")
    with pytest.raises(MendError, match="limit"):
        load_dataset("counterfact", str(_write(tmp_path, [flat(0)])), limit=0)
    with pytest.raises(MendError, match="not found"):
        load_dataset("counterfact", str(tmp_path / "missing.json"))
    with pytest.raises(MendError, match="no usable records"):
        load_dataset("counterfact", str(_write(tmp_path, MALFORMED_FLAT[1:5], "bad.json")))
    with pytest.raises(MendError, match="on_error"):
        load_dataset("counterfact", str(_write(tmp_path, [flat(0)])), on_error="ignore")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(MendError, match="neither JSON nor JSON lines"):
        load_dataset("counterfact", str(tmp_path / "garbage.json"))
    # JSON lines are accepted
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(flat(i)) for i in range(3)) + "\n")
    assert len(load_dataset("counterfact", str(tmp_path / "lines.jsonl")).requests) == 3


# --- python -m mend.evaluate in-process ---------------------------------------------------------------------


def _evaluate(argv: list[str], capsys) -> tuple[int, str, str]:
    from mend.cli import run
    from mend.evaluate import USAGE, main

    with pytest.raises(SystemExit) as exc:
        run(main, USAGE, argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _argv(path: Path, out: Path, *extra: str) -> list[str]:
    return ["model=tiny-gpt2", "data=counterfact", f"data.path={path}", "editors=[ft]", "mode=sequential",
            "drawdown.source=none", f"out={out}", "settings.ft.steps=2", "curve_every=1", "progress=false", *extra]


def test_evaluate_cli_writes_results(tmp_path, capsys):
    path = _write(tmp_path, [flat(0), flat(1, subject="The bridge"), flat(2, subject="The museum")])
    out = tmp_path / "out"
    code, stdout, err = _evaluate(_argv(path, out), capsys)
    assert code == 0, err
    for name in ("results.json", "results.md", "metrics.png", "curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "tiny-gpt2" and res["mode"] == "sequential"
    assert res["dataset"]["name"] == "counterfact" and res["dataset"]["path"] == str(path)
    assert res["dataset"]["n"] == 3 and res["dataset"]["skipped"] == []
    assert set(res["editors"]) == {"ft"}
    ft = res["editors"]["ft"]
    for key in ("efficacy", "generalization", "locality", "score", "edit_success", "kl_locality",
                "seconds_per_edit", "n"):
        assert ft["metrics"][key] is not None, key
    assert "drawdown_ppl" in ft["metrics"] and ft["metrics"]["drawdown_ppl"] is None  # drawdown.source=none
    assert ft["metrics"]["n"] == 3 and [r["id"] for r in ft["records"]] == [0, 1, 2]
    assert [p["edits"] for p in ft["curve"]] == [1, 2, 3]
    assert ft["config"]["steps"] == 2 and ft["config"]["layers"] == [1]  # tiny-gpt2's model file: layer 1
    assert res["pre"]["kl_locality"] == 0.0 and res["pre"]["n"] == 3
    md = (out / "results.md").read_text()
    assert "| unedited |" in md and "| ft |" in md and "tiny-gpt2" in md
    assert "results.json" in stdout


def test_evaluate_cli_skips_or_fails_on_malformed_records(tmp_path, capsys):
    path = _write(tmp_path, [flat(0), flat(1, target_new=5), flat(2, subject="The bridge")])
    code, _, err = _evaluate(_argv(path, tmp_path / "fail", "data.on_error=fail"), capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "record 1" in err and "target" in err
    assert not (tmp_path / "fail" / "results.json").exists()

    code, stdout, err = _evaluate(_argv(path, tmp_path / "skip", "mode=batch"), capsys)
    assert code == 0, err
    assert "skipped 1 malformed record(s), e.g. record 1" in stdout
    res = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert res["dataset"]["n"] == 2 and [s["record"] for s in res["dataset"]["skipped"]] == [1]
    assert not (tmp_path / "skip" / "curve.png").exists()  # no curve outside sequential mode


def test_evaluate_cli_reports_each_editor_as_it_finishes(tmp_path, capsys):
    """A long evaluation keeps what it measured: each editor's line is printed and the reports are written as soon
    as it is done, so a later editor that fails (or a killed run) loses only its own results."""
    from dataclasses import dataclass

    from mend.editor import _REGISTRY, Editor, register_editor
    from mend.errors import MendError

    @dataclass
    class BoomConfig:
        layers: tuple = (1,)

    @register_editor
    class Boom(Editor):
        name, Config = "boom-test", BoomConfig

        def edit(self, model, tokenizer, requests):
            raise MendError("boom-test always fails")

    try:
        path = _write(tmp_path, [flat(0), flat(1, subject="The bridge")])
        out = tmp_path / "out"
        code, stdout, err = _evaluate(_argv(path, out, "editors=[ft,boom-test]", "mode=batch"), capsys)
        assert code == 2 and "boom-test always fails" in err
        assert "ft: efficacy" in stdout
        res = json.loads((out / "results.json").read_text())
        assert set(res["editors"]) == {"ft"} and res["editors"]["ft"]["metrics"]["n"] == 2
    finally:
        _REGISTRY.pop("boom-test", None)
