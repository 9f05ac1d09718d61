"""Shortcuts that must equal the full computation: target-only logits, partial forward, weight-delta hooks."""

from __future__ import annotations

import pytest
import torch

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
    assert torch.allclose(forward_target_logits(model, batch), full, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("layer", [1, 3])
def test_start_at_layer_reproduces_the_full_forward(tiny, name, layer):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    ids = torch.randint(0, 250, (2, 7))
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
    delta = torch.randn_like(adapter.get_weight(ref)) * 0.1
    batch = make_batch(tok, ["The tower is in"], [" Rome"], model)
    with weight_deltas([(adapter.module(ref), delta)]):
        hooked = model(**batch.inputs).logits
    with torch.no_grad():
        adapter.parameter(ref).add_(adapter.to_stored(ref, delta))
    changed = model(**batch.inputs).logits
    assert torch.allclose(hooked, changed, atol=1e-5)
