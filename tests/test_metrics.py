"""Metric definitions (mend.evaluation.metrics) and per-request measurement (mend.evaluation.measure), pinned on
cases computed by hand.

The measurement tests use a mocked language model whose next-token distribution depends only on the current
token (a fixed table), with the byte tokenizer (one character = one token), so every probability is known.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tolerance import f32_tol

from mend.evaluation.evaluator import EvalSettings, Evaluator
from mend.evaluation.measure import measure, text_nll
from mend.evaluation.metrics import (
    agreement,
    fluency,
    harmonic_mean,
    kl_divergence,
    mean,
    ngram_entropy,
    perplexity,
    prefers,
    relative_increase,
)
from mend.requests import EditRequest
from mend.tiny import VOCAB_SIZE, byte_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and far faster than many threads on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# --- pure functions ------------------------------------------------------------------------------------------


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))  # 0.6
    assert harmonic_mean([0.25, 1.0]) == pytest.approx(2 / (4 + 1))
    assert harmonic_mean([0.8]) == pytest.approx(0.8)
    # a zero anywhere makes the score 0 (no division by zero)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    # missing values are left out, not counted as 0
    assert harmonic_mean([1.0, None, 0.5]) == pytest.approx(2 / (1 + 2))
    assert harmonic_mean([None, 0.0]) == 0.0
    assert harmonic_mean([None, None]) is None
    assert harmonic_mean([]) is None


def test_prefers_is_strict():
    assert prefers(-1.0, -2.0) == 1.0
    assert prefers(-2.0, -1.0) == 0.0
    assert prefers(-1.5, -1.5) == 0.0  # a tie is not a success
    assert isinstance(prefers(0.0, -1.0), float)


def test_agreement():
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert agreement([4, 4], [4, 4]) == 1.0
    assert agreement([1, 2], [3, 4]) == 0.0
    # different lengths: the longer one sets the denominator
    assert agreement([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)
    assert agreement([], []) == 1.0


def _kl_size(p: torch.Tensor, q: torch.Tensor) -> float:
    """Rounding each log-probability to a float of unit roundoff u (eps/2) moves KL(p ‖ q) by at most
    u · Σ pᵢ (|ln pᵢ| (1 + |ln(pᵢ/qᵢ)|) + |ln qᵢ|) (to first order): this sum."""
    p, q = p.double(), q.double()
    return float((p * (p.log().abs() * (1 + (p / q).log().abs()) + q.log().abs())).sum())


def test_kl_divergence_against_a_manual_sum():
    p = [0.7, 0.2, 0.1]
    q = [0.2, 0.5, 0.3]
    manual_pq = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    manual_qp = 0.2 * math.log(0.2 / 0.7) + 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.1)
    lp, lq = torch.tensor(p).log(), torch.tensor(q).log()
    p_, q_ = torch.tensor(p), torch.tensor(q)  # float32 log-probabilities (rounded by ≤ 1 ulp each): see _kl_size
    assert kl_divergence(lp, lq) == pytest.approx(manual_pq, abs=f32_tol(_kl_size(p_, q_), safety=2))  # 0.5838 nats
    assert kl_divergence(lq, lp) == pytest.approx(manual_qp, abs=f32_tol(_kl_size(q_, p_), safety=2))  # direction
    assert manual_pq != pytest.approx(manual_qp)
    assert kl_divergence(lp, lp) == 0.0
    # two-point case: KL([1/2,1/2] || [1/4,3/4]) = 1/2 ln 2 + 1/2 ln(2/3)
    p2, q2 = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    two = kl_divergence(p2.log(), q2.log())
    assert two == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=f32_tol(_kl_size(p2, q2), safety=2))
    # half-precision input (as the evaluator stores references) is computed in double: only its rounding remains
    assert kl_divergence(lp.half(), lq) == pytest.approx(manual_pq, abs=f32_tol(_kl_size(p_, q_), dtype=torch.float16,
                                                                                safety=1))


def test_perplexity_and_relative_increase():
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    assert perplexity(0.0, 0) == 1.0  # no tokens: no division by zero
    assert relative_increase(12.0, 10.0) == pytest.approx(0.2)
    assert relative_increase(8.0, 10.0) == pytest.approx(-0.2)
    assert relative_increase(10.0, 10.0) == 0.0


def _h(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams {ab: 2, ba: 1}, trigrams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # 0.9183 bits
    h3 = 1.0
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert expected == pytest.approx(0.9728, abs=1e-4)
    # "a a a": one bigram type, one trigram: no entropy
    assert ngram_entropy("a a a") == 0.0
    # "the cat the cat the dog": bigrams {the cat: 2, cat the: 2, the dog: 1},
    # trigrams {the cat the: 2, cat the cat: 1, cat the dog: 1}
    e = (2 / 3 * _h([2, 2, 1]) + 4 / 3 * _h([2, 1, 1])) / 2
    assert ngram_entropy("the cat the cat the dog") == pytest.approx(e)
    # punctuation is a token of its own: "a, b, a" -> a , b , a: bigrams {a,: 1, ,b: 1, b,: 1, ,a: 1}
    assert ngram_entropy("a, b, a") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * _h([1, 1, 1])) / 2)
    # too short for any n-gram
    assert ngram_entropy("word") == 0.0
    assert ngram_entropy("") == 0.0


def test_fluency_is_the_mean_over_texts():
    texts = ["a b a b", "a a a", "the cat the cat the dog"]
    expected = sum(ngram_entropy(t) for t in texts) / 3
    assert fluency(texts) == pytest.approx(expected)
    assert fluency(["a b a b", "a a a"]) == pytest.approx(ngram_entropy("a b a b") / 2)
    assert fluency([]) is None


def test_mean_skips_missing():
    assert mean([1.0, None, 0.0]) == 0.5
    assert mean([None]) is None
    assert mean([]) is None


# --- a language model whose probabilities are written down ---------------------------------------------------

TOK = byte_tokenizer()


def tid(ch: str) -> int:
    ids = TOK(ch, add_special_tokens=False).input_ids
    assert len(ids) == 1, ch
    return ids[0]


class TableLM(torch.nn.Module):
    """P(next token | ..., a) = softmax(T[a]): the logits at each position depend only on that position's token."""

    def __init__(self, rows: dict[str, dict[str, float]]):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.table = torch.nn.Parameter(torch.zeros(VOCAB_SIZE, VOCAB_SIZE), requires_grad=False)  # uniform
        for ch, probs in rows.items():
            self.table.data[tid(ch)] = dist(probs).log()

    @property
    def device(self) -> torch.device:
        return self.table.device

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def dist(probs: dict[str, float]) -> torch.Tensor:
    """The listed characters get their probabilities; the rest of the mass is spread evenly over the vocabulary."""
    p = torch.full((VOCAB_SIZE,), (1.0 - sum(probs.values())) / (VOCAB_SIZE - len(probs)), dtype=torch.float64)
    for ch, v in probs.items():
        p[tid(ch)] = v
    return p.float()


