"""Causal tracing on tiny models: the maths against its definitions, the batched engines against single
restorations, averaging, and every adapter (GPT-2, GPT-J, Llama, Gemma 3, T5's encoder)."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_TINY, DECODER_ONLY
from tolerance import FORWARD, f32_tol

from locate_edit.trace import Fact, Tracer, TraceSettings, fact_run, prepare, trace_fact
from locate_edit.trace.average import ROWS, AverageTrace, average, token_rows
from locate_edit.trace.engine import corrupted_probs, prefix_engine_applies, probs_with_states

PREFIX = "In 1889, "
SUBJECT = "the tower"
TEXT = f"{PREFIX}{SUBJECT}!"  # the subject after a few clean tokens, then one more (a random model's prediction
FACT = Fact(TEXT, (len(PREFIX), len(PREFIX) + len(SUBJECT)))  # hardly depends on tokens further back)
NOISE = 2.0  # far above the tiny models' embedding scale (~0.02): the corruption changes the prediction a lot
FEW = TraceSettings(samples=2, window=3, layer_group=2)  # passes start at layer 0 or 2: some rows early


@pytest.fixture
def sharp(tiny):
    """A tiny model whose logits are 5× sharper (a hook on the final norm), so that its prediction is confident
    and corrupting the subject moves it by 5–200% (near-uniform outputs would hide the effects)."""
    from mend.adapters import get_adapter

    def make(name: str):
        model, tok = tiny(name)
        get_adapter(model).final_norm().register_forward_hook(lambda _m, _a, out: out * 5.0)
        return model, tok

    return make


def _close(a, b, rel: float) -> bool:
    """Whether a and b agree to ``rel`` of their size (to tell effects that matter from those that do not)."""
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_subject_tokens_and_window_follow_the_reference(tiny):
    model, tok = tiny("tiny-llama")
    prep = prepare(tok, FACT)  # byte tokenizer: one token per character
    assert prep.subject == (len(PREFIX), len(PREFIX) + len(SUBJECT))
    assert "".join(prep.tokens[slice(*prep.subject)]) == SUBJECT
    tr = Tracer(model, tok)
    tr.n_layers = 30  # the reference: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    assert tr.window("mlp", 0, 10) == range(0, 5)
    assert tr.window("mlp", 12, 10) == range(7, 17)
    assert tr.window("attn", 29, 10) == range(24, 30)
    assert tr.window("mlp", 12, 3) == range(11, 14) and tr.window("mlp", 12, 1) == range(12, 13)
    assert tr.window("residual", 12, 10) == range(12, 13)


@pytest.mark.parametrize("name", ALL_TINY)
def test_restoring_every_position_of_a_layer_recovers_the_clean_probability(sharp, name):
    model, tok = sharp(name)
    tr = Tracer(model, tok)
    run = fact_run(tr, FACT, NOISE, samples=2, seed=0)
    T = len(run.prep.ids)
    p_corr = corrupted_probs(tr, run).mean().item()
    assert not _close(p_corr, run.p_clean, rel=1e-2)  # the corruption matters, so recovery means something
    for layer in range(tr.n_layers):  # the same clean computation from there on, in batches of other shapes
        p = probs_with_states(tr, run, [[("residual", layer, t) for t in range(T)]])
        assert abs(p.item() - run.p_clean) <= _prob_tol(model, tok, max(p.item(), run.p_clean)), (layer, p.item())
    # restoring only some positions of the first layer does not (the subject's last token stays corrupted)
    some = probs_with_states(tr, run, [[("residual", 0, t) for t in range(run.prep.subject[1] - 1)]])
    assert not _close(some.item(), run.p_clean, rel=1e-3)


@pytest.mark.parametrize("name", ALL_TINY)
def test_no_noise_means_no_effect(sharp, name):
    model, tok = sharp(name)
    tr = trace_fact(model, tok, FACT, 0.0, FEW)
    assert abs(tr.p_corrupted - tr.p_clean) <= _prob_tol(model, tok, max(tr.p_clean, tr.p_corrupted))
    # every effect is p(restored) − p(corrupted), the same probability from differently shaped passes
    bound = 2 * _prob_tol(model, tok, max(tr.p_clean, tr.p_corrupted))
    for k, eff in tr.effects.items():
        assert eff.abs().max() <= bound, k


@pytest.mark.parametrize("name", ALL_TINY)
def test_batched_trace_equals_single_restorations(sharp, name):
    model, tok = sharp(name)
    tracer = Tracer(model, tok)
    fast = trace_fact(model, tok, FACT, NOISE, FEW, seed=3, tracer=tracer)
    plain = trace_fact(model, tok, FACT, NOISE, TraceSettings(samples=2, window=3, fast=False, batch_tokens=1),
                       seed=3, tracer=tracer)
    # every pass starting at its own first changed block, in small batches
    exact = trace_fact(model, tok, FACT, NOISE, TraceSettings(samples=2, window=3, layer_group=1, batch_tokens=40),
                       seed=3, tracer=tracer)
    # the same noisy passes twice (kernels may still round differently from call to call: MKL, oneDNN)
    assert fast.answer_id == plain.answer_id
    assert fast.p_corrupted == pytest.approx(plain.p_corrupted, abs=_prob_tol(model, tok, plain.p_corrupted))
    scale = max(tr.abs().max().item() for tr in fast.effects.values())
    assert scale > 1e-4  # restorations do something
    # each effect is a difference of two probabilities ≤ p_corrupted + scale, from differently batched passes;
    # comparing two effects: four such probabilities
    tol = 4 * _prob_tol(model, tok, fast.p_corrupted + scale)
    for k in fast.effects:
        assert torch.allclose(fast.effects[k], plain.effects[k], atol=tol, rtol=0), k
        assert torch.allclose(exact.effects[k], plain.effects[k], atol=tol, rtol=0), k
    # single restorations, one pass each, by the definition: p(restored) - p(corrupted), mean over the draws
    run = fact_run(tracer, FACT, NOISE, samples=2, seed=3)
    s0 = run.prep.subject[0]
    T, L = len(run.prep.ids), tracer.n_layers
    for k, layer, t in [("residual", 0, s0), ("mlp", 1, T - 1), ("attn", L - 1, s0 + 2), ("mlp", L - 2, s0 + 5)]:
        states = [(k, j, t) for j in tracer.window(k, layer, FEW.window)]
        p = probs_with_states(tracer, run, [states], batch_tokens=1).item()
        assert fast.effects[k][t, layer].item() == pytest.approx(p - fast.p_corrupted, abs=tol)


@pytest.mark.parametrize("name", ALL_TINY)
def test_effects_by_definition(sharp, name):
    model, tok = sharp(name)
    tr = trace_fact(model, tok, FACT, NOISE, FEW)
    s0, L = tr.subject_range[0], len(tr.effects["residual"][0])
    for eff in tr.effects.values():
        assert eff.shape == (len(tr.tokens), L)
        assert (eff[:s0] == 0).all()  # tokens before the subject are clean in the corrupted run too
    # both checks compare differences of probabilities ≤ p_max from passes of their own (equal in real numbers):
    # ≤ 4 × one probability's rounding
    tol = 4 * _prob_tol(model, tok, max(tr.p_clean, tr.p_corrupted))
    if name != "tiny-t5":  # the last block's output at the last token is the prediction's whole input
        assert tr.effects["residual"][-1, L - 1].item() == pytest.approx(tr.p_clean - tr.p_corrupted, abs=tol)
        assert tr.effects["residual"][s0:-1, L - 1].abs().max() <= tol  # and other tokens there are never read
    probs = _next_token_probs(model, tok, TEXT)
    assert tr.answer_id == int(probs.argmax())
    assert tr.p_clean == pytest.approx(probs.max().item(), abs=_prob_tol(model, tok, tr.p_clean))


def _next_token_logits(model, tok, text: str) -> torch.Tensor:
    """The plain model's next-token logits (T5: the decoder's first token), without the tracer."""
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            start = torch.full((1, 1), model.config.decoder_start_token_id)
            return model(input_ids=ids, decoder_input_ids=start).logits[0, 0].float()
        return model(input_ids=ids).logits[0, -1].float()


def _next_token_probs(model, tok, text: str) -> torch.Tensor:
    return torch.softmax(_next_token_logits(model, tok, text), -1)


def _prob_tol(model, tok, p: float) -> float:
    """How far one token's probability ≤ ``p`` may move between two passes that differ only in rounding (batch
    shapes, caches, kernels): the logits move by δ ≤ FORWARD·eps·|logits| and softmax turns that into
    |Δp| ≤ 2p·max|δ|. An effect (a difference of two such probabilities) gets twice this."""
    return f32_tol(2 * p * _next_token_logits(model, tok, TEXT).abs().max(), safety=FORWARD)


def test_seeded_noise_is_reproducible_and_seed_dependent(sharp):
    model, tok = sharp("tiny-gpt2")
    a, b = (trace_fact(model, tok, FACT, NOISE, FEW, seed=5) for _ in range(2))
    c = trace_fact(model, tok, FACT, NOISE, FEW, seed=6)
    assert torch.equal(a.effects["mlp"], b.effects["mlp"]) and a.p_corrupted == b.p_corrupted
    assert a.p_corrupted != c.p_corrupted


def test_prefix_engine_is_used_for_decoder_only_models(tiny):
    for name in DECODER_ONLY:
        model, tok = tiny(name)
        assert prefix_engine_applies(Tracer(model, tok), 20)
    model, tok = tiny("tiny-t5")
    assert not prefix_engine_applies(Tracer(model, tok), 20)
    model, tok = tiny("tiny-gemma3")
    assert not prefix_engine_applies(Tracer(model, tok), model.config.sliding_window + 1)


def test_fact_trace_json_round_trip(sharp):
    from locate_edit.trace import FactTrace

    model, tok = sharp("tiny-gpt2")
    tr = trace_fact(model, tok, FACT, NOISE, FEW)
    back = FactTrace.from_json(tr.to_json())
    assert back.tokens == tr.tokens and back.subject_range == tr.subject_range
    assert all(torch.equal(back.effects[k], tr.effects[k]) for k in tr.effects)  # float32 → Python float → float32


# --- averaging ------------------------------------------------------------------------------------------------
def test_token_rows_follow_the_paper():
    #        0 1 2 3 4 5 6 7  (subject at 1..3, 8 tokens)
    assert token_rows((1, 4), 8) == [[1], [2], [3], [4], [5, 6], [7]]
    assert token_rows((0, 1), 3) == [[0], [], [0], [1], [], [2]]  # one-token subject: first = last
    assert token_rows((0, 2), 3) == [[0], [], [1], [2], [], [2]]  # one token after: first subsequent = last
    assert token_rows((1, 3), 3) == [[1], [], [2], [], [], [2]]  # the subject ends the prompt


def _synthetic(subject_range, n_tokens, fill):
    from locate_edit.trace import FactTrace

    eff = torch.tensor(fill, dtype=torch.float32).reshape(n_tokens, 2)
    return FactTrace("x", "x", ["t"] * n_tokens, subject_range, "a", 0, None, 0.5, 0.1,
                     {"residual": eff, "mlp": 2 * eff})


def test_average_is_the_mean_over_tokens_of_each_row():
    a = _synthetic((0, 3), 5, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # rows: [0], [1], [2], [3], [], [4]
    b = _synthetic((1, 2), 4, [10, 11, 12, 13, 14, 15, 16, 17])  # rows: [1], [], [1], [2], [], [3]
    avg = average([a, b])
    assert avg.counts == [2, 1, 2, 2, 0, 2] and avg.n_facts == 2
    r = avg.effects["residual"]
    assert r[0].tolist() == [(0 + 12) / 2, (1 + 13) / 2]
    assert r[1].tolist() == [2, 3]  # only a has a middle subject token
    assert r[2].tolist() == [(4 + 12) / 2, (5 + 13) / 2]
    assert r[3].tolist() == [(6 + 14) / 2, (7 + 15) / 2]
    assert torch.isnan(r[4]).all()
    assert r[5].tolist() == [(8 + 16) / 2, (9 + 17) / 2]
    assert torch.equal(avg.effects["mlp"][~torch.isnan(r)], 2 * r[~torch.isnan(r)])
    assert avg.p_clean == pytest.approx(0.5) and avg.p_corrupted == pytest.approx(0.1)
    back = AverageTrace.from_json(avg.to_json())
    assert back.counts == avg.counts and torch.equal(torch.isnan(back.effects["residual"]), torch.isnan(r))
    assert len(avg.to_json()["rows"]) == len(ROWS) and avg.to_json()["effects"]["residual"][4] == [None, None]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # nn.Linear and GPT-2's Conv1D
def test_onednn_linears_give_the_same_trace_and_are_undone(sharp, name):
    from mend.onednn import onednn_linears

    model, tok = sharp(name)
    plain = trace_fact(model, tok, FACT, NOISE, FEW)
    with onednn_linears(model) as applied:
        assert applied
        patched = [m for m in model.modules() if "forward" in m.__dict__]
        assert len(patched) >= 4 * model.config.num_hidden_layers
        fast = trace_fact(model, tok, FACT, NOISE, FEW)
        x = torch.randn(2, 3, model.config.hidden_size, requires_grad=True)
        patched[0](x).sum().backward()  # with gradients the layer's own forward runs
        assert x.grad is not None
    assert not [m for m in model.modules() if "forward" in m.__dict__]
    scale = max(e.abs().max().item() for e in plain.effects.values())
    # other kernels (oneDNN's) sum in another order: the passes differ by rounding only
    assert fast.p_clean == pytest.approx(plain.p_clean, abs=_prob_tol(model, tok, plain.p_clean))
    tol = 4 * _prob_tol(model, tok, plain.p_corrupted + scale)  # two effects, each a difference of probabilities
    for k in plain.effects:
        assert torch.allclose(fast.effects[k], plain.effects[k], atol=tol, rtol=0), k
