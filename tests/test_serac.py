"""SERAC on tiny models: scope, the counterfactual model in context, memory across calls, persistence."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_identical, param_clones
from tolerance import FORWARD, f32_tol

from mend.editor import apply_edit, edited
from mend.errors import MendError
from mend.learned.serac.editor import SeracEditor, fact_text
from mend.learned.serac.scope import ScopeClassifier, ScopeConfig, text_features
from mend.requests import make_request

REQS = [make_request("{} is in", "The tower", " Rome", " Paris"), make_request("{} plays", "Bob", " piano", " drums")]
OTHER = "A completely different sentence about the weather"


def _editor(model, tok, threshold=0.5):
    torch.manual_seed(0)
    clf = ScopeClassifier(model.config.hidden_size, ScopeConfig(dim=16, threshold=threshold))
    clf.fit_features(text_features(model, tok, [r.text for r in REQS] + [OTHER, "hello there"], -1))
    return SeracEditor(classifier=clf)


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc.attention_mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_in_scope_rows_read_the_edit_in_context_and_the_others_are_untouched(tiny, name):
    model, tok = tiny(name)
    editor = _editor(model, tok)
    result = editor.edit(model, tok, REQS[:1])
    texts = [REQS[0].text, OTHER]
    base, mask = _logits(model, tok, texts)
    # which rows the classifier puts in scope (the edit's own prompt always: cos 1)
    clf = editor._classifier
    q = clf.embed(text_features(model, tok, texts, -1))
    _, prob = clf.retrieve(q, editor._emb)
    assert prob[0] > 0.5
    params = param_clones(model)
    with edited(model, result):
        after, _ = _logits(model, tok, texts)
    assert_params_identical(model, params)
    # the edited row: the base model's logits on fact + prompt, at the prompt's positions
    fact = tok(fact_text(REQS[0]), add_special_tokens=False).input_ids
    ids = torch.tensor([fact + tok(REQS[0].text).input_ids])
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, len(fact):]
    n = int(mask[0].sum())
    tol = f32_tol(want.abs().max(), safety=FORWARD)
    assert torch.allclose(after[0, :n], want, rtol=0, atol=tol)
    if prob[1] <= 0.5:  # out of scope: exactly the base model's row, bit for bit
        assert torch.equal(after[1], base[1])
    assert torch.equal(_logits(model, tok, texts)[0], base)  # restored


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_cached_generation_stays_in_context_past_the_first_token(tiny, name):
    """``generate`` with its cache: every new token of an in-scope prompt is predicted with the edit in context
    (the base model on fact + prompt + the tokens so far), not only the first."""
    model, tok = tiny(name)
    editor = _editor(model, tok)
    result = editor.edit(model, tok, REQS[:1])
    enc = tok([REQS[0].text], return_tensors="pt")
    fact = tok(fact_text(REQS[0]), add_special_tokens=False).input_ids
    ids = torch.tensor([fact + enc.input_ids[0].tolist()])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": pad, "return_dict_in_generate": True,
          "output_logits": True}
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        with edited(model, result):
            got = model.generate(**enc, use_cache=True, **kw)
    assert torch.equal(got.sequences[0, enc.input_ids.shape[1]:], want.sequences[0, ids.shape[1]:])
    for g, w in zip(got.logits, want.logits, strict=True):
        # one pass over fact + tokens against the base model's cached steps: a few eps × the logits' size
        assert torch.allclose(g, w, rtol=0, atol=f32_tol(w.abs().max(), safety=FORWARD))


def test_out_of_scope_inputs_get_exactly_the_base_logits(tiny):
    model, tok = tiny("tiny-llama")
    editor = _editor(model, tok, threshold=1.0)  # nothing can be in scope
    texts = [r.text for r in REQS] + [OTHER]
    base, _ = _logits(model, tok, texts)
    with edited(model, editor.edit(model, tok, REQS)):
        assert torch.equal(_logits(model, tok, texts)[0], base)


def test_memory_grows_across_calls_as_one_patch_and_reset_clears_it(tiny):
    model, tok = tiny("tiny-llama")
    editor = _editor(model, tok)
    h1 = apply_edit(model, editor.edit(model, tok, REQS[:1]))
    r2 = editor.edit(model, tok, REQS[1:])
    assert r2.diagnostics["memory"] == 2
    h2 = apply_edit(model, r2)
    assert list(model.__dict__["_mend_patches"]) == ["serac"]  # replaced, not stacked
    h2.restore()
    h1.restore()
    assert "forward" not in model.model.__dict__
    editor.reset()
    assert editor.edit(model, tok, REQS[:1]).diagnostics["memory"] == 1


def test_save_reload_and_fingerprint_refusal(tiny, tmp_path):
    from mend.learned.serac.run import SeracInfo, load_serac, save_serac
    from mend.models import fingerprint

    model, tok = tiny("tiny-llama")
    clf = _editor(model, tok)._classifier
    info = SeracInfo("tiny-llama", fingerprint(model), model.config.hidden_size, clf.cfg)
    save_serac(tmp_path / "run", clf, info, {"method": "serac"})
    loaded, info2 = load_serac(tmp_path / "run")
    assert info2 == info
    for k, v in clf.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ed = SeracEditor(SeracEditor.Config(checkpoint=str(tmp_path / "run")))
    assert ed.edit(model, tok, REQS[:1]).patches
    other, otok = tiny("tiny-gpt2")
    with pytest.raises(MendError, match="fingerprint"):
        SeracEditor(SeracEditor.Config(checkpoint=str(tmp_path / "run"))).edit(other, otok, REQS[:1])
    with pytest.raises(MendError, match="no trained SERAC"):
        load_serac(tmp_path / "nothing")


def test_training_fast_dev_run_writes_a_run_directory_the_editor_reads(tiny, tmp_path, capsys):
    """``python -m mend.train configs/train/serac.yaml`` on a tiny model and the built-in facts, one step."""
    from conftest import run_command

    from mend.learned.train import USAGE, main
    from mend.paths import config_dir

    out = tmp_path / "run"
    argv = [str(config_dir() / "train" / "serac.yaml"), "model=tiny-llama", "data=builtin", "data.limit=30",
            "data.val_limit=10", "trainer.fast_dev_run=true", "trainer.progress=false", f"out={out}"]
    code, stdout, err = run_command(main, USAGE, argv, capsys)
    assert code == 0, err
    assert "in_scope_recall" in stdout and (out / "editor.safetensors").exists()
    model, tok = tiny("tiny-llama")
    result = SeracEditor(SeracEditor.Config(checkpoint=str(out))).edit(model, tok, REQS)
    assert result.patches and not result.deltas


def test_scope_metrics_count_recall_and_rejection():
    """The validation score on hand-made features: a classifier that puts everything in scope rejects nothing."""
    from mend.learned.serac.train import scope_metrics

    class F:
        feats = torch.eye(4)
        edit = torch.tensor([0, 1])
        pos = [[2], [3]]
        neg = [[3]]

    clf = ScopeClassifier(4, ScopeConfig(dim=4, threshold=0.5))
    with torch.no_grad():
        clf.proj.weight.copy_(torch.eye(4))
        clf.bias.fill_(100.0)  # every pair in scope
    m = scope_metrics(clf, F)
    assert m["out_of_scope_rejection"] == 0.0 and m["score"] == 0.0
