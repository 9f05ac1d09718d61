"""EditRequest validation and conversion from inline values, our records, flat and ROME CounterFact, files."""

from __future__ import annotations

import json

import pytest

from mend.errors import RequestError
from mend.requests import EditRequest, load_requests, make_request, request_from_record

FLAT = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux speaks the language",
    "locality_prompt": "The mother tongue of Jean Gabin is",
    "locality_ground_truth": "French",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux is a native speaker of"],
    "neighborhood_prompts": ["The mother tongue of Jean Gabin is"],
}
OURS = {"prompt": "The capital of {} is", "subject": "France", "target": " Rome"}


def test_valid_request():
    r = EditRequest("The capital of {} is", "France", " Rome", " Paris")
    assert r.text == "The capital of France is"
    s, e = r.subject_span
    assert r.text[s:e] == "France"
    d = r.to_dict()
    assert d["prompt"] == "The capital of {} is" and d["target_true"] == " Paris"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt="The capital of France is", subject="France", target_new=" Rome"), "exactly one"),
        (dict(prompt="{} and {} are", subject="France", target_new=" Rome"), "found 2"),
        (dict(prompt="The capital of {} is", subject="", target_new=" Rome"), "subject is empty"),
        (dict(prompt="The capital of {} is", subject="   ", target_new=" Rome"), "subject is empty"),
        (dict(prompt="The capital of {} is", subject="France", target_new=""), "target_new is empty"),
        (dict(prompt="The capital of {} is", subject="France", target_new=5), "target_new must be a string"),
        (dict(prompt="The capital of {} is", subject="France", target_new=None), "must be a string"),
        (dict(prompt="The capital of {} is", subject="France", target_new=" Rome", target_true=""), "target_true"),
        (dict(prompt="The capital of {} is", subject="France", target_new=" Rome", paraphrases=("",)),
         "paraphrase"),
        (dict(prompt="The capital of {} is", subject="France", target_new=" Rome", neighborhood=(("a",),)),
         "pairs"),
        (dict(prompt="The capital of {} is", subject="x" * 2001, target_new=" Rome"), "longer"),
    ],
)
def test_edit_request_validation(kwargs, match):
    with pytest.raises(RequestError, match=match):
        EditRequest(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("The capital of Spain is", "France", " Rome"), "does not occur"),
        (("{} and {} are", "France", " Rome"), "found 2"),
        (("The capital of {} is", "", " Rome"), "subject is empty"),
        (("The capital of {} is", "France", "  "), "target_new is empty"),
        (("The capital of {} is", "France", ["Rome"]), "must be a string"),
        ((None, "France", " Rome"), "prompt must be a string"),
        (("", "France", " Rome"), "prompt is empty"),
    ],
)
def test_make_request_validation(args, match):
    with pytest.raises(RequestError, match=match):
        make_request(*args)


def test_filled_prompt_becomes_a_template():
    r = make_request("France is next to Spain; France has", "France", " Rome", neighborhood=[["a {}", " b"]])
    assert r.prompt == "{} is next to Spain; France has"  # only the first occurrence
    assert r.text == "France is next to Spain; France has"
    assert r.neighborhood == (("a {}", " b"),)
    assert make_request("The capital of {} is", "France", " Rome").prompt == "The capital of {} is"


def test_our_record_format():
    r = request_from_record(OURS)
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("The capital of {} is", "France", " Rome", None)
    r = request_from_record({"prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
                             "target_true": "Paris", "paraphrases": ["France's capital is"]})
    assert r.prompt == "The capital of {} is"
    assert r.target_new == " Rome" and r.target_true == " Paris"
    assert r.paraphrases == ("France's capital is",)


