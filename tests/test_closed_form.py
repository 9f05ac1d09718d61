"""Closed-form editors end to end on tiny models: the Editor contract, effect on the target, guard, state."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_identical, param_clones
from tolerance import FORWARD, f32_tol

from mend.adapters import get_adapter
from mend.editor import apply_edit, create_editor
from mend.requests import make_request
from mend.scoring import score_targets

FAST = {"stats": {"corpus": "self", "tokens": 1024, "seq_len": 32}, "templates": {"spec": [[4, 2]]},
        "value": {"lr": 0.5, "steps": 15, "weight_decay": 0.0, "clamp_norm_factor": 50.0}, "guard": {"action": "off"}}
LAYERS = {"rome": {"layer": 1}, "r-rome": {"layer": 1}, "memit": {"layers": [1, 2]}, "emmet": {"layers": [1, 2]},
          "alphaedit": {"layers": [1, 2], "null_threshold": 0.5, "null_relative": True}}
REQS = [make_request("{} is in", "The tower", " Rome", " Paris"), make_request("{} plays", "Bob", " piano", " drums")]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))


def _logprobs(model, tok):
    return [s.logprob for s in score_targets(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_editor_contract_and_effect(tiny, model_name, name):
    model, tok = tiny(model_name)
    editor = create_editor(name, FAST, LAYERS[name])
    before_params = param_clones(model)
    before = _logprobs(model, tok)
    result = editor.edit(model, tok, REQS)
    assert_params_identical(model, before_params)  # edit() computes, never changes the model
    adapter = get_adapter(model)
    assert result.deltas
    for ref, d in result.deltas.items():
        assert d.shape == adapter.get_weight(ref).shape and torch.isfinite(d).all()
    assert all(d.abs().max() > 0 for d in result.deltas.values())
    handle = apply_edit(model, result)
    after = _logprobs(model, tok)
    handle.restore()
    # A random tiny model cannot learn a 5-byte target through one position (v*'s loss stays ~log V), so only
    # the mechanics are checked here; efficacy is measured on SmolLM2 (README, bench/).
    assert after != before
    assert_params_identical(model, before_params)


def test_guard_rejects_and_leaves_the_model_unchanged(tiny):
    model, tok = tiny("tiny-llama")
    editor = create_editor("rome", FAST, LAYERS["rome"], {"guard": {"action": "reject", "max_norm_ratio": 1e-9}})
    result = editor.edit(model, tok, REQS[:1])
    assert result.deltas == {} and "rejected" in result.diagnostics["rejected"][0]


@pytest.mark.parametrize("action", ["reject", "warn"])
def test_guard_rejects_an_update_that_raises_heldout_perplexity(tiny, action):
    from locate_edit.common import Guard, GuardSettings

    model, tok = tiny("tiny-llama")
    ref = get_adapter(model).weight_ref(1)
    W = get_adapter(model).get_weight(ref)
    guard = Guard(GuardSettings(action=action, max_norm_ratio=1e9, max_ppl_increase=0.05, text_chunks=2, text_len=8))
    before_params = param_clones(model)
    torch.manual_seed(0)
    wrecking = {ref: 30 * W.norm() * torch.randn_like(W) / W.numel() ** 0.5}
    reason = guard.check(model, tok, wrecking)
    assert (reason is None) if action == "warn" else ("perplexity" in reason)
    assert guard.check(model, tok, {ref: torch.zeros_like(W)}) is None
    assert_params_identical(model, before_params)


def test_guard_remeasures_perplexity_after_the_weights_change(tiny):
    """The guard keeps the perplexity before an update per model state: a state it has not seen is measured."""
    from locate_edit.common import Guard, GuardSettings

    model, tok = tiny("tiny-llama")
    ref = get_adapter(model).weight_ref(1)
    W = get_adapter(model).get_weight(ref)
    guard = Guard(GuardSettings(max_norm_ratio=1e9, max_ppl_increase=0.05, text_chunks=2, text_len=8))
    zero = {ref: torch.zeros_like(W)}
    assert guard.check(model, tok, zero) is None  # measures and keeps the unedited perplexity
    torch.manual_seed(0)
    with torch.no_grad():
        W.add_(30 * W.norm() * torch.randn_like(W) / W.numel() ** 0.5)  # the model itself changes
    assert guard.check(model, tok, zero) is None  # a stale "before" would call this a +5% rise


@pytest.mark.parametrize(("name", "options"), [("alphaedit", {}), ("r-rome", {"memory": 1.0})])
def test_editors_remember_earlier_edits_until_reset(tiny, name, options):
    model, tok = tiny("tiny-llama")
    editor = create_editor(name, FAST, LAYERS[name], options)
    editor.edit(model, tok, REQS[:1])
    assert editor._memory._sums
    editor.reset()
    assert not editor._memory._sums


def test_rome_memory_keeps_earlier_edits_keys(tiny):
    """With ``memory``, a second edit changes the module's output at the first edit's key far less than without."""
    from locate_edit.keys import context_templates, request_keys

    changes = []
    for memory in (0.0, 1e3):
        model, tok = tiny("tiny-llama")
        adapter = get_adapter(model)
        editor = create_editor("r-rome", FAST, LAYERS["r-rome"], {"memory": memory})
        ref = adapter.weight_ref(LAYERS["r-rome"]["layer"], "mlp_out")
        templates = context_templates(model, tok, [[4, 2]], 0)
        k1 = request_keys(model, tok, adapter, ref, REQS[:1], templates)[0][0]
        apply_edit(model, editor.edit(model, tok, REQS[:1]))
        (d2,) = editor.edit(model, tok, REQS[1:2]).deltas.values()
        changes.append(float((d2.double() @ k1.double()).norm() / d2.double().norm()))
    assert changes[1] < 0.1 * changes[0]


def test_rome_single_request_is_rank_one(tiny):
    model, tok = tiny("tiny-llama")
    result = create_editor("rome", FAST, LAYERS["rome"]).edit(model, tok, REQS[:1])
    (d,) = result.deltas.values()
    s = torch.linalg.svdvals(d.double())
    # an exact rank-one update (float64) rounded to float32: d + E, |E| ≤ eps/2·|d| entrywise, so
    # s₁ ≤ ‖E‖₂ ≤ ‖E‖_F ≤ eps/2·‖d‖_F = eps/2·s₀ (× 2)
    assert s[1] <= f32_tol(s[0], safety=1)


def test_rome_several_requests_are_applied_in_turn(tiny):
    model, tok = tiny("tiny-llama")
    editor = create_editor("rome", FAST, LAYERS["rome"])
    result = editor.edit(model, tok, REQS)
    assert len(result.diagnostics["steps"]) == 2 and len(result.deltas) == 1


def test_edit_command_with_rome(tmp_path, capsys):
    import json

    from mend.cli import run
    from mend.edit import USAGE, main

    out = tmp_path / "o.json"
    argv = ["model=tiny-llama", "editor=rome", "editor.layer=1", "editor.stats.corpus=self", "editor.stats.tokens=1024",
            "editor.stats.seq_len=32", "editor.templates.spec=[[4,2]]", "editor.guard.action=off",
            "prompt={} is in", "subject=The tower", "target= Rome", f"json={out}"]
    with pytest.raises(SystemExit) as exc:
        run(main, USAGE, argv)
    assert exc.value.code == 0, capsys.readouterr().err
    (r,) = json.loads(out.read_text())["requests"]
    assert r["p_new_after"] > r["p_new_before"]


def test_realized_values_add_what_the_rank_one_update_writes(tiny, monkeypatch):
    """With ``Realized(u, c)``, δ is added at each row as (uᵀk_row)(δ + c), k_row the module's input there."""
    from locate_edit import values
    from locate_edit.keys import keys_at

    model, tok = tiny("tiny-llama")
    adapter = get_adapter(model)
    ref = adapter.weight_ref(1, "mlp_out")
    d_out, d_in = adapter.get_weight(ref).shape
    g = torch.Generator().manual_seed(0)
    realized = values.Realized(torch.randn(1, d_in, generator=g), torch.randn(1, d_out, generator=g))
    added = []
    plain_add = values.add_to_output

    def spy(module, vector, positions):
        added.append(vector.detach().float().clone())
        return plain_add(module, vector, positions)

    monkeypatch.setattr(values, "add_to_output", spy)
    s = values.ValueSettings(steps=1)  # one forward pass, at δ = 0
    templates = ["{}", "Once upon a time. {}"]
    for r in (None, realized):
        values.optimize_values(model, tok, adapter, REQS[:1], templates, adapter.module(ref), ref.layer, s, r)
    prompts, _, pos, _, _ = values._rows(tok, REQS[:1], templates, s.kl_prompt)  # 2 templates + the KL row
    keys = keys_at(model, tok, adapter, ref, prompts, pos.tolist())
    assert torch.equal(added[0], torch.zeros(3, d_out))
    expected = (keys @ realized.direction[0])[:, None] * realized.offset
    # keys from another pass (FORWARD·eps each), a sum over d_in products, times c: relative to Σ|k||u|·|c|
    mag = ((keys.abs() @ realized.direction[0].abs())[:, None] * realized.offset.abs()).max()
    assert torch.allclose(added[1], expected, rtol=0, atol=f32_tol(mag, safety=FORWARD))