# Next-token distributions after the last character of each prompt (everything else is uniform).
ROWS = {
    "E": {"N": 0.6, "T": 0.3},  # edit prompt
    "N": {"N": 0.4},  # inside the new target "NN"; N is still the argmax (the rest is ~0.0023 each)
    "P": {"N": 0.2, "T": 0.5},  # paraphrase 1: the true target wins
    "Q": {"N": 0.9, "T": 0.05},  # paraphrase 2: the new target wins
    "L": {"F": 0.5, "N": 0.3},  # neighbour 1: expected answer wins
    "M": {"F": 0.3, "N": 0.5},  # neighbour 2: the new target wins (by mean; not by sum)
    "R": {"N": 0.7},  # portability question
    "F": {"G": 0.8},  # inside the locality answer "FG"
}
NEW, TRUE = "NN", "T"  # targets of different lengths: mean and sum log-probabilities disagree below


def request(**kw) -> EditRequest:
    base = dict(prompt="{} E", subject="s", target_new=NEW, target_true=TRUE,
                paraphrases=("para P", "para Q"), neighborhood=(("near L", "F"), ("near M", "F")),
                portability=(("port R", "NT"),), meta={"case_id": "a"})
    return EditRequest(**{**base, **kw})


def second_request() -> EditRequest:
    # edit prompt ends in P: the true target wins; no paraphrases, no neighbours
    return EditRequest(prompt="{} P", subject="t", target_new=NEW, target_true=TRUE, meta={"case_id": "b"})


