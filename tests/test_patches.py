"""Forward patches in an EditResult: installed by apply_edit, removed exactly by restore, replaced by key."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_identical, param_clones

from mend.editor import EditResult, ForwardPatch, apply_edit, edited
from mend.errors import MendError


def _shift(amount: float, module: str = "model.norm") -> ForwardPatch:
    """A patch that adds ``amount`` to a module's output."""
    def wrap(forward):
        def patched(*args, **kwargs):
            return forward(*args, **kwargs) + amount
        return patched
    return ForwardPatch(module, wrap)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_patch_changes_outputs_and_restore_is_exact(tiny):
    model, _ = tiny("tiny-llama")
    base, params = _logits(model), param_clones(model)
    handle = apply_edit(model, EditResult({}, patches={"memory": _shift(1.0)}))
    assert not torch.equal(_logits(model), base)
    assert_params_identical(model, params)  # a patch leaves the weights alone
    handle.restore()
    assert torch.equal(_logits(model), base)
    assert "forward" not in model.model.norm.__dict__  # the class's forward again, not a copy of it


def test_a_patch_with_the_same_key_replaces_the_earlier_one(tiny):
    model, _ = tiny("tiny-llama")
    base = _logits(model)
    with torch.no_grad():
        h1 = apply_edit(model, EditResult({}, patches={"memory": _shift(1.0)}))
        once = _logits(model)
        h2 = apply_edit(model, EditResult({}, patches={"memory": _shift(2.0)}))
        twice_key = _logits(model)
        h3 = apply_edit(model, EditResult({}, patches={"other": _shift(1.0)}))  # another key stacks
        stacked = _logits(model)
    assert not torch.equal(once, base)
    h3.restore()
    assert torch.equal(_logits(model), twice_key)
    assert not torch.equal(stacked, twice_key)
    h2.restore()  # the earlier patch comes back
    assert torch.equal(_logits(model), once)
    h1.restore()
    assert torch.equal(_logits(model), base)
    with edited(model, EditResult({}, patches={"x": _shift(2.0)})):  # the replacement alone, not +1 then +2
        assert torch.equal(_logits(model), twice_key)


def test_replacing_a_patch_that_another_wraps_is_refused_and_changes_nothing(tiny):
    model, _ = tiny("tiny-llama")
    base = _logits(model)
    h1 = apply_edit(model, EditResult({}, patches={"memory": _shift(1.0)}))
    h2 = apply_edit(model, EditResult({}, patches={"other": _shift(1.0)}))
    before = _logits(model)
    with pytest.raises(MendError, match="another patch wraps it"):
        apply_edit(model, EditResult({}, patches={"memory": _shift(5.0)}))
    assert torch.equal(_logits(model), before)
    h2.restore()
    h1.restore()
    assert torch.equal(_logits(model), base)


def test_patches_with_deltas_and_an_unknown_module(tiny):
    from mend.adapters import get_adapter

    model, _ = tiny("tiny-llama")
    base, params = _logits(model), param_clones(model)
    ref = get_adapter(model).weight_ref(1, "mlp_out")
    delta = torch.full(get_adapter(model).get_weight(ref).shape, 0.01)
    with edited(model, EditResult({ref: delta}, patches={"m": _shift(1.0)})):
        assert not torch.equal(_logits(model), base)
    assert torch.equal(_logits(model), base)
    assert_params_identical(model, params)
    with pytest.raises(MendError, match="no module"):
        apply_edit(model, EditResult({ref: delta}, patches={"m": _shift(1.0, "model.nowhere")}))
    assert_params_identical(model, params)  # the deltas applied before the failure are undone too


def test_patched_edits_cannot_be_saved_or_exported(tiny, tmp_path):
    model, _ = tiny("tiny-llama")
    result = EditResult({}, patches={"memory": _shift(1.0)})
    with pytest.raises(MendError, match="forward patches"):
        result.save(tmp_path / "x.safetensors")
    with pytest.raises(MendError, match="forward patches"):
        result.to_peft(tmp_path / "lora", model)


def test_combine_keeps_the_last_patch_of_each_key():
    a, b, c = _shift(1.0), _shift(2.0), _shift(3.0)
    combined = EditResult.combine([EditResult({}, patches={"m": a}), EditResult({}, patches={"m": b, "n": c})])
    assert combined.patches == {"m": b, "n": c}