def test_rome_with_realized_values_edits_in_both_key_modes(tiny):
    model, tok = tiny("tiny-llama")
    for name in ("rome", "r-rome"):
        result = create_editor(name, FAST, LAYERS[name], {"realized_values": True}).edit(model, tok, REQS[:1])
        (d,) = result.deltas.values()
        assert torch.isfinite(d).all() and d.abs().max() > 0


def _optimize_one(tiny, templates, **settings):
    """v* for the first request on tiny Llama's layer 1, without weight decay or KL (only the NLL moves δ)."""
    from locate_edit import values

    model, tok = tiny("tiny-llama")
    adapter = get_adapter(model)
    ref = adapter.weight_ref(1, "mlp_out")
    s = values.ValueSettings(weight_decay=0.0, kl_factor=0.0, **settings)
    return values.optimize_values(model, tok, adapter, REQS[:1], templates, adapter.module(ref), ref.layer, s)


def test_value_stop_on_nll_stops_on_the_templates_mean(tiny):
    """``stop_on: nll`` stops once the templates' mean target NLL is below the threshold; an unknown criterion
    (e.g. the removed ``nll_max``) is a configuration error."""
    from mend.errors import ConfigError

    templates = ["{}", "Once upon a time. {}", "It rained all day long in the old town. {}"]
    def run(stop_on, threshold, steps):
        return _optimize_one(tiny, templates, steps=steps, early_stop_loss=threshold, stop_on=stop_on)

    mean0 = run("nll", 0.0, 1).final_loss[0]  # the templates' mean NLL before any step
    assert run("nll", mean0 + 1e-3, 20).steps == [1]
    assert run("nll", 0.0, 3).steps == [3]  # an NLL of 0 is never reached: every step runs
    for bad in ("nl", "nll_max"):
        with pytest.raises(ConfigError, match="stop_on"):
            run(bad, mean0, 1)