def test_the_table_model_is_what_the_cases_assume():
    model = TableLM(ROWS)
    ids = torch.tensor([[tid("E"), tid("N")]])
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    # the table holds float32 logs (≤ 1 ulp off each): a softmax probability moves by ≤ 2 max|δ logit| relative
    rel = f32_tol(2 * model.table.abs().max(), safety=2)
    assert logp[0, tid("N")].exp().item() == pytest.approx(0.6, rel=rel)
    assert logp[1, tid("N")].exp().item() == pytest.approx(0.4, rel=rel)
    assert int(logp[1].argmax()) == tid("N")
    # the designed "mean vs sum" disagreements
    assert math.log(0.6) + math.log(0.4) < math.log(0.3) < (math.log(0.6) + math.log(0.4)) / 2  # edit prompt
    assert (math.log(0.5) + math.log(0.4)) / 2 > math.log(0.3) > math.log(0.5) + math.log(0.4)  # neighbour M


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_counterfact_style_by_hand(batch_size):
    model = TableLM(ROWS)
    recs, refs = measure(model, TOK, [request(), second_request()], "counterfact", batch_size=batch_size)
    a, b = recs
    # efficacy: mean log-prob of "NN" after E is (ln .6 + ln .4)/2 = ln .49 > ln .3 (by the sum it would lose)
    assert a["efficacy"] == 1.0
    # paraphrases: after P mean ln(sqrt(.2 * .4)) = ln .28 < ln .5 -> 0; after Q -> 1
    assert a["generalization"] == 0.5
    # neighbours: after L ln .5 > mean ln(sqrt(.3 * .4)) -> 1; after M ln .3 < mean ln(sqrt(.5 * .4)) -> 0
    # (by the sum, M would count as 1 and locality would be 1.0)
    assert a["locality"] == 0.5
    # edit_success: edit prompt (N, N argmax) yes, para P no, para Q yes
    assert a["edit_success"] == pytest.approx(2 / 3)
    # teacher-forced accuracy of the expected neighbour answers: after L argmax F (yes), after M argmax N (no)
    assert a["loc_accuracy"] == 0.5
    # portability "NT" after R: argmax N (yes), then after N argmax N, not T -> 1/2
    assert a["portability"] == 0.5
    assert a["kl_locality"] == 0.0  # no reference: the unedited model compared with itself
    # second request: efficacy 0 (ln .28 < ln .5), nothing else to measure
    assert b["efficacy"] == 0.0
    assert b["generalization"] is None and b["locality"] is None and b["kl_locality"] is None
    assert b["edit_success"] == 0.0
    # references: one next-token distribution and argmax list per neighbour
    assert len(refs[0].loc_logdist) == 2 and refs[1].loc_logdist == []
    assert refs[0].loc_argmax == [[tid("F")], [tid("N")]]
    # stored in float16: ln 0.5 rounded by ≤ eps₁₆/2 · ln 2, so the probability by ≤ 0.5 · that (× 2)
    assert refs[0].loc_logdist[0].exp().float()[tid("F")].item() == pytest.approx(
        0.5, abs=f32_tol(0.5 * math.log(2), dtype=torch.float16, safety=1))


def test_counterfact_style_needs_target_true():
    with pytest.raises(ValueError, match="target_true"):
        measure(TableLM(ROWS), TOK, [request(target_true=None)], "counterfact")
    with pytest.raises(ValueError, match="style"):
        measure(TableLM(ROWS), TOK, [request()], "nonsense")