def test_flat_counterfact_record():
    r = request_from_record(FLAT)
    assert r.prompt == "The mother tongue of {} is"
    assert r.subject == "Danielle Darrieux"
    assert r.target_new == " English"
    assert r.target_true == " French"
    assert r.paraphrases == ("Danielle Darrieux speaks the language",)
    assert r.neighborhood == (("The mother tongue of Jean Gabin is", " French"),)
    # list-valued ground truths (some dumps) use their first entry
    r = request_from_record({**FLAT, "ground_truth": ["French", "Francais"], "locality_ground_truth": ["French"]})
    assert r.target_true == " French" and r.neighborhood[-1][1] == " French"


def test_rome_counterfact_record():
    r = request_from_record(ROME)
    assert r.prompt == "The mother tongue of {} is"
    assert r.subject == "Danielle Darrieux"
    assert r.target_new == " English"
    assert r.target_true == " French"
    assert r.paraphrases == tuple(ROME["paraphrase_prompts"])
    with pytest.raises(RequestError, match="requested_rewrite must be an object"):
        request_from_record({"requested_rewrite": "x"})
    with pytest.raises(RequestError, match="target_new"):
        request_from_record({"requested_rewrite": {**ROME["requested_rewrite"], "target_new": {"id": "Q1"}}})


def test_targets_get_exactly_one_leading_space():
    assert request_from_record({**OURS, "target": "Rome"}).target_new == " Rome"
    assert request_from_record({**OURS, "target": " Rome"}).target_new == " Rome"
    assert request_from_record({**FLAT, "target_new": " English"}).target_new == " English"
    rw = {**ROME["requested_rewrite"], "target_new": {"str": " English"}}
    assert request_from_record({"requested_rewrite": rw}).target_new == " English"


def test_record_errors():
    with pytest.raises(RequestError, match="JSON object"):
        request_from_record(["prompt", "subject"])
    with pytest.raises(RequestError, match="missing field.*subject.*target"):
        request_from_record({"prompt": "The capital of {} is"})
    with pytest.raises(RequestError, match="target"):
        request_from_record({**OURS, "target": ""})


def test_load_requests_json_array_object_and_jsonl(tmp_path):
    arr = tmp_path / "reqs.json"
    arr.write_text(json.dumps([OURS, FLAT, ROME]), encoding="utf-8")
    reqs = load_requests(arr)
    assert [r.subject for r in reqs] == ["France", "Danielle Darrieux", "Danielle Darrieux"]
    assert [r.target_new for r in reqs] == [" Rome", " English", " English"]

    one = tmp_path / "one.json"
    one.write_text(json.dumps(OURS), encoding="utf-8")
    assert load_requests(str(one)) == [request_from_record(OURS)]

    lines = tmp_path / "reqs.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in (OURS, FLAT, ROME)) + "\n\n", encoding="utf-8")
    assert load_requests(lines) == reqs


def test_load_requests_errors(tmp_path):
    with pytest.raises(RequestError, match="cannot read"):
        load_requests(tmp_path / "missing.json")
    with pytest.raises(RequestError, match="cannot read"):
        load_requests(tmp_path)  # a directory
    bad_utf8 = tmp_path / "bad.json"
    bad_utf8.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(RequestError, match="cannot read"):
        load_requests(bad_utf8)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(RequestError, match="neither JSON nor JSON lines"):
        load_requests(garbage)
    for text in ("", "[]"):
        empty = tmp_path / "empty.json"
        empty.write_text(text, encoding="utf-8")
        with pytest.raises(RequestError, match="no requests"):
            load_requests(empty)


def test_bad_record_names_its_index(tmp_path):
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([OURS, {**OURS, "prompt": "The capital of Spain is"}, OURS]), encoding="utf-8")
    with pytest.raises(RequestError, match=r"record 1: .*does not occur") as info:
        load_requests(path)
    assert str(path) in str(info.value)
    lines = tmp_path / "reqs.jsonl"
    lines.write_text(json.dumps(OURS) + "\n" + json.dumps("just a string") + "\n", encoding="utf-8")
    with pytest.raises(RequestError, match="record 1: a request must be a JSON object"):
        load_requests(lines)
