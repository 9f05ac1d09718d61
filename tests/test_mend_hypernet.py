"""MEND's maths on tiny models: at initialisation the editor is exactly one gradient step; factors, masking,
partial forward passes, functional edits and running statistics equal their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_TINY, DECODER_ONLY
from tolerance import FORWARD, f32_tol

from mend.adapters import get_adapter
from mend.editor import apply_edit
from mend.learned.factors import edit_factors, edited_target_logits, row_nll
from mend.learned.hypernet import HypernetConfig, MendHypernet, RunningStats, WeightSpec
from mend.learned.upper_blocks import UpperBlocks
from mend.scoring import forward_target_logits, make_batch

PROMPTS = ["The tower is located in", "Bob plays the", "A"]
TARGETS = [" Rome", " piano", " long target"]


def _setup(tiny, name: str, n_layers: int = 2):
    model, tok = tiny(name)
    adapter = get_adapter(model)
    refs = adapter.weight_refs(layers=list(range(-n_layers, 0)))  # every MLP kind; both stacks for T5
    batch = make_batch(tok, PROMPTS, TARGETS, model)
    return model, tok, adapter, refs, batch


def _hypernet(adapter, refs, **kw) -> MendHypernet:
    specs = [WeightSpec(r.label, *adapter.get_weight(r).shape) for r in refs]
    return MendHypernet(specs, HypernetConfig(rank=16, **{"precondition": False, **kw}))


def _warm(hn: MendHypernet, factors) -> None:
    for label, (u, d) in factors.items():
        hn.update_stats(label, u, d)


def _logit_size(model, tok) -> float:
    """max |logit| of the model over PROMPTS: two forward passes that differ only in rounding give logits that
    differ by ≤ FORWARD·eps × this, and log-probabilities (log-softmax) by ≤ 2× that."""
    with torch.no_grad():
        return max(float(model(**tok(p, return_tensors="pt")).logits.abs().max()) for p in PROMPTS)


@pytest.mark.parametrize("name", ALL_TINY)
def test_untrained_editor_is_exactly_one_gradient_step(tiny, name):
    """ΔW = −α ∇W of the edit loss (autograd), for every MLP kind of the last layers (both T5 stacks)."""
    model, _, adapter, refs, batch = _setup(tiny, name)
    n = 2  # the third row rides along and must not contribute
    factors, _ = edit_factors(model, adapter, refs, batch, n)
    hn = _hypernet(adapter, refs)
    _warm(hn, factors)  # statistics in use (norm=True): the identity must not depend on them

    params = [adapter.parameter(r) for r in refs]
    for p in params:
        p.requires_grad_(True)
    loss = row_nll(forward_target_logits(model, batch, packed=True), batch)[:n].sum()
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for ref, g in zip(refs, grads):
            u, d = factors[ref.label]
            ut, dt = hn.transform(ref.label, u, d)
            assert torch.equal(ut, u.float()) and torch.equal(dt, d.float()), "identity at initialisation"
            expected = -hn.alpha(ref.label) * (g.T if ref.transposed else g)
            delta = hn.delta(ref.label, u, d)
            assert delta.shape == adapter.get_weight(ref).shape
            assert expected.abs().max() > 0, f"{ref.label}: zero gradient, the check would be vacuous"
            # a sum over the N tokens of α δ_t u_tᵀ, here and in autograd (from its own forward and backward pass)
            mag = (hn.alpha(ref.label) * d.abs().float().T @ u.abs().float()).max()
            tol = f32_tol(mag, terms=u.shape[0], safety=FORWARD)
            torch.testing.assert_close(delta, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("combine,shared,norm", [(True, True, True), (False, True, True), (True, False, False),
                                                 (False, False, True)])
def test_identity_for_every_variant_and_gradients_reach_the_zero_init_layer(tiny, combine, shared, norm):
    model, _, adapter, refs, batch = _setup(tiny, "tiny-llama")
    factors, _ = edit_factors(model, adapter, refs, batch, 3)
    hn = _hypernet(adapter, refs, combine=combine, shared=shared, norm=norm)
    _warm(hn, factors)
    ref = refs[0]
    u, d = factors[ref.label]
    ut, dt = hn.transform(ref.label, u, d)
    assert torch.equal(ut, u) and torch.equal(dt, d)
    hn.delta(ref.label, u, d).square().sum().backward()
    ups = [p for n, p in hn.named_parameters() if n.endswith("up.weight")]
    assert ups and any(p.grad is not None and p.grad.abs().max() > 0 for p in ups)
    assert hn.log_alpha.grad is not None and hn.log_alpha.grad.abs().max() > 0
    assert (hn.log_alpha.exp() > 0).all()


def test_shared_networks_group_by_shape_with_one_mode_per_layer(tiny):
    model, _, adapter, _, _ = _setup(tiny, "tiny-llama")
    refs = adapter.weight_refs(layers=[-3, -2, -1])  # gate/up (128x64) and down (64x128), three layers each
    hn = _hypernet(adapter, refs)
    assert sorted(hn.transforms) == ["128x64", "64x128"]
    assert hn.transforms["64x128"].net.blocks[0].scale.shape[0] == 3
    per_weight = _hypernet(adapter, refs, shared=False)
    assert len(per_weight.transforms) == len(refs)


@pytest.mark.parametrize("name", ALL_TINY)
def test_pad_tokens_are_masked(tiny, name):
    model, _, adapter, refs, batch = _setup(tiny, name)
    factors, _ = edit_factors(model, adapter, refs, batch, 3)
    enc_dec = model.config.is_encoder_decoder
    for ref in refs:
        key = "decoder_attention_mask" if enc_dec and ref.stack == "decoder" else "attention_mask"
        u, d = factors[ref.label]
        assert u.shape[0] == d.shape[0]
        assert u.shape[0] <= int(batch.inputs[key].sum()) < batch.inputs[key].numel()  # the batch has padding
        assert u.shape[0] >= int(batch.target_mask.sum())  # at least every position that predicts a target
        assert (d != 0).any(-1).all()


def _assert_same_pass(logits_part, logits_full, part, full) -> None:
    """Partial and full passes compute the same numbers in batches of other shapes: logits and factors (u, δ)
    agree up to the rounding of a forward (and backward) pass, FORWARD·eps × their size."""
    torch.testing.assert_close(logits_part, logits_full, rtol=0, atol=f32_tol(logits_full.abs().max(), safety=FORWARD))
    for label in full:
        for a, b in zip(part[label], full[label]):
            torch.testing.assert_close(a, b, rtol=0, atol=f32_tol(b.abs().max(), safety=FORWARD))


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_upper_blocks_only_gives_the_same_factors_and_logits(tiny, name):
    model, _, adapter, refs, batch = _setup(tiny, name)
    full, logits_full = edit_factors(model, adapter, refs, batch, 2)
    upper = UpperBlocks(adapter, refs)
    assert upper.layer == adapter.num_layers() - 2
    with upper.only(batch):
        part, logits_part = edit_factors(model, adapter, refs, batch, 2)
    _assert_same_pass(logits_part, logits_full, part, full)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_cached_lower_blocks_give_the_same_factors(tiny, name):
    """Rows cached from other batches (other padding) are reused; the result equals the uncached pass."""
    model, tok, adapter, refs, batch = _setup(tiny, name)
    full, logits_full = edit_factors(model, adapter, refs, batch, 2)
    upper = UpperBlocks(adapter, refs, cache_mb=1)
    warm = make_batch(tok, [PROMPTS[1], "Unrelated and much longer prompt here"], [TARGETS[1], " x"], model)
    with upper.only(warm):
        pass
    assert (upper.hits, upper.misses) == (0, 2)
    with upper.only(batch):
        part, logits_part = edit_factors(model, adapter, refs, batch, 2)
    assert (upper.hits, upper.misses) == (1, 4)
    _assert_same_pass(logits_part, logits_full, part, full)


@pytest.mark.parametrize("name", ALL_TINY)
def test_functional_edit_equals_applying_the_delta(tiny, name):
    model, _, adapter, refs, batch = _setup(tiny, name)
    gen = torch.Generator().manual_seed(0)
    deltas = {r: 0.05 * torch.randn(adapter.get_weight(r).shape, generator=gen) for r in refs}
    before = forward_target_logits(model, batch, packed=True)
    functional = edited_target_logits(model, adapter, batch, deltas)
    from mend.editor import EditResult

    handle = apply_edit(model, EditResult(deltas))
    applied = forward_target_logits(model, batch, packed=True)
    handle.restore()
    # (W + Δ) x against W x + Δ x, and passes of other shapes: the same logits up to FORWARD·eps × their size
    tol = f32_tol(applied.abs().max(), safety=FORWARD)
    assert (functional - before).abs().max() > 100 * tol  # the edit moves the logits far beyond the rounding
    torch.testing.assert_close(functional, applied, rtol=0, atol=tol)
    tol = f32_tol(before.abs().max(), safety=FORWARD)
    torch.testing.assert_close(forward_target_logits(model, batch, packed=True), before, rtol=0, atol=tol)  # W untouched
    full = forward_target_logits(model, batch)  # (B, T, V); packed is its real-token rows
    torch.testing.assert_close(full[batch.target_mask], before, rtol=0, atol=tol)


def test_running_statistics_equal_the_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 5, generator=gen) * 3 + 1 for n in (1, 7, 30)]
    stats = RunningStats(5)
    assert not stats.ready
    for p in parts:
        stats.update(p)
    allx = torch.cat(parts).double()
    assert stats.ready and int(stats.count) == 38
    torch.testing.assert_close(stats.mean, allx.mean(0))
    torch.testing.assert_close(stats.std(), allx.std(0) + stats.eps)


def test_uninitialised_statistics_are_refused(tiny):
    model, _, adapter, refs, batch = _setup(tiny, "tiny-gpt2")
    factors, _ = edit_factors(model, adapter, refs, batch, 1)
    hn = _hypernet(adapter, refs)
    with pytest.raises(RuntimeError, match="not initialised"):
        hn.delta(refs[0].label, *factors[refs[0].label])


def _trained_looking(m, batch) -> None:
    """Input statistics warmed on ``batch``'s edit factors and random up-projections: not the identity."""
    tb = m._tokenize(batch["prompt"], batch["target"])
    with m.frozen.upper.only(tb):
        factors, _ = edit_factors(m.frozen.model, m.frozen.adapter, m.frozen.refs, tb, len(batch["prompt"]))
    _warm(m.hypernet, factors)
    with torch.no_grad():
        for name, prm in m.hypernet.named_parameters():
            if name.endswith("up.weight"):
                prm.normal_(0, 0.1)