def test_zsre_style_by_hand():
    model = TableLM(ROWS)
    # the locality answer "FX": the unedited model predicts F (right) and then G (not X)
    req = request(neighborhood=(("near L", "FX"),))
    (rec,), (ref,) = measure(model, TOK, [req], "zsre", batch_size=2)
    # token accuracy of "NN": after E argmax N, after N argmax N
    assert rec["efficacy"] == 1.0
    # para P: argmax T then N -> 1/2; para Q: 1 -> mean 3/4
    assert rec["generalization"] == 0.75
    assert rec["edit_success"] == pytest.approx(2 / 3)
    assert rec["loc_accuracy"] == 0.5
    # without references the model agrees with itself
    assert rec["locality"] == 1.0 and rec["kl_locality"] == 0.0
    assert ref.loc_argmax == [[tid("F"), tid("G")]]

    # an "edited" model: after L the argmax becomes N; after F it is still G
    rows = {**ROWS, "L": {"N": 0.9, "F": 0.05}}
    edited = TableLM(rows)
    (post,), _ = measure(edited, TOK, [req], "zsre", references=[ref])
    # agreement with the unedited argmax: position 1 no (N vs F), position 2 yes (G, teacher-forced after F)
    assert post["locality"] == 0.5
    assert post["loc_accuracy"] == 0.0  # against the answer: N is not F, G is not X
    assert post["efficacy"] == 1.0 and post["generalization"] == 0.75  # rows E, N, P, Q unchanged
    p, q = dist(ROWS["L"]).double(), dist(rows["L"]).double()
    manual = float((p * (p / q).log()).sum())  # .5 ln 10 + .3 ln(1/3) + .2 ln 4 ~ 1.10
    reverse = float((q * (q / p).log()).sum())  # ~ 0.81
    assert manual > 1.0 and reverse < 0.9  # KL(pre || post), not KL(post || pre)
    # the reference is stored in float16: its log-probabilities are rounded by ≤ eps₁₆/2 (see _kl_size)
    kl_tol = f32_tol(_kl_size(p, q), dtype=torch.float16, safety=1)
    assert post["kl_locality"] == pytest.approx(manual, abs=kl_tol)

    # the same edited model on counterfact style: locality is about expected vs new, not about agreement
    (cf,), _ = measure(edited, TOK, [req], "counterfact", references=[ref])
    # after L: expected "FX" has mean ln(sqrt(.05 * .2/262)) < mean ln(sqrt(.9 * .4)) of the new target "NN"
    assert cf["locality"] == 0.0
    assert cf["kl_locality"] == pytest.approx(manual, abs=kl_tol)


def test_mend_style_by_hand():
    """Flat CounterFact / built-in facts: efficacy and generalization compare new with true (as CounterFact),
    locality is agreement with the unedited model (as zsRE), and the CounterFact comparison is ``neighborhood``."""
    model = TableLM(ROWS)
    (pre,), refs = measure(model, TOK, [request()], "mend", batch_size=2)
    (cf,), _ = measure(model, TOK, [request()], "counterfact", batch_size=2)
    assert pre["efficacy"] == cf["efficacy"] == 1.0 and pre["generalization"] == cf["generalization"] == 0.5
    assert pre["neighborhood"] == cf["locality"] == 0.5 and cf["neighborhood"] is None
    assert pre["locality"] == 1.0  # the unedited model agrees with itself
    # edited: after L the argmax becomes N (first neighbour's answer F no longer the argmax); M unchanged
    edited = TableLM({**ROWS, "L": {"N": 0.9, "F": 0.05}})
    (post,), _ = measure(edited, TOK, [request()], "mend", references=refs)
    assert post["locality"] == 0.5  # neighbour L: 0 of 1 positions agree; neighbour M: 1 of 1
    assert post["neighborhood"] == 0.0  # L: the new target now wins; M: it already did
    (zs,), _ = measure(edited, TOK, [request()], "zsre", references=refs)
    assert post["locality"] == zs["locality"] and post["kl_locality"] == pytest.approx(zs["kl_locality"])


def test_evaluator_pre_on_the_table_model():
    """The aggregate of pre(): means over the requests that have a value, harmonic score, perplexity."""
    model = TableLM(ROWS)
    chunks = torch.tensor([[tid("E"), tid("N"), tid("N")], [tid("F"), tid("G"), tid("x")]])
    ev = Evaluator(model, TOK, [request(), second_request()], "counterfact", text_chunks=chunks,
                   settings=EvalSettings(batch_size=4), progress=False)
    m = ev.pre().metrics
    assert m["efficacy"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["generalization"] == pytest.approx(0.5)  # only the first request has paraphrases
    assert m["locality"] == pytest.approx(0.5)
    assert m["score"] == pytest.approx(0.5)
    assert m["edit_success"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["kl_locality"] == 0.0
    assert m["n"] == 2
    # perplexity: exp(mean NLL) over the 4 predicted tokens N|E, N|N, G|F, x|G
    p_x = 1 / VOCAB_SIZE  # G's row is uniform
    nll = -(math.log(0.6) + math.log(0.4) + math.log(0.8) + math.log(p_x))
    # float32 logs in the table, a float32 log-softmax: each log-probability off by a few eps × the logits' size,
    # and the perplexity by as much relative
    assert m["ppl"] == pytest.approx(math.exp(nll / 4), rel=f32_tol(2 * model.table.abs().max()))
    assert text_nll(model, chunks, batch_size=1)[1] == 4
    assert [r["id"] for r in ev.pre().records] == ["a", "b"]
    assert ev.pre() is ev.pre()  # computed once
