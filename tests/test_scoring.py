"""Target scoring against hand-computed log-probabilities, batched vs. one at a time, both model families."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_ONLY
from tolerance import FORWARD, f32_tol

from mend.scoring import encode_pair, make_batch, score_targets, target_nll, token_logprobs

PROMPTS = ["The capital of France is", "Hi", "Danielle Darrieux's mother tongue is", "A"]
TARGETS = [" Paris", " there, friend", " French", " b"]


def _manual_decoder_only(model, tok, prompt, target):
    p_ids = tok(prompt).input_ids
    ids = tok(prompt + target).input_ids
    assert ids[: len(p_ids)] == p_ids and len(ids) > len(p_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    positions = range(len(p_ids), len(ids))
    logprob = sum(lp[i - 1, ids[i]].item() for i in positions)
    greedy = all(int(logits[i - 1].argmax()) == ids[i] for i in positions)
    return logprob, len(ids) - len(p_ids), greedy, float(logits.abs().max())


def _manual_t5(model, tok, prompt, target):
    input_ids = torch.tensor([tok(prompt).input_ids])
    labels = torch.tensor([tok(target.strip(), add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    n = labels.shape[1]
    greedy = bool((out.logits[0].argmax(-1) == labels[0]).all())
    return -out.loss.item() * n, n, greedy, float(out.logits.abs().max())


def _check(model, tok, manual):
    batched = score_targets(model, tok, PROMPTS, TARGETS)
    single = [score_targets(model, tok, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)]
    small = score_targets(model, tok, PROMPTS, TARGETS, batch_size=3)  # a second, ragged batch
    assert len(batched) == len(small) == len(PROMPTS)
    n_tokens = set()
    for b, s, m, (p, t) in zip(batched, single, small, zip(PROMPTS, TARGETS)):
        logprob, n, greedy, logit_size = manual(model, tok, p, t)
        assert b.n_tokens == s.n_tokens == m.n_tokens == n
        # passes of other shapes (padding, batch size) move the logits by δ ≤ FORWARD·eps·|logits|, each of the n
        # log-probabilities by ≤ 2δ, and log-softmax and the sum round by a few eps × |log P(target)|
        tol = f32_tol(abs(logprob) + 2 * n * logit_size, safety=FORWARD)
        assert s.logprob == pytest.approx(logprob, abs=tol)
        assert b.logprob == pytest.approx(s.logprob, abs=tol)
        assert m.logprob == pytest.approx(s.logprob, abs=tol)
        assert b.greedy_match == s.greedy_match == greedy
        assert b.logprob < 0
        assert b.mean_logprob == pytest.approx(b.logprob / n)
        n_tokens.add(n)
    assert len(n_tokens) > 1  # the batch really had ragged targets


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_decoder_only_scores_match_manual_and_batching(tiny, name):
    model, tok = tiny(name)
    _check(model, tok, _manual_decoder_only)


def test_t5_scores_match_manual_and_batching(tiny):
    model, tok = tiny("tiny-t5")
    _check(model, tok, _manual_t5)


def test_greedy_match_is_true_for_the_models_own_argmax(tiny):
    """Build a target from the model's own greedy continuation: greedy_match must be True, and False once changed."""
    model, tok = tiny("tiny-llama")
    prompt = "The capital of France is"
    ids = tok(prompt).input_ids
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    target = tok.decode(ids[len(tok(prompt).input_ids):])
    assert encode_pair(tok, prompt, target)[1] == ids[len(tok(prompt).input_ids):]
    assert score_targets(model, tok, [prompt], [target])[0].greedy_match
    other = tok.decode([(ids[-1] + 1) % 256])
    assert not score_targets(model, tok, [prompt], [target[:-1] + other])[0].greedy_match


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_target_nll_is_the_mean_per_token_nll(tiny, name):
    model, tok = tiny(name)
    batch = make_batch(tok, PROMPTS, TARGETS, model)
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    lp = token_logprobs(logits, batch)
    assert torch.equal(lp[~batch.target_mask], torch.zeros_like(lp[~batch.target_mask]))
    scores = score_targets(model, tok, PROMPTS, TARGETS)
    expected = -sum(s.mean_logprob for s in scores) / len(scores)
    # the same logits' log-softmax in another batch (score_targets batches by 16, one batch here too): per token
    # ≤ 2δ (δ ≤ FORWARD·eps·|logits|) plus a few eps × the NLL's size, and so for the means
    tol = f32_tol(expected + 2 * logits.abs().max(), safety=FORWARD)
    assert target_nll(logits, batch).item() == pytest.approx(expected, abs=tol)
    assert batch.prompt_lens == [len(tok(p).input_ids) for p in PROMPTS]