def test_training_step_with_partial_passes_equals_the_full_computation(tiny):
    """The lower blocks computed once (and the edit rows run apart from the others) change nothing."""
    from mend.learned.lit_data import Sample, collate
    from mend.learned.mend.module import MendModule
    from mend.learned.module import LossSection, OptimSection

    model, tok = tiny("tiny-llama")
    refs = get_adapter(model).weight_refs(["mlp_out"], [-2, -1])
    batch = collate([Sample("The tower is in", " Rome", ("Where is the tower? In",), ("Big Ben is in", "A"),
                            (" London", " b")),
                     Sample("Bob plays the", " piano", ("Bob is good at the",), ("Ann plays", "Cy is"),
                            (" drums", " tall"))])
    outs = []
    for partial in (True, False):
        torch.manual_seed(0)
        m = MendModule(model, tok, refs, HypernetConfig(rank=8, alpha_init=1.0, precondition=False), OptimSection(), LossSection())
        if not partial:
            m.frozen.upper.layer = None
        assert m.frozen.upper.active is partial
        _trained_looking(m, batch)
        outs.append(m.step(batch, update_stats=False))
    # every output is a loss, KL, NLL, agreement or norm from the logits of passes that differ in rounding only:
    # logits by δ ≤ FORWARD·eps·|logits|, log-probabilities by ≤ 2δ, a KL by ≤ 4δ, each value by a few eps × itself
    size = _logit_size(model, tok)
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0,
                                   atol=f32_tol(outs[1][k].abs().max() + 4 * size, safety=FORWARD))
    assert outs[0]["kl"] > 1e-4  # the edit does reach the locality rows


