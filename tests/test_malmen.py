"""MALMEN (mend.learned.malmen.solve, mend.learned.malmen.editor): the ridge solve against its float64 definition, exact writes at the
keys, memory flat in the number of edits per step, train / save / reload / edit, sequential key memory and
refusals."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import assert_params_identical, param_clones
from safetensors.torch import load_file
from tolerance import FORWARD, f32_tol

from locate_edit.solvers import alphaedit_update, memit_update, ridge_backward, ridge_system, ridge_update
from mend.adapters import get_adapter
from mend.editor import apply_edit, create_editor
from mend.errors import ConfigError, MendError
from mend.requests import make_request

F64 = torch.float64
REQS = [make_request("{} is located in", "The tower", " Rome", " Paris"),
        make_request("{} plays the", "Bob", " piano", " drums"),
        make_request("{} was born in", "Alice", " Oslo", " Lima")]
TINY_MALMEN = ["method=malmen", "trainer.batch_size=2", "data.val_limit=4", "data.variants=1", "norm_warmup=2",
               "hypernet.rank=16", "hypernet.positions=target", "hypernet.precondition_tokens=256",
               "edit.kinds=[mlp_out]", "edit.layers=[-2,-1]", "trainer.progress=false", "eval.enabled=false",
               "trainer.threads=1", "malmen.loss_rows=3", "malmen.chunk_tokens=4", "malmen.fact_rows=8"]


def _definition(K: torch.Tensor, R: torch.Tensor, lam: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    eye = torch.eye(K.shape[0], dtype=F64)
    return R @ K.T @ torch.linalg.inv(K @ K.T + lam * (eye if C is None else C))


# --- the solve ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 40])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 10.0])
def test_ridge_update_solves_its_normal_equations(n, lam):
    g = torch.Generator().manual_seed(n)
    K, R = torch.randn(24, n, generator=g, dtype=F64), torch.randn(16, n, generator=g, dtype=F64)
    dW = ridge_update(ridge_system(K, lam), R)
    want = _definition(K, R, torch.tensor(lam, dtype=F64))
    # float64 throughout: the error is the conditioning of KKᵀ + λI (≤ ~1e4 here) times the unit roundoff
    assert (dW - want).norm() / want.norm() < 1e-10
    assert ((dW @ K - R) @ K.T + lam * dW).norm() / (R @ K.T).norm() < 1e-10  # stationarity
    assert torch.allclose(dW, memit_update(torch.eye(24, dtype=F64), K, R, lam), rtol=0, atol=1e-12 * want.abs().max())
    Kp = torch.randn(24, 5, generator=g, dtype=F64)
    with_prev = ridge_update(ridge_system(K, lam, C_prev=Kp @ Kp.T), R)
    assert torch.allclose(with_prev, alphaedit_update(torch.eye(24, dtype=F64), K, R, Kp @ Kp.T, lam),
                          rtol=0, atol=1e-10 * with_prev.abs().max())


def test_ridge_backward_is_the_gradient_of_the_definition():
    g = torch.Generator().manual_seed(1)
    K, R = torch.randn(12, 7, generator=g, dtype=F64), torch.randn(5, 7, generator=g, dtype=F64)
    A = torch.randn(12, 12, generator=g, dtype=F64)
    C = A @ A.T / 12 + 0.1 * torch.eye(12, dtype=F64)
    G = torch.randn(5, 12, generator=g, dtype=F64)
    for M in (None, C):
        lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
        Rg = R.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda r, la, M=M: _definition(K, r, la, M), (Rg, lam))
        want_R, want_lam = torch.autograd.grad((G * _definition(K, Rg, lam, M)).sum(), (Rg, lam))
        system = ridge_system(K, 0.7, M)
        gR, g_lam = ridge_backward(system, G, ridge_update(system, R))
        assert torch.allclose(gR, want_R, rtol=1e-10, atol=1e-12) and torch.allclose(g_lam, want_lam, rtol=1e-10)


def test_ridge_keeps_float32_and_one_key_writes_its_value():
    """Sherman–Morrison: one key gives ΔW u = d ‖u‖²/(‖u‖² + λ); λ → 0 writes d exactly."""
    g = torch.Generator().manual_seed(2)
    u, d = torch.randn(30, 1, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    for lam in (1e-3, 1.0):
        dW = ridge_update(ridge_system(u, lam), d)
        s = float(u.norm() ** 2)
        assert (dW @ u - d * s / (s + lam)).norm() <= 1e-12 * d.norm()
    dW = ridge_update(ridge_system(u, 1e-12 * float(u.norm() ** 2)), d)
    assert (dW @ u - d).norm() <= 1e-10 * d.norm()
    out = ridge_update(ridge_system(u.float(), 1.0), d.float())
    assert out.dtype == torch.float32


# --- the editor on tiny models --------------------------------------------------------------------------------------
def _editor(model, tok, refs, **cfg):
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.malmen.editor import MalmenConfig, untrained_malmen

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return untrained_malmen(model, tok, refs, HypernetConfig(rank=8, positions="target", alpha_init=1.0), REQS,
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


# --- memory of a training step --------------------------------------------------------------------------------------
def _saved_peak(fn) -> int:
    """Peak bytes of the tensors autograd saves while ``fn`` runs (each counted until its graph is freed)."""
    live, peak = [0], [0]

    class Box:
        __slots__ = ("t", "__weakref__")

    def drop(n: int) -> None:
        live[0] -= n

    def pack(t: torch.Tensor) -> Box:
        b = Box()
        b.t = t
        n = t.numel() * t.element_size()
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(b, drop, n)
        return b

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        fn()
    return peak[0]


def _step_peak(model, tok, n_edits: int, loss_rows: int, chunk_tokens: int) -> int:
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.malmen.hypernet import MalmenHypernet
    from mend.learned.malmen.solve import LossPlan, MalmenSection, meta_step
    from mend.learned.module import weight_specs
    from mend.learned.upper_blocks import UpperBlocks
    from mend.scoring import make_batch

    adapter = get_adapter(model)
    refs = adapter.weight_refs(["mlp_out"], [-2, -1])
    torch.manual_seed(0)
    hn = MalmenHypernet(weight_specs(model, refs), HypernetConfig(rank=16, positions="target"), 1.0)
    for r in refs:
        d_in = hn._spec(r.label).d_in
        hn.set_preconditioner(r.label, torch.eye(d_in))
        hn.update_stats(r.label, torch.randn(8, d_in), torch.randn(8, hn._spec(r.label).d_out))
    g = torch.Generator().manual_seed(n_edits)
    words = [" Rome", " Paris", " piano", " drums", " Oslo", " Lima", " red", " blue"]
    prompts = [f"Fact {i} is about" for i in range(3 * n_edits)]
    targets = [words[int(torch.randint(0, 8, (), generator=g))] for _ in prompts]
    tb = make_batch(tok, prompts, targets, model)
    from mend.learned.factors import target_tokens

    rows, _ = target_tokens(tb)
    kind = torch.where(rows < 2 * n_edits, -1, 0)
    plan = LossPlan(2 * n_edits, kind, 1.0, 1.0, None)
    settings = MalmenSection(loss_rows=loss_rows, chunk_tokens=chunk_tokens)
    upper = UpperBlocks(adapter, refs)
    return _saved_peak(lambda: meta_step(hn, model, adapter, refs, upper, tb, n_edits, plan, settings,
                                         lambda t: t.backward(), update_stats=False))


def test_training_step_memory_is_flat_in_the_number_of_edits(tiny):
    """Split backward: the autograd graphs alive at once hold one chunk of rows or tokens, so the peak of saved
    tensors with 64 edits per step is that of 8 (the factor edit pass is per step: capped by loss_rows here);
    without chunking (one chunk of everything) the same measure grows with the edits."""
    model, tok = tiny("tiny-llama")
    model.requires_grad_(False)
    flat8, flat64 = _step_peak(model, tok, 8, 4, 16), _step_peak(model, tok, 64, 4, 16)
    whole8, whole64 = _step_peak(model, tok, 8, 10**6, 10**6), _step_peak(model, tok, 64, 10**6, 10**6)
    assert whole64 > 4 * whole8  # the measure sees growth
    assert flat64 <= 1.25 * flat8, (flat8, flat64)


# --- train, save, reload, edit -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def malmen_run(tmp_path_factory):
    from mend.train import main

    out = tmp_path_factory.mktemp("malmen") / "run"
    assert main([*TINY_MALMEN, "model=tiny-llama", "trainer.max_steps=2", "trainer.val_check_interval=1",
                 f"out={out}"]) == 0
    return out


def test_train_saves_an_editor_that_reloads_and_edits(malmen_run, tiny):
    metrics = json.loads((malmen_run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "val/edit_success" in metrics["last_logged"]
    state = load_file(str(malmen_run / "editor.safetensors"))
    assert {"log_lambda", "log_alpha"} <= set(state) and any(k.startswith("moment.") for k in state)
    assert bool(state[next(k for k in state if k.endswith(".fitted"))])
    model, tok = tiny("tiny-llama")
    before = param_clones(model)
    a = create_editor("malmen", {"checkpoint": str(malmen_run)}).edit(model, tok, REQS)
    b = create_editor("malmen", {"checkpoint": str(malmen_run)}).edit(model, tok, REQS)
    assert_params_identical(model, before)
    assert a.deltas and all(torch.equal(a.deltas[r], b.deltas[r]) for r in a.deltas)
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in a.deltas.values())
    handle = apply_edit(model, a)
    handle.restore()
    assert_params_identical(model, before)


@pytest.mark.parametrize("mode", ["batch", "sequential"])
def test_the_evaluator_drives_malmen_in_batch_and_sequential_mode(malmen_run, tmp_path, capsys, mode):
    """python -m mend.evaluate with the run directory, like every editor; sequential batches of 2 requests."""
    from mend import evaluate
    from mend.cli import run

    args = ["model=tiny-llama", "editors=[malmen,ft]", f"settings.malmen.checkpoint={malmen_run}", "data=builtin",
            "data.limit=4", f"mode={mode}", "batch_size=2", "drawdown.source=none", "progress=false",
            f"out={tmp_path / 'ev'}"]
    with pytest.raises(SystemExit) as exc:
        run(evaluate.main, evaluate.USAGE, args)
    assert exc.value.code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    m = res["editors"]["malmen"]["metrics"]
    assert m["n"] == 4 and 0 <= m["efficacy"] <= 1 and m["seconds_per_edit"] > 0


def test_malmen_run_refuses_other_models_and_editors(malmen_run, tiny, tmp_path):
    from mend.train import main

    model, tok = tiny("tiny-gptj")
    with pytest.raises(MendError, match="trained for tiny-llama"):
        create_editor("malmen", {"checkpoint": str(malmen_run)}).edit(model, tok, REQS[:1])
    llama, ltok = tiny("tiny-llama")
    with pytest.raises(MendError, match="malmen editor"):
        create_editor("mend", {"checkpoint": str(malmen_run)}).edit(llama, ltok, REQS[:1])
    mend_run = tmp_path / "mend"
    assert main(["model=tiny-llama", "trainer.batch_size=2", "data.val_limit=4", "data.variants=1", "norm_warmup=2",
                 "hypernet.rank=8", "trainer.progress=false", "eval.enabled=false", "trainer.threads=1",
                 "hypernet.precondition=false", "trainer.fast_dev_run=true", f"out={mend_run}"]) == 0
    with pytest.raises(MendError, match="mend editor"):
        create_editor("malmen", {"checkpoint": str(mend_run)}).edit(llama, ltok, REQS[:1])
    with pytest.raises(ConfigError, match="editor.checkpoint"):
        create_editor("malmen").edit(llama, ltok, REQS[:1])


def test_malmen_settings_are_checked(tmp_path):
    from mend.train import main

    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        main([*TINY_MALMEN, "model=tiny-llama", "trainer.accumulate_grad_batches=2", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="positions"):
        main([*TINY_MALMEN, "model=tiny-llama", "hypernet.positions=some", f"out={tmp_path}"])


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


def test_split_backward_gives_the_gradient_of_the_whole_loss(tiny):
    """meta_step's chunked, split backward (solve adjoint, hypernetwork re-run per chunk) against autograd through
    the whole loss with a differentiable float64 solve, for every hypernetwork parameter, α and λ included."""
    from mend.learned.factors import edited_target_logits, row_nll, target_tokens
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.malmen.hypernet import MalmenHypernet
    from mend.learned.malmen.solve import LossPlan, MalmenSection, batched_factors, meta_step, shifts
    from mend.learned.module import weight_specs
    from mend.learned.upper_blocks import UpperBlocks
    from mend.scoring import forward_target_logits, make_batch

    model, tok = tiny("tiny-llama")
    adapter = get_adapter(model)
    refs = adapter.weight_refs(["mlp_out"], [-2, -1])
    torch.manual_seed(0)
    hn = MalmenHypernet(weight_specs(model, refs), HypernetConfig(rank=8, positions="target", alpha_init=0.5), 2.0)
    for block in (b for t in hn.transforms.values() for b in t.net.blocks):
        torch.nn.init.normal_(block.up.weight, std=0.1)  # away from the identity: every parameter matters
    prompts = [r.text for r in REQS] + ["Where is the tower? In", "Bob plays the", "Big Ben is in", "Cats eat"]
    targets = [r.target_new for r in REQS] + [" Rome", " piano", " London", " fish"]
    tb = make_batch(tok, prompts, targets, model)
    for r in refs:
        u, d = batched_factors(model, adapter, [r], tb, 8, "target")[r.label]
        hn.update_stats(r.label, u, d)
        hn.set_preconditioner(r.label, u.T @ u / u.shape[0] + torch.eye(u.shape[1]))
    rows, _ = target_tokens(tb)
    plan = LossPlan(5, torch.where(rows < 5, -1, 0), 0.7, 1.3, None)
    hn.zero_grad()
    meta_step(hn, model, adapter, refs, UpperBlocks(adapter, refs), tb, 3, plan,
              MalmenSection(loss_rows=2, chunk_tokens=3), lambda t: t.backward(), update_stats=False)
    split = {n: p.grad.clone() for n, p in hn.named_parameters()}

    factors = batched_factors(model, adapter, refs, tb, 8, "target", n=3)
    deltas = {}
    for r in refs:
        u, d = factors[r.label]
        D = shifts(hn, r.label, u, d, 100).double()
        U = u.double()
        A = U.T @ U + hn.lam(r.label).double() * hn.preservation(r.label).double()
        deltas[r] = torch.linalg.solve(A, U.T @ D).T.float()
    with torch.no_grad():
        pre = forward_target_logits(model, tb, packed=True).float()
    post = edited_target_logits(model, adapter, tb, deltas).float()
    lp_pre, lp_post = torch.log_softmax(pre, -1), torch.log_softmax(post, -1)
    kl = ((lp_pre.exp() * (lp_pre - lp_post)).sum(-1) * plan.kl_weights()).sum()
    loss = plan.c_edit * row_nll(post, tb)[:5].mean() + plan.c_loc * kl
    names, params = zip(*hn.named_parameters())
    whole = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    for name in names:
        want = whole[name] if whole[name] is not None else torch.zeros_like(split[name])
        # float32 forward passes summed in another order (chunks): FORWARD roundings per term, over the
        # parameter's gradient magnitude
        tol = f32_tol(float(want.abs().max()) + 1e-30, want.numel(), safety=FORWARD)
        assert (split[name] - want).abs().max() <= tol, (name, float((split[name] - want).abs().max()), tol)
    assert split["log_lambda"].abs().max() > 0 and split["log_alpha"].abs().max() > 0
