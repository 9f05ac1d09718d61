"""``python -m locate_edit.trace`` on a tiny model, the layer recommendation and ``layer=auto`` for editors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_command

from locate_edit.layer_choice import (
    LayerChoice,
    cached_choice,
    choice_path,
    recommend,
    resolve_layers,
    store_choice,
)
from locate_edit.trace.average import ROWS, AverageTrace
from locate_edit.trace.cli import USAGE, main
from mend.errors import ConfigError
from mend.models import fingerprint

pytestmark = pytest.mark.usefixtures("isolated_cache")

KNOWNS = [{"known_id": 0, "subject": "Paris", "prompt": "Paris is the capital of", "attribute": "France"},
          {"known_id": 1, "subject": "The Nile", "prompt": "The Nile flows into the", "attribute": "Mediterranean"}]
COUNTERFACT = [{"case_id": 0, "requested_rewrite": {"prompt": "{} is the capital of", "subject": "Paris",
                                                    "target_new": {"str": "Italy"}, "target_true": {"str": "France"}}}]


@pytest.fixture
def knowns(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps(KNOWNS))
    return path


def _cli(argv, capsys):
    return run_command(main, USAGE, argv, capsys)


def test_command_writes_heatmaps_json_and_the_layer_choice(knowns, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(["model=tiny-gpt2", "data=known", f"data.path={knowns}", "data.correct_only=false",
                              "samples=2", "window=3", "per_fact=true", f"out={out}", "progress=false"], capsys)
    assert code == 0, err
    doc = json.loads((out / "trace.json").read_text())
    assert doc["data"]["n"] == 2 and len(doc["facts"]) == 2 and doc["fingerprint"].startswith("GPT2LMHeadModel")
    assert doc["settings"]["samples"] == 2 and doc["settings"]["noise"] == 3.0 and doc["settings"]["noise_std"] > 0
    avg = AverageTrace.from_json(doc["average"])
    assert set(avg.effects) == {"residual", "mlp", "attn"} and avg.effects["mlp"].shape == (len(ROWS), 4)
    fact = doc["facts"][0]
    assert fact["subject"] == "Paris" and len(fact["effects"]["attn"]) == len(fact["tokens"])
    for png in (out / "trace_average.png", out / "facts" / "fact_000.png", out / "facts" / "fact_001.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rome, memit = recommend(avg)
    assert doc["recommendation"]["rome"] == rome and doc["recommendation"]["memit"] == memit
    cached = json.loads(next((tmp_path / "cache" / "layer_choice").glob("*.json")).read_text())
    assert cached["rome"] == rome and cached["n_facts"] == 2 and cached["fingerprint"] == doc["fingerprint"]
    assert f"rome {rome}" in stdout and "trace_average.png" in stdout


def test_only_facts_the_model_predicts_are_traced_by_default(tmp_path, knowns, capsys):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(COUNTERFACT))
    for data in (["data=counterfact", f"data.path={path}"], [f"data.path={knowns}"]):
        code, _, err = _cli(["model=tiny-gpt2", *data, "out=" + str(tmp_path / "o"), "progress=false"], capsys)
        assert code == 2 and "no fact to trace" in err and err.count("\n") == 1  # a random model knows no capital
    code, _, err = _cli(["model=tiny-gpt2", "data=counterfact", f"data.path={path}", "data.correct_only=false",
                         "samples=1", "kinds=[mlp]", "out=" + str(tmp_path / "o"), "progress=false"], capsys)
    assert code == 0, err
    assert list(json.loads((tmp_path / "o" / "trace.json").read_text())["average"]["effects"]) == ["mlp"]


@pytest.mark.parametrize("arg,needle", [
    ("data=zsre", "data must be one of known, counterfact, builtin"),
    ("data=nonsense", "data must be one of"),
    ("data.path=/no/such/file.json", "data file not found"),
    ("samples=0", "samples must be a positive integer"),
    ("window=-2", "window must be a positive integer"),
    ("kinds=[residual,foo]", "kinds must be a non-empty subset"),
    ("noise=-1", "noise must be >= 0"),
    ("data.limit=0", "data.limit must be positive"),
    ("model=no-such-model", "unknown model"),
    ("bogus=1", "bogus"),
])
def test_bad_input_is_one_line_exit_2(arg, needle, knowns, tmp_path, capsys):
    argv = ["model=tiny-gpt2", f"data.path={knowns}", f"out={tmp_path / 'o'}", "progress=false"]
    argv = [a for a in argv if a.split("=")[0] != arg.split("=")[0]] + [arg]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_help(capsys):
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0 and "usage: python -m locate_edit.trace" in out and "data.correct_only" in out


# --- the layer choice ------------------------------------------------------------------------------------------
def _avg(curve: list[float]) -> AverageTrace:
    mlp = torch.zeros(len(ROWS), len(curve))
    mlp[ROWS.index("last subject token")] = torch.tensor(curve)
    mlp[ROWS.index("last token")] = 5.0  # other rows never count
    return AverageTrace({"mlp": mlp, "residual": torch.ones_like(mlp)}, [1] * len(ROWS), 7, 0.5, 0.1)


def test_recommendation_rule():
    assert recommend(_avg([x / 8 for x in [0, 0, 1, 2, 8, 9, 3, 0]])) == (5, [2, 3, 4, 5, 6])
    assert recommend(_avg([x / 8 for x in [1, 3, 2, 9, 8, 1, 0, 0]])) == (3, [0, 1, 2, 3, 4])  # tie: lower window
    assert recommend(_avg([0.1, 0.3, 0.2])) == (1, [0, 1, 2])  # a model shallower than the span
    assert recommend(_avg([x / 8 for x in [0, 0, 1, 2, 8, 9, 3, 0]]), span=2) == (5, [4, 5])
    with pytest.raises(Exception, match="needs the MLP trace"):
        recommend(AverageTrace({"attn": torch.zeros(len(ROWS), 3)}, [1] * len(ROWS), 1, 0.5, 0.1))


def _choice(model, rome: int, memit: list[int], n: int = 10) -> LayerChoice:
    return LayerChoice(rome, memit, [0.0] * 4, n, "tiny", fingerprint(model), "test")


def test_auto_reads_the_cache_without_tracing(tiny, monkeypatch):
    import locate_edit.trace.facts as tf

    model, tok = tiny("tiny-gpt2")
    assert resolve_layers(5, model, tok, many=False) == 5 and resolve_layers([1, 2], model, tok, many=True) == [1, 2]
    store_choice(_choice(model, 2, [1, 2, 3]), model)
    monkeypatch.setattr(tf, "trace_facts", lambda *a, **k: pytest.fail("traced although a choice is cached"))
    assert resolve_layers("auto", model, tok, many=False) == 2
    assert resolve_layers("auto", model, tok, many=True) == [1, 2, 3]
    with pytest.raises(ConfigError, match="'auto' or 'auto:TRACE.json'"):
        resolve_layers("best", model, tok, many=False)


def test_a_cached_choice_from_more_facts_is_kept(tiny):
    model, _ = tiny("tiny-gpt2")
    assert store_choice(_choice(model, 2, [1, 2], n=50), model) == choice_path(model)
    assert store_choice(_choice(model, 3, [2, 3], n=5), model) is None
    assert cached_choice(model).rome == 2
    store_choice(_choice(model, 1, [0, 1], n=50), model)
    assert cached_choice(model).rome == 1


def test_auto_traces_once_on_first_use_and_caches(tiny, monkeypatch):
    import locate_edit.layer_choice as lc
    import locate_edit.trace.facts as tf

    monkeypatch.setattr(lc, "AUTO_FACTS", 2)
    model, tok = tiny("tiny-llama")
    layer = resolve_layers("auto", model, tok, many=False)  # no data folder: built-in facts, traced now
    choice = cached_choice(model)
    assert choice is not None and choice.rome == layer and choice.n_facts == 2 and "builtin" in choice.source
    assert choice.memit == [0, 1, 2, 3]  # four layers: all of them
    monkeypatch.setattr(tf, "trace_facts", lambda *a, **k: pytest.fail("traced twice"))
    assert resolve_layers("auto", model, tok, many=False) == layer


def test_auto_from_a_trace_file(knowns, tmp_path, capsys, tiny):
    out = tmp_path / "out"
    code, _, err = _cli(["model=tiny-gpt2", f"data.path={knowns}", "data.correct_only=false", "kinds=[mlp]",
                         f"out={out}", "cache=false", "progress=false"], capsys)
    assert code == 0, err
    assert not (tmp_path / "cache" / "layer_choice").exists()  # cache=false
    doc = json.loads((out / "trace.json").read_text())
    model, tok = tiny("tiny-gpt2")
    assert resolve_layers(f"auto:{out / 'trace.json'}", model, tok, many=False) == doc["recommendation"]["rome"]
    assert resolve_layers(f"auto:{out / 'trace.json'}", model, tok, many=True) == doc["recommendation"]["memit"]
    other, tok2 = tiny("tiny-llama")
    with pytest.raises(ConfigError, match="was made for model tiny-gpt2"):
        resolve_layers(f"auto:{out / 'trace.json'}", other, tok2, many=False)
    with pytest.raises(ConfigError, match="cannot read a causal trace"):
        resolve_layers(f"auto:{tmp_path / 'missing.json'}", model, tok, many=False)


FAST = {"stats": {"corpus": "self", "tokens": 1024, "seq_len": 32}, "templates": {"spec": [[4, 2]]},
        "value": {"steps": 2}, "guard": {"action": "off"}}


def test_editors_edit_the_layers_auto_picks(tiny):
    from mend.editor import create_editor
    from mend.requests import make_request

    model, tok = tiny("tiny-gpt2")
    store_choice(_choice(model, 2, [1, 3]), model)
    req = [make_request("{} is in", "The tower", " Rome", " Paris")]
    rome = create_editor("rome", FAST, {"layer": "auto"})
    assert {ref.layer for ref in rome.edit(model, tok, req).deltas} == {2}
    memit = create_editor("memit", FAST, {"layers": "auto"})
    assert {ref.layer for ref in memit.edit(model, tok, req).deltas} == {1, 3}


def test_a_bad_layer_setting_is_a_one_line_error(capsys):
    from mend.edit import USAGE as EDIT_USAGE
    from mend.edit import main as edit_main

    code, _, err = run_command(edit_main, EDIT_USAGE, ["model=tiny-gpt2", "editor=rome", "editor.layer=best",
                                                       "prompt={} is in", "subject=The tower", "target= Rome"], capsys)
    assert code == 2 and "'auto' or 'auto:TRACE.json'" in err and err.count("\n") == 1


def test_known_facts_load_as_requests_and_facts(tmp_path):
    from locate_edit.trace import Fact
    from mend.data.registry import load_dataset

    path = tmp_path / "known.json"
    path.write_text(json.dumps([*KNOWNS, {"subject": "Rome", "prompt": "Paris is in", "attribute": "France"}]))
    ds = load_dataset("known", str(path))
    assert len(ds.requests) == 2 and ds.skipped[0][0] == 2 and "does not occur" in ds.skipped[0][1]
    req = ds.requests[1]
    assert (req.prompt, req.subject, req.target_new, req.meta["known_id"]) == (
        "{} flows into the", "The Nile", " Mediterranean", 1)
    fact = Fact.from_request(req)
    assert fact.text == "The Nile flows into the" and fact.subject == "The Nile" and fact.expected == " Mediterranean"