def test_text_rows_are_weighted_by_c_text_and_scored_apart(tiny):
    """loss.c_text=X: the locality term is KL(neighbour tokens) + X · KL(text tokens), each its own token mean;
    c_text=None pools both (one token mean). loc_agreement counts the neighbour rows only, text_agreement the text
    rows. The edit (made from the edit rows alone) is the same whatever the locality rows are."""
    from mend.learned.lit_data import Sample, collate
    from mend.learned.mend.module import MendModule
    from mend.learned.module import LossSection, OptimSection

    model, tok = tiny("tiny-llama")
    refs = get_adapter(model).weight_refs(["mlp_out"], [-2, -1])
    edit = ("The tower is in", " Rome", ("Where is the tower? In",))
    nb, text = ("Big Ben is in", " London"), ("It was a long day and the", " rain kept falling on the roofs")

    def batch(locs, kinds=()):
        return collate([Sample(*edit, tuple(p for p, _ in locs), tuple(t for _, t in locs), kinds)])

    torch.manual_seed(0)
    m = MendModule(model, tok, refs, HypernetConfig(rank=8, alpha_init=20.0, precondition=False), OptimSection(), LossSection())
    _trained_looking(m, batch([nb]))

    def step(b, c_text=None):
        m.loss_cfg = LossSection(c_text=c_text)
        return m.step(b, update_stats=False)

    mixed = batch([nb, text], ("neighbour", "text"))
    assert mixed["loc_kind"] == ["neighbour", "text"]
    only_nb, only_text = step(batch([nb])), step(batch([text]))
    assert only_nb["kl"] > 1e-4 and only_text["kl"] > 1e-4 and "text_agreement" not in only_nb
    # KLs from passes over other batches: each off by ≤ 4δ, δ ≤ FORWARD·eps·|logits| (see _logit_size)
    kl_tol = f32_tol(4 * _logit_size(model, tok), safety=FORWARD)
    for c in (0.0, 0.5, 2.0):  # (1 + c) KLs on each side
        torch.testing.assert_close(step(mixed, c)["kl"], only_nb["kl"] + c * only_text["kl"], rtol=0,
                                   atol=2 * (1 + c) * kl_tol)
    pooled = step(batch([nb, text]))  # unmarked: every locality token in one mean
    torch.testing.assert_close(step(mixed)["kl"], pooled["kl"], rtol=0, atol=2 * kl_tol)
    out = step(mixed, 1.0)
    torch.testing.assert_close(out["loc_agreement"], only_nb["loc_agreement"])
    torch.testing.assert_close(out["text_agreement"], only_text["loc_agreement"])
    torch.testing.assert_close(out["edit_nll"], only_nb["edit_nll"], rtol=0,  # mean NLL: ≤ 2δ + eps·itself each
                               atol=f32_tol(only_nb["edit_nll"].abs() + 2 * _logit_size(model, tok), safety=2 * FORWARD))
    # relation rows: in the neighbours' KL mean, scored apart from them
    rel = step(batch([nb, text], ("neighbour", "relation")), 1.0)
    torch.testing.assert_close(rel["kl"], pooled["kl"], rtol=0, atol=2 * kl_tol)
    torch.testing.assert_close(rel["loc_agreement"], only_nb["loc_agreement"])
    torch.testing.assert_close(rel["relation_agreement"], only_text["loc_agreement"])
    assert "text_agreement" not in rel


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_preconditioned_untrained_editor_is_one_preconditioned_gradient_step(tiny, name):
    """hypernet.precondition: P = (C/τ + λI)⁻¹ with τ = tr(C)/d, and at initialisation ΔW = −α ∇W P (∇W as
    (d_out, d_in)); P comes from the second moment of each weight's input over text (mend.moments)."""
    from mend.moments import input_moments

    model, _, adapter, refs, batch = _setup(tiny, name)
    factors, _ = edit_factors(model, adapter, refs, batch, 2)
    hn = _hypernet(adapter, refs, precondition=True, precondition_ridge=0.05)
    _warm(hn, factors)
    assert not hn.preconditioned
    with pytest.raises(RuntimeError, match="not set"):
        hn.delta(refs[0].label, *factors[refs[0].label])
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    moments = input_moments(model, ids, refs, batch_size=2)
    for ref in refs:
        hn.set_preconditioner(ref.label, moments[ref.label])
    assert hn.preconditioned
    for ref in refs:
        u, d = factors[ref.label]
        C = moments[ref.label].double()
        keys = _module_inputs(model, adapter, ref, ids)  # C is E[k kᵀ] of the module's input at every position
        want = keys.T @ keys / keys.shape[0]  # the hook multiplies in float32
        # keys from passes of other batch shapes (≤ FORWARD·eps relative each, twice in k kᵀ), then a float32
        # sum of N products of size ≤ max diag(C)
        size = want.diagonal().max()
        tol = f32_tol(2 * size, safety=FORWARD) + f32_tol(size, terms=keys.shape[0])
        torch.testing.assert_close(C, want, rtol=0, atol=tol)
        d_in = C.shape[0]
        P = hn.precond[ref.label.replace(".", "-")].P.double()
        A = C / (C.trace() / d_in) + 0.05 * torch.eye(d_in, dtype=C.dtype)
        # P = A⁻¹ in float64, rounded to float32 (each entry by ≤ eps/2): |P A − I| ≤ eps/2 · |P| |A| entrywise
        torch.testing.assert_close(P @ A, torch.eye(d_in, dtype=C.dtype), rtol=0,
                                   atol=f32_tol((P.abs() @ A.abs()).max(), safety=2))
        grad = d.double().T @ u.double()  # ∇W as (d_out, d_in)
        expected = -hn.alpha(ref.label).double() * grad @ P
        # the hypernet's float32 products: sums over the d_in entries of P and the N tokens
        mag = (hn.alpha(ref.label).double() * (d.double().abs().T @ u.double().abs()) @ P.abs()).max()
        torch.testing.assert_close(hn.delta(ref.label, u, d).double(), expected, rtol=0,
                                   atol=f32_tol(mag, terms=d_in + u.shape[0]))
        assert not torch.allclose(expected, -hn.alpha(ref.label).double() * grad, rtol=1e-2), "P changes the step"


def _module_inputs(model, adapter, ref, ids) -> torch.Tensor:
    """(N, d_in) float64: the inputs of ``ref``'s module at every position of a full forward pass over ``ids``."""
    from mend.moments import run_model

    seen = []
    h = adapter.module(ref).register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        run_model(model, adapter, "decoder" if adapter.is_encoder_decoder else None, ids, None)
    h.remove()
    return torch.cat(seen).double()
