"""MALMEN's training (mend.learned.malmen.solve, .module): the split backward against the whole loss's gradient, memory
flat in the number of edits per step, train / save / reload / edit, the evaluator, refusals and settings."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import assert_params_identical, param_clones
from safetensors.torch import load_file
from test_malmen import REQS
from tolerance import FORWARD, f32_tol

from mend.adapters import get_adapter
from mend.editor import apply_edit, create_editor
from mend.errors import ConfigError, MendError

TINY_MALMEN = ["method=malmen", "trainer.batch_size=2", "data.val_limit=4", "data.variants=1", "norm_warmup=2",
               "hypernet.rank=16", "hypernet.positions=target", "hypernet.precondition_tokens=256",
               "edit.kinds=[mlp_out]", "edit.layers=[-2,-1]", "trainer.progress=false", "eval.enabled=false",
               "trainer.threads=1", "malmen.loss_rows=3", "malmen.chunk_tokens=4", "malmen.fact_rows=8"]


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
    hn = MalmenHypernet(weight_specs(model, refs), HypernetConfig(rank=16, positions="target", precondition=False), 1.0)
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
    hn = MalmenHypernet(weight_specs(model, refs), HypernetConfig(rank=8, positions="target", alpha_init=0.5, precondition=False), 2.0)
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
