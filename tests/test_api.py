"""The Python API at the top of the package (README, "Python")."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import assert_params_identical, param_clones

import mend

_SMALL_ROME = {"layer": 1, "stats": {"corpus": "self", "tokens": 256, "seq_len": 32}, "templates": {"spec": [[4, 2]]},
               "value": {"steps": 3}, "guard": {"action": "off"}}


def test_every_documented_name_is_there():
    for name in ("load_model", "EditRequest", "create_editor", "apply_edit", "edited", "evaluate", "EditResult"):
        assert hasattr(mend, name), name
    assert callable(mend.evaluate)
    with pytest.raises(AttributeError):
        mend.no_such_name  # noqa: B018


def test_edit_apply_export_and_evaluate_on_a_tiny_model(tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model, tok = mend.load_model("tiny-llama")
    editor = mend.create_editor("rome", model=model, **_SMALL_ROME)
    assert editor.config.layer == 1 and editor.config.value.steps == 3
    request = mend.EditRequest("{} is known for", "The tower", " Rome")
    result = editor.edit(model, tok, [request])
    before = param_clones(model)
    with mend.edited(model, result):
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed == [ref.param for ref in result.deltas]
    assert_params_identical(model, before)
    result.save(tmp_path / "edit.safetensors")
    assert mend.EditResult.load(tmp_path / "edit.safetensors").deltas.keys() == result.deltas.keys()
    result.to_peft(tmp_path / "lora", model)
    assert isinstance(PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "lora")), PeftModel)

    table = mend.evaluate(["ft"], model=(model, tok), data="builtin", limit=2, drawdown={"source": "none"},
                          settings={"ft": {"layers": [1], "steps": 2}})
    assert set(table.metrics) == {"unedited", "ft"} and table.results["dataset"]["n"] == 2
    assert "| ft |" in str(table)
    assert_params_identical(model, before)


def test_create_editor_applies_the_model_defaults_without_loading_the_model():
    rome = mend.create_editor("rome", model="smollm2-135m")
    assert rome.config.layer == 4  # configs/model/smollm2-135m.yaml
    assert mend.create_editor("rome", model="smollm2-135m", layer=7).config.layer == 7
    with pytest.raises(mend.errors.ConfigError, match="unknown editor"):
        mend.create_editor("no-such-editor")
    with pytest.raises(mend.errors.ConfigError, match="model must be"):
        mend.create_editor("rome", model=3)


def test_evaluate_stays_callable_when_the_command_module_is_imported():
    code = ("import mend, mend.evaluate\nfrom mend.evaluate import main\nimport mend.evaluate as m\n"
            "assert callable(mend.evaluate) and m is mend.evaluate and m.evaluate.__name__ == 'evaluate'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
