"""Edits exported as PEFT LoRA adapters: exact factors, and plain ``peft`` reproduces the edited model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_command
from tiny_editors import TINY_EDITORS

from mend.adapters import get_adapter
from mend.editor import EditResult, apply_edit
from mend.errors import MendError
from mend.lora import low_rank
from mend.requests import make_request

TOL = 1e-5  # the bound on next-token probabilities; float32 rounding of W + B A is ~1e-7 of them
SUBJECTS = ["The tower", "Bob", "Alice", "The river", "Paris", "Rex", "The moon", "Tom", "The bank", "Ann"]


def _requests(n: int):
    targets = [" Rome", " piano", " red", " north", " cats", " seven", " blue", " tea", " wood", " salt"]
    return [make_request("{} is known for", SUBJECTS[i], targets[i], None) for i in range(n)]


def _next_token_probs(model, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    extra = {}
    if model.config.is_encoder_decoder:
        extra["decoder_input_ids"] = torch.zeros((len(prompts), 1), dtype=torch.long)
    with torch.no_grad():
        return model(**enc, **extra).logits[:, -1 if extra else slice(None)].softmax(-1)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])  # Conv1D, Linear, encoder-decoder
@pytest.mark.parametrize("editor_name, n", [("rome", 1), ("memit", 10), ("mend", 2)])
def test_peft_adapter_reproduces_the_edited_model(tiny, tmp_path, monkeypatch, model_name, editor_name, n):
    from peft import PeftModel

    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny(model_name)
    reqs = _requests(n)
    result = TINY_EDITORS[editor_name](model, tok, reqs).edit(model, tok, reqs)
    export = result.to_peft(tmp_path / "lora", model)
    # only singular values under the cut 16 ε ‖ΔW‖_F are dropped, at most min(d_out, d_in) = 64 of them here
    assert export.max_residual <= 16 * torch.finfo(torch.float32).eps * 64**0.5
    # the update's own rank: ROME one per request, MEMIT at most the batch, MEND at most the edited tokens
    bound = result.diagnostics["tokens"] if editor_name == "mend" else n
    assert set(export.ranks) == {ref.module for ref in result.deltas}
    assert all(1 <= r <= bound for r in export.ranks.values()), (export.ranks, bound)
    base = copy.deepcopy(model)
    apply_edit(model, result)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    prompts = [r.text for r in reqs] + ["an unrelated prompt"]
    diff = (_next_token_probs(model, tok, prompts) - _next_token_probs(peft_model, tok, prompts)).abs().max()
    assert diff <= TOL
    merged = dict(peft_model.merge_and_unload().named_parameters())
    edited = dict(model.named_parameters())
    for ref in result.deltas:
        w = edited[ref.param].detach()
        assert torch.allclose(merged[ref.param].detach(), w, rtol=0, atol=1e-5 * float(w.abs().max())), ref.label


def test_low_rank_is_exact_at_the_rank_and_truncation_reports_the_svd_tail():
    gen = torch.Generator().manual_seed(0)
    D = torch.randn(48, 5, generator=gen) @ torch.randn(5, 200, generator=gen)
    f = low_rank(D)
    assert f.rank == 5 and f.B.shape == (48, 5) and f.A.shape == (5, 200)
    assert float((f.B @ f.A - D).norm() / D.norm()) < 1e-6
    s = torch.linalg.svdvals(D.double())
    g = low_rank(D, rank=2)
    assert g.rank == 2
    expected = float(s[2:].norm() / s.norm())  # Eckart–Young: the best rank-2 error is the tail of the spectrum
    assert g.residual == pytest.approx(expected, rel=1e-6)
    assert float((g.B @ g.A - D).norm() / D.norm()) == pytest.approx(expected, rel=1e-4)
    full = torch.randn(40, 60, generator=gen)  # full rank: the range finder gives way to a full SVD
    assert low_rank(full).rank == 40


def test_sequential_edits_export_as_one_adapter(tiny, tmp_path):
    from peft import PeftModel

    model, tok = tiny("tiny-llama")
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(3):  # three rank-1 edits of the same two weights, applied one after another
        refs = adapter.weight_refs(["mlp_out"], [1, 2])
        results.append(EditResult({r: 0.05 * torch.randn(adapter.get_weight(r).shape[0], 1, generator=gen)
                                   @ torch.randn(1, adapter.get_weight(r).shape[1], generator=gen) for r in refs}))
    combined = EditResult.combine(results)
    export = combined.to_peft(tmp_path / "seq", model)
    assert set(export.ranks.values()) == {3}
    base = copy.deepcopy(model)
    for r in results:
        apply_edit(model, r)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "seq"))
    diff = (_next_token_probs(model, tok, ["a b c", "hello"]) - _next_token_probs(peft_model, tok, ["a b c", "hello"]))
    assert diff.abs().max() <= TOL


def test_an_empty_edit_has_nothing_to_export(tiny, tmp_path):
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(MendError, match="nothing to export"):
        EditResult({}).to_peft(tmp_path / "x", model)


# The README's adapter script, as a user runs it: transformers and peft only, in a process of its own.
PLAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    base_dir, lora_dir, edited_dir, prompt = sys.argv[1:]
    cls = AutoModelForSeq2SeqLM if "t5" in json.load(open(base_dir + "/config.json"))["model_type"] \\
        else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), lora_dir)
    edited = cls.from_pretrained(edited_dir)
    enc = tok([prompt], return_tensors="pt")
    extra = {"decoder_input_ids": torch.zeros((1, 1), dtype=torch.long)} if cls is AutoModelForSeq2SeqLM else {}
    with torch.no_grad():
        p, q = (m(**enc, **extra).logits[0, -1].softmax(-1) for m in (model, edited))
    print(json.dumps({"max_abs_diff": float((p - q).abs().max())}))
""")


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_mend_edit_lora_loads_with_plain_peft(tiny, tmp_path, monkeypatch, capsys, model_name):
    from mend.edit import USAGE, main

    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny(model_name)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    argv = [f"model={base}", "editor=rome", "editor.layer=1", "editor.stats.corpus=self", "editor.stats.tokens=256",
            "editor.stats.seq_len=32", "editor.templates.spec=[[4,2]]", "editor.value.steps=3",
            "editor.guard.action=off", "prompt={} is known for", "subject=The tower", "target= Rome",
            f"lora={tmp_path / 'lora'}", f"save={tmp_path / 'edited'}", "max_new_tokens=2"]
    code, out, err = run_command(main, USAGE, argv, capsys)
    assert code == 0, err
    assert "LoRA adapter written to" in out and "rank 1" in out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is (model_name == "tiny-gpt2")
    proc = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(base), str(tmp_path / "lora"),
                           str(tmp_path / "edited"), "The tower is known for"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_diff"] <= TOL
