"""The MALMEN editor (mend.learned.malmen.editor) on tiny models: exact writes at the keys, sequential key memory,
lifelong statistics, the preservation matrix, and a model sharded by accelerate."""

from __future__ import annotations

import pytest
import torch
from tolerance import FORWARD, f32_tol

from locate_edit.solvers import ridge_system, ridge_update
from mend.adapters import get_adapter
from mend.editor import apply_edit
from mend.errors import ConfigError
from mend.requests import make_request

F64 = torch.float64
REQS = [make_request("{} is located in", "The tower", " Rome", " Paris"),
        make_request("{} plays the", "Bob", " piano", " drums"),
        make_request("{} was born in", "Alice", " Oslo", " Lima")]


# --- the editor on tiny models --------------------------------------------------------------------------------------
def _editor(model, tok, refs, **cfg):
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.malmen.editor import MalmenConfig, untrained_malmen

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return untrained_malmen(model, tok, refs, HypernetConfig(rank=8, positions="target", alpha_init=1.0, precondition=False), REQS,
                            ids, lambda_init=1.0, config=MalmenConfig(**cfg))


def _factors_and_shifts(editor, model, tok, refs, requests):
    from mend.learned.malmen.solve import batched_factors, shifts
    from mend.scoring import make_batch

    batch = make_batch(tok, [r.text for r in requests], [r.target_new for r in requests], model)
    factors = batched_factors(model, get_adapter(model), refs, batch, 2, "target")
    hn = editor._hypernet
    with torch.no_grad():
        return {r.label: (*factors[r.label], shifts(hn, r.label, *factors[r.label], 4)) for r in refs}


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_one_weight_tiny_lambda_writes_the_predicted_values_at_the_keys(tiny, model_name):
    """One edited weight (its input does not depend on it), λ → 0: ΔW maps every kept key to its predicted shift,
    and after apply_edit the module's output at those positions moved by exactly D."""
    model, tok = tiny(model_name)
    adapter = get_adapter(model)
    refs = adapter.weight_refs(["mlp_out"], [-1])
    editor = _editor(model, tok, refs, lifelong_norm=False, memory=False)
    (u, d, D), = _factors_and_shifts(editor, model, tok, refs, REQS[:1]).values()
    assert 0 < u.shape[0] < u.shape[1]  # fewer keys than inputs: an exact fit exists
    editor.config.lam = 1e-8 * float((u * u).sum()) / u.shape[1]
    before = _module_out(model, adapter, refs[0], tok, REQS[0])
    result = editor.edit(model, tok, REQS[:1])
    handle = apply_edit(model, result)
    after = _module_out(model, adapter, refs[0], tok, REQS[0])
    handle.restore()
    dW = result.deltas[refs[0]].double()
    # ΔW at the keys: D up to the float32 rounding of ΔW's entries, summed over d_in terms
    fit = (dW @ u.T.double()).T
    assert (fit - D.double()).abs().max() <= f32_tol(float(D.abs().max()), u.shape[1])
    moved = (after - before)[0][_kept_positions(model, tok, REQS[0])].double()
    scale = max(float(after.abs().max()), float(D.abs().max()))
    assert (moved - D.double()).abs().max() <= f32_tol(scale, u.shape[1], safety=FORWARD)


def _module_out(model, adapter, ref, tok, req):
    outs = []
    h = adapter.module(ref).register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(**_inputs(tok, model, req))
    finally:
        h.remove()
    return outs[-1]


def _inputs(tok, model, req):
    from mend.scoring import make_batch

    return make_batch(tok, [req.text], [req.target_new], model).inputs


def _kept_positions(model, tok, req):
    from mend.learned.factors import target_positions
    from mend.scoring import make_batch

    batch = make_batch(tok, [req.text], [req.target_new], model)
    return target_positions(model, batch, None)[0]


