"""Shortcuts that must equal the full computation: target-only logits, partial forward, weight-delta hooks."""

from __future__ import annotations

import pytest
import torch
from tolerance import FORWARD, f32_tol

from mend.adapters import get_adapter
from mend.adapters.partial import run_until, start_at_layer, stop_after
from mend.hooks import capture, weight_deltas
from mend.scoring import forward_target_logits, make_batch, target_logits

DECODERS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]


@pytest.mark.parametrize("name", [*DECODERS, "tiny-t5"])
def test_target_only_logits_equal_full_logits(tiny, name):
    model, tok = tiny(name)
    batch = make_batch(tok, ["The tower is in", "A"], [" Rome", " long target"], model)
    full = target_logits(model(**batch.inputs).logits, batch)
    # the same logits from passes of another shape (rounding: a few eps × the logits' size)
    assert torch.allclose(forward_target_logits(model, batch), full, rtol=0,
                          atol=f32_tol(full.abs().max(), safety=FORWARD))


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("layer", [1, 3])
def test_start_at_layer_reproduces_the_full_forward(tiny, name, layer):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    full = model(input_ids=ids, attention_mask=mask).logits
    with capture({"b": adapter.block(layer)}) as cap:
        run_until(model, adapter.block(layer), input_ids=ids, attention_mask=mask)
    calls = []
    hook = adapter.block(0).register_forward_hook(lambda *a: calls.append(1))
    try:
        with start_at_layer(adapter, layer, cap["b"].input):
            calls.clear()  # entering probes the block's output structure once
            part = model(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    assert torch.equal(part, full)
    assert not calls  # the lower blocks were skipped
    assert [type(b).__name__ for b in adapter.blocks()].count("_PassThrough") == 0  # restored


def test_stop_after_skips_upper_blocks(tiny):
    model, _ = tiny("tiny-llama")
    adapter = get_adapter(model)
    seen = []
    hook = adapter.block(3).register_forward_hook(lambda *a: seen.append(1))
    try:
        with stop_after(adapter.block(1)):
            model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        hook.remove()
    assert not seen


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_weight_delta_hook_equals_changed_weight(tiny, name):
    model, tok = tiny(name)
    adapter = get_adapter(model)
    ref = adapter.weight_refs(kinds=["mlp_out"], layers=[1])[0]
    delta = torch.randn(adapter.get_weight(ref).shape, generator=torch.Generator().manual_seed(0)) * 0.1
    batch = make_batch(tok, ["The tower is in"], [" Rome"], model)
    with weight_deltas([(adapter.module(ref), delta)]):
        hooked = model(**batch.inputs).logits
    with torch.no_grad():
        adapter.parameter(ref).add_(adapter.to_stored(ref, delta))
    changed = model(**batch.inputs).logits
    # W x + Δ x and (W + Δ) x round differently: forward passes agree to a few eps × the logits' size
    assert torch.allclose(hooked, changed, rtol=0, atol=f32_tol(changed.abs().max(), safety=FORWARD))


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_cached_rows_give_the_full_rows_logits(tiny, name):
    """The suffix rows, run on the cached prefix, predict the targets exactly as the full rows do; a row split at
    0 (no prefix) and rows of different lengths included, and the same with a vector added at the split token."""
    from locate_edit.prefix import forward_keeping_cache, split_batch
    from mend.hooks import add_to_output

    model, tok = tiny(name)
    adapter = get_adapter(model)
    batch = make_batch(tok, ["Once upon a time the tower is in", "A", "The long prompt is in"],
                       [" Rome", " long target", " X"], model)
    split = torch.tensor([12, 0, 9])
    kept, kv = forward_keeping_cache(model, batch)
    rows = split_batch(model, batch, split, kv, min_saving=0.0)
    assert rows is not None and rows.suffix.inputs["input_ids"].shape[1] < batch.inputs["input_ids"].shape[1]
    full = forward_target_logits(model, batch)
    assert torch.equal(kept, full)  # keeping the cache does not change the pass
    mask = batch.target_mask
    # cached keys / values and shorter rows: other shapes, the same logits up to a few eps × their size
    tol = f32_tol(full[mask].abs().max(), safety=FORWARD)
    assert torch.allclose(forward_target_logits(model, rows.batch())[mask], full[mask], rtol=0, atol=tol)
    vec = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    module = adapter.module(adapter.weight_ref(1))
    with add_to_output(module, vec, split):
        full_added = forward_target_logits(model, batch)
    with add_to_output(module, vec, torch.zeros(3, dtype=torch.long)):
        cached_added = forward_target_logits(model, rows.batch())
    assert not torch.allclose(full_added, full)
    assert torch.allclose(cached_added[mask], full_added[mask], rtol=0,
                          atol=f32_tol(full_added[mask].abs().max(), safety=FORWARD))


def test_prefix_caching_needs_a_decoder_and_a_saving(tiny):
    from locate_edit.prefix import forward_keeping_cache, split_batch

    model, tok = tiny("tiny-t5")
    batch = make_batch(tok, ["The tower is in"], [" Rome"], model)
    assert forward_keeping_cache(model, batch)[1] is None
    model, tok = tiny("tiny-llama")
    batch = make_batch(tok, ["The tower is in"], [" Rome"], model)
    _, kv = forward_keeping_cache(model, batch)
    assert split_batch(model, batch, torch.tensor([1]), kv) is None  # saves one token of twenty
    assert split_batch(model, batch, torch.tensor([0]), kv, min_saving=0.0) is None  # nothing to cache


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_values_optimised_on_cached_prefixes_equal_the_full_ones(tiny, name, monkeypatch):
    from locate_edit import values
    from locate_edit.values import ValueSettings, optimize_values
    from mend.requests import EditRequest

    used = []
    real = values.cached_rows
    monkeypatch.setattr(values, "cached_rows", lambda *a: used.append(real(*a)) or used[-1])
    model, tok = tiny(name)
    adapter = get_adapter(model)
    ref = adapter.weight_ref(1)
    req = EditRequest(prompt="The {} is located in", subject="Eiffel Tower", target_new=" Rome")
    templates = ["{}", "Once upon a time there was a story. {}", "It was a dark night. {}"]
    got = []
    for cached in (False, True):
        s = ValueSettings(steps=4, early_stop_loss=0.0, prefix_cache=cached)
        got.append(optimize_values(model, tok, adapter, [req], templates, adapter.module(ref), ref.layer, s))
    assert len(used) == 1 and used[0] is not None  # the second run did run on cached prefixes
    assert got[0].delta.abs().max() > 0
    # 4 optimiser steps, each on a gradient summed over 4 rows (3 templates, the KL prompt) from passes of other
    # shapes; Adam scales every coordinate's step to ~lr whatever its gradient's size, so rounding is not damped:
    # worst case, the 16 contributions of FORWARD·eps × |δ| add up
    tol = f32_tol(got[0].delta.abs().max(), terms=4 * 4, safety=FORWARD, worst_case=True)
    assert torch.allclose(got[1].delta, got[0].delta, rtol=0, atol=tol)
    assert got[1].final_loss == pytest.approx(got[0].final_loss, abs=f32_tol(max(got[0].final_loss), safety=FORWARD))


def test_prefix_caching_falls_back_to_full_rows_when_it_does_not_reproduce_them(tiny, monkeypatch, caplog):
    from locate_edit import prefix

    model, tok = tiny("tiny-llama")
    batch = make_batch(tok, ["Once upon a time the tower is in"], [" Rome"], model)
    real = prefix.split_batch

    def shifted(*a, **k):  # wrong position ids: not the full rows' computation
        rows = real(*a, **k)
        rows.suffix.inputs["position_ids"] = rows.suffix.inputs["position_ids"] + 3
        return rows

    monkeypatch.setattr(prefix, "_checked", {})
    monkeypatch.setattr(prefix, "split_batch", shifted)
    full, kv = prefix.forward_keeping_cache(model, batch)
    assert prefix.cached_rows(model, batch, torch.tensor([12]), full, kv) is None
    assert "does not reproduce" in caplog.text
    assert prefix.cached_rows(model, batch, torch.tensor([12]), full, kv) is None  # decided once per model
    monkeypatch.setattr(prefix, "_checked", {})
    monkeypatch.setattr(prefix, "split_batch", real)
    assert prefix.cached_rows(model, batch, torch.tensor([12]), full, kv) is not None
