"""Editor contract: exact apply / restore, EditResult persistence, the registry, and the FT baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ALL_TINY, assert_params_identical, param_clones
from tiny_editors import TINY_EDITORS
from tolerance import f32_tol

from mend.adapters import get_adapter
from mend.editor import EditResult, apply_edit, create_editor, edited, editor_class
from mend.errors import ConfigError, MendError
from mend.models import fingerprint
from mend.requests import make_request
from mend.scoring import score_targets


def _random_result(adapter, seed: int = 0) -> EditResult:
    """Random (d_out, d_in) deltas on every MLP kind of two layers (both stacks for T5)."""
    gen = torch.Generator().manual_seed(seed)
    refs = adapter.weight_refs(layers=[0, -1])
    assert len(refs) >= 4
    deltas = {r: torch.randn(adapter.get_weight(r).shape, generator=gen) * 0.1 for r in refs}
    return EditResult(deltas, {"note": "random"})


@pytest.mark.parametrize("name", ALL_TINY)
def test_apply_changes_weights_by_exactly_the_delta_and_restore_is_bit_exact(tiny, name):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    before = param_clones(model)
    result = _random_result(adapter)

    handle = apply_edit(model, result)
    params = dict(model.named_parameters())
    for ref, delta in result.deltas.items():
        stored = adapter.to_stored(ref, delta)
        assert torch.equal(params[ref.param].detach(), before[ref.param] + stored)
        # and in the (d_out, d_in) convention, independent of the storage layout
        orig = before[ref.param].T if ref.transposed else before[ref.param]
        # W + Δ rounds by ≤ eps/2·|W + Δ| and subtracting W again by ≤ eps/2·|Δ|: ≤ eps · max(|W| + |Δ|), × 2
        torch.testing.assert_close(adapter.get_weight(ref) - orig, delta, rtol=0,
                                   atol=f32_tol((orig.abs() + delta.abs()).max(), safety=2))
    untouched = set(params) - {r.param for r in result.deltas}
    assert untouched and all(torch.equal(params[n].detach(), before[n]) for n in untouched)

    handle.restore()
    assert_params_identical(model, before)
    handle.restore()  # a second restore is a no-op
    assert_params_identical(model, before)


@pytest.mark.parametrize("name", ALL_TINY)
def test_two_deltas_on_the_same_weight_restore_to_the_original(tiny, name):
    """Two refs naming one parameter (different labels) and nested edits all come back bit for bit."""
    model, _ = tiny(name)
    adapter = get_adapter(model)
    before = param_clones(model)
    ref = adapter.weight_ref(0, "mlp_out")
    alias = dataclasses.replace(ref, kind="mlp_out_again")
    assert alias != ref and alias.param == ref.param
    shape = adapter.get_weight(ref).shape
    gen = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    handle = apply_edit(model, EditResult({ref: d1, alias: d2}))
    orig = before[ref.param].T if ref.transposed else before[ref.param]
    # two float32 additions on each side, each off by ≤ eps/2 · (|W| + |d1| + |d2|)
    torch.testing.assert_close(adapter.get_weight(ref), orig + d1 + d2, rtol=0,
                               atol=f32_tol((orig.abs() + d1.abs() + d2.abs()).max(), safety=2))
    handle.restore()
    assert_params_identical(model, before)

    # nested: two separate edits of the same weight, undone in reverse order
    r1, r2 = EditResult({ref: d1}), EditResult({ref: d2})
    with edited(model, r1):
        after_first = param_clones(model)
        with edited(model, r2):
            assert not torch.equal(dict(model.named_parameters())[ref.param], after_first[ref.param])
        assert_params_identical(model, after_first)
    assert_params_identical(model, before)


@pytest.mark.parametrize("name", ALL_TINY)
def test_edited_restores_on_exception(tiny, name):
    model, _ = tiny(name)
    before = param_clones(model)
    result = _random_result(get_adapter(model), seed=1)
    with pytest.raises(RuntimeError, match="boom"):
        with edited(model, result) as m:
            assert m is model
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            assert sorted(changed) == sorted(r.param for r in result.deltas)
            raise RuntimeError("boom")
    assert_params_identical(model, before)


def test_edit_changes_the_model_output_and_restore_brings_it_back(tiny):
    model, tok = tiny("tiny-llama")
    ids = torch.tensor([tok("The capital of France is").input_ids])
    base = model(ids).logits
    with edited(model, _random_result(get_adapter(model))):
        assert not torch.allclose(model(ids).logits, base)
    assert torch.equal(model(ids).logits, base)


def test_wrong_shape_raises_and_leaves_the_model_unchanged(tiny):
    model, _ = tiny("tiny-llama")
    adapter = get_adapter(model)
    before = param_clones(model)
    good = adapter.weight_ref(0, "mlp_out")
    bad = adapter.weight_ref(1, "mlp_out")
    d_out, d_in = adapter.get_weight(bad).shape
    result = EditResult({good: torch.ones(d_out, d_in), bad: torch.ones(d_in, d_out)})  # second one transposed
    with pytest.raises(MendError, match="shape"):
        apply_edit(model, result)
    assert_params_identical(model, before)


def test_gpt2_deltas_are_d_out_by_d_in(tiny):
    """A GPT-2 delta in stored ([in, out]) layout must be refused: the convention is (d_out, d_in)."""
    model, _ = tiny("tiny-gpt2")
    adapter = get_adapter(model)
    ref = adapter.weight_ref(0, "mlp_in")
    assert ref.transposed
    stored_shape = adapter.parameter(ref).shape
    with pytest.raises(MendError):
        apply_edit(model, EditResult({ref: torch.zeros(stored_shape)}))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_edit_result_save_load_round_trip_is_exact(tiny, tmp_path, name):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    result = _random_result(adapter, seed=2)
    ref0 = next(iter(result.deltas))
    result.deltas[ref0] = result.deltas[ref0].T.contiguous().T  # a non-contiguous view must survive too
    result.diagnostics = {"losses": [1.5, 0.25], "steps": 2}
    path = result.save(tmp_path / "edit.safetensors")
    assert path.exists()
    loaded = EditResult.load(path)
    assert list(loaded.deltas) == list(result.deltas)  # refs (incl. stack and transposed) and their order
    for ref, d in result.deltas.items():
        assert torch.equal(loaded.deltas[ref], d)
        assert loaded.deltas[ref].dtype == d.dtype
    assert loaded.diagnostics == result.diagnostics

    # applying the loaded result gives the same weights as applying the original
    with edited(model, result):
        a = param_clones(model)
    with edited(model, loaded):
        assert_params_identical(model, a)


def test_editor_registry_errors():
    with pytest.raises(ConfigError, match="unknown editor 'nope'.*ft"):
        create_editor("nope")
    with pytest.raises(ConfigError):
        editor_class("nope")
    with pytest.raises(ConfigError, match="bogus"):
        create_editor("ft", {"bogus": 1})
    with pytest.raises(ConfigError):
        create_editor("ft", {"steps": "many"})
    ed = create_editor("ft", {"steps": 3}, {"lr": 0.1})
    assert ed.config.steps == 3 and ed.config.lr == 0.1
    assert ed.config.kind == "mlp_out"  # untouched default


def _request():
    return make_request("The capital of {} is", "France", " Rome")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_ft_editor_raises_target_logprob_within_the_linf_ball(tiny, name):
    model, tok = tiny(name)
    req = _request()
    before = param_clones(model)
    fp = fingerprint(model)
    base = score_targets(model, tok, [req.text], [req.target_new])[0]

    bound = 2e-2
    ed = create_editor("ft", {"layers": [0, -1], "lr": 1e-2, "steps": 10, "norm_constraint": bound})
    result = ed.edit(model, tok, [req])

    # edit returns deltas only: the model is untouched
    assert_params_identical(model, before)
    assert fingerprint(model) == fp
    adapter = get_adapter(model)
    assert set(result.deltas) == {adapter.weight_ref(0, "mlp_out"), adapter.weight_ref(-1, "mlp_out")}
    for ref, d in result.deltas.items():
        assert d.shape == adapter.get_weight(ref).shape  # (d_out, d_in)
        assert d.abs().max().item() <= bound + f32_tol(bound, safety=1)  # clamped at float32(bound)
        assert d.abs().max().item() > 0
    assert result.diagnostics["steps"] == len(result.diagnostics["losses"]) > 0

    with edited(model, result):
        after = score_targets(model, tok, [req.text], [req.target_new])[0]
    assert after.logprob > base.logprob + 1.0, (base.logprob, after.logprob)
    assert_params_identical(model, before)


def test_ft_edits_one_stack_of_an_encoder_decoder_model(tiny):
    model, tok = tiny("tiny-t5")
    adapter = get_adapter(model)
    cfg = {"layers": [-1], "steps": 2, "lr": 1e-2, "norm_constraint": 1e-2}
    default = create_editor("ft", cfg).edit(model, tok, [_request()])
    assert list(default.deltas) == [adapter.weight_ref(-1, "mlp_out", "encoder")]
    dec = create_editor("ft", {**cfg, "stack": "decoder"}).edit(model, tok, [_request()])
    assert list(dec.deltas) == [adapter.weight_ref(-1, "mlp_out", "decoder")]
    with pytest.raises(ConfigError, match="stack"):
        create_editor("ft", {**cfg, "stack": "middle"}).edit(model, tok, [_request()])


# --- every registered editor keeps the contract --------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])  # nn.Linear, and Conv1D stored [in, out]
def test_every_registered_editor_keeps_the_contract(tiny, tmp_path, monkeypatch, model_name):
    """For each name in available_editors(): edit() returns one (d_out, d_in) delta per weight it changes (nn.Linear
    convention, also for GPT-2's transposed Conv1D) and leaves every parameter bit-identical; apply_edit changes
    only the edited weights, and restore() brings every parameter back bit for bit."""
    from transformers.pytorch_utils import Conv1D

    from mend.editor import available_editors

    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))  # closed-form statistics: computed, not reused
    missing = sorted(set(available_editors()) - set(TINY_EDITORS))
    assert not missing, (f"registered editor(s) {missing} have no tiny-model settings: add a factory to TINY_EDITORS "
                         "in tests/test_editor_contract.py so that the contract test covers them")
    model, tok = tiny(model_name)
    adapter = get_adapter(model)
    requests = [make_request("{} is in", "The tower", " Rome", " Paris"),
                make_request("{} plays", "Bob", " piano", " drums")]
    for name in available_editors():
        editor = TINY_EDITORS[name](model, tok, requests)
        before = param_clones(model)
        result = editor.edit(model, tok, requests)
        assert_params_identical(model, before)  # edit() changes nothing itself
        assert result.deltas or result.patches, f"{name}: neither deltas nor patches"
        for ref, d in result.deltas.items():
            mod = adapter.module(ref)
            d_out, d_in = (mod.nf, mod.nx) if isinstance(mod, Conv1D) else (mod.out_features, mod.in_features)
            assert tuple(d.shape) == (d_out, d_in) == tuple(adapter.get_weight(ref).shape), (name, ref.label)
            assert ref.transposed is (model_name == "tiny-gpt2"), (name, ref.label)
            assert torch.isfinite(d).all(), (name, ref.label)
        ids = tok([r.text for r in requests], return_tensors="pt", padding=True)
        with torch.no_grad():
            out_before = model(**ids).logits
        handle = apply_edit(model, result)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed <= {ref.param for ref in result.deltas}, (name, sorted(changed))
        with torch.no_grad():
            assert not torch.equal(model(**ids).logits, out_before), f"{name}: the edit changes no output"
        handle.restore()
        assert_params_identical(model, before)
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, out_before), f"{name}: outputs not restored"