def test_value_prompt_nll_also_waits_for_the_request_prompt(tiny):
    """``prompt_nll`` adds a condition to the stop: the bare prompt's target NLL must be below it too, so a
    threshold it cannot reach runs every step and one it already meets changes nothing."""
    def run(prompt_nll):
        return _optimize_one(tiny, ["{}", "Once upon a time. {}"], steps=5, early_stop_loss=1e9, stop_on="nll",
                             prompt_nll=prompt_nll)

    assert run(None).steps == [1]
    assert run(1e9).steps == [1]
    assert run(0.0).steps == [5]


def test_value_shrink_finds_the_smallest_fraction_that_still_meets_the_stop():
    """``_shrink`` bisects each δ's scale in (0, 1]: with a stop met from 30% of δ's length on, it returns δ scaled
    to within 2⁻ⁿ above 0.3; a δ that never met the stop is left as it is."""
    from locate_edit.values import _shrink

    delta = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    met = torch.tensor([True, True, False])

    def objective(d):
        return None, d.norm(dim=1) >= 0.3 * delta.norm(dim=1)

    out = _shrink(delta, met, objective, 10)
    frac = out.norm(dim=1) / delta.norm(dim=1)
    # out = δ·f (one rounding), frac from two norms of 5 entries, the division: a few eps of |δ|
    assert torch.allclose(out / frac[:, None], delta, rtol=0, atol=f32_tol(delta.abs().max(), terms=5))  # same directions
    assert ((frac[:2] >= 0.3) & (frac[:2] <= 0.3 + 2**-10)).all()
    assert frac[2] == 1