def test_sequential_calls_keep_earlier_keys_and_reset_forgets(tiny):
    model, tok = tiny("tiny-llama")
    refs = get_adapter(model).weight_refs(["mlp_out"], [-2, -1])
    editor = _editor(model, tok, refs, lifelong_norm=False, memory=True)
    first = _factors_and_shifts(editor, model, tok, refs, REQS[:1])
    r1 = editor.edit(model, tok, REQS[:1])
    handle = apply_edit(model, r1)
    second = _factors_and_shifts(editor, model, tok, refs, REQS[1:])
    r2 = editor.edit(model, tok, REQS[1:])
    handle.restore()
    hn = editor._hypernet
    for ref in refs:
        u1, u2, D2 = first[ref.label][0].double(), second[ref.label][0], second[ref.label][2]
        want = ridge_update(ridge_system(u2.T, hn.lam(ref.label).item(), hn.preservation(ref.label), u1.T @ u1),
                            D2.T.double())
        got = r2.deltas[ref].double()
        assert (got - want).abs().max() <= f32_tol(want.abs().max(), u2.shape[1])
    editor.reset()
    assert editor._memory.get(refs[0]) is None
    again = editor.edit(model, tok, REQS[:1])
    for ref in refs:
        assert torch.equal(again.deltas[ref], r1.deltas[ref])


def test_lifelong_norm_updates_statistics_until_reset(tiny):
    model, tok = tiny("tiny-llama")
    refs = get_adapter(model).weight_refs(["mlp_out"], [-1])
    editor = _editor(model, tok, refs)
    count = lambda: float(next(iter(editor._hypernet.stats_u.values())).count)  # noqa: E731
    n0 = count()
    first = editor.edit(model, tok, REQS[:2])
    assert count() > n0
    editor.reset()
    assert count() == n0
    assert all(torch.equal(a, b) for a, b in zip(first.deltas.values(), editor.edit(model, tok, REQS[:2]).deltas.values()))


def test_preservation_matrix_mixes_text_and_fact_keys(tiny):
    """M = regularize(½ C_text + ½ C_facts · tr C_text / tr C_facts); C_facts is E[k kᵀ] at the answer positions."""
    from locate_edit.solvers import regularize
    from mend.learned.factors import target_positions
    from mend.learned.malmen.hypernet import KeyMoment
    from mend.learned.malmen.solve import fact_moments
    from mend.scoring import make_batch

    model, tok = tiny("tiny-llama")
    adapter = get_adapter(model)
    refs = adapter.weight_refs(["mlp_out"], [-1])
    prompts, targets = [r.text for r in REQS], [r.target_true for r in REQS]
    got = fact_moments(model, adapter, refs, prompts, targets, tok, rows=2)[refs[0].label]
    keys = []
    h = adapter.module(refs[0]).register_forward_hook(lambda m, a, o: keys.append(a[0].detach()))
    batch = make_batch(tok, prompts, targets, model)
    with torch.no_grad():
        model(**batch.inputs)
    h.remove()
    K = keys[0][target_positions(model, batch, refs[0])].double()
    want = K.T @ K / K.shape[0]
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    d = want.shape[0]
    g = torch.Generator().manual_seed(3)
    A = torch.randn(d, d, generator=g, dtype=F64)
    C_text = A @ A.T / d
    m = KeyMoment(d)
    m.fit(C_text, 0.01, True, want)
    mixed = 0.5 * C_text + 0.5 * want * C_text.trace() / want.trace()
    assert (m.M.double() - regularize(mixed, 0.01)).abs().max() <= f32_tol(mixed.abs().max(), 1, safety=2)


# --- past one device -------------------------------------------------------------------------------------------------
def test_device_map_shards_with_accelerate_and_edits_the_same(tiny):
    """model.device_map=auto goes through accelerate (infer_auto_device_map + dispatch_model); on this machine's
    single device the sharded model edits exactly as the plain one."""
    from mend.models import load_model

    plain, tok = tiny("tiny-llama")
    torch.manual_seed(0)  # as the tiny fixture: the same random weights
    sharded, _ = load_model("tiny-llama", device_map="auto")
    assert sharded.hf_device_map
    refs = get_adapter(plain).weight_refs(["mlp_out"], [-1])
    a = _editor(plain, tok, refs, lifelong_norm=False).edit(plain, tok, REQS)
    b = _editor(sharded, tok, refs, lifelong_norm=False).edit(sharded, tok, REQS)
    assert all(torch.equal(a.deltas[r], b.deltas[r]) for r in a.deltas)
    with pytest.raises(ConfigError, match="device_map"):
        load_model("tiny-llama", device_map="everywhere")