def test_value_shrink_scales_the_optimised_delta_down(tiny):
    """With ``shrink_steps`` the same optimisation ends with a shorter δ in the same direction."""
    templates = ["{}", "Once upon a time. {}"]
    start = _optimize_one(tiny, templates, steps=1, early_stop_loss=0.0, stop_on="nll").final_loss[0]
    kw = dict(steps=20, early_stop_loss=start - 0.02, stop_on="nll", clamp_norm_factor=1e4)  # tiny moves little
    plain = _optimize_one(tiny, templates, **kw)
    short = _optimize_one(tiny, templates, shrink_steps=6, **kw)
    assert plain.steps == short.steps and plain.steps[0] < 20  # the stop was met
    ratio = float(short.delta.norm() / plain.delta.norm())
    assert 0 < ratio < 1
    # short = plain · f (one rounding); ratio from two norms of all entries, then one product: a few eps of |δ|
    tol = f32_tol(plain.delta.abs().max(), terms=plain.delta.numel())
    assert torch.allclose(short.delta, ratio * plain.delta, rtol=0, atol=tol)


def test_removed_value_and_rome_options_are_refused(tiny):
    """``value.optimizer`` and ROME's ``ridge`` were measured and rejected (docs/experiments): they are gone."""
    from mend.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer"):
        create_editor("rome", {"value": {"optimizer": "gd"}})
    with pytest.raises(ConfigError, match="ridge"):
        create_editor("r-rome", {"ridge": 1.0})


def test_rome_v_base_key(tiny):
    """``v_base: key`` takes v* from the key the update is normalised by: for ROME (normalised by the prompt's own
    key) that changes nothing, for r-ROME (the averaged key) it does; an unknown base is refused."""
    from mend.errors import ConfigError

    got = {}
    for name in ("rome", "r-rome"):
        for base in ("prompt", "key"):
            model, tok = tiny("tiny-llama")
            (d,) = create_editor(name, FAST, LAYERS[name], {"v_base": base}).edit(model, tok, REQS[:1]).deltas.values()
            got[name, base] = d
    # ROME: the same update from separate runs (rounding only); r-ROME: a different one, far beyond rounding
    rome, rrome = got["rome", "prompt"], got["r-rome", "prompt"]
    assert torch.allclose(got["rome", "key"], rome, rtol=0, atol=f32_tol(rome.abs().max(), safety=FORWARD))
    assert (got["r-rome", "key"] - rrome).norm() > 100 * f32_tol(rrome.norm(), safety=FORWARD)
    with pytest.raises(ConfigError, match="v_base"):
        create_editor("r-rome", FAST, LAYERS["r-rome"], {"v_base": "average"})
