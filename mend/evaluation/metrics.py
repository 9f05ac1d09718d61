"""Metric definitions, once. Names and meanings follow ../shared/CONTRACT.md and the papers:

- CounterFact (Meng et al. 2022): a prompt counts for efficacy / generalization when the new target is more
  likely than the true one, comparing the *mean* log-probability per target token; for locality the true target
  must stay more likely than the new one on neighbourhood prompts.
- zsRE (Mitchell et al. 2022; Meng et al. 2022): teacher-forced token accuracy of the new target; locality is the
  fraction of the locality answer's positions whose argmax agrees with the unedited model.
- MEND / EasyEdit formats (flat CounterFact, the built-in facts): efficacy and generalization as CounterFact;
  locality as zsRE (agreement with the unedited model on the locality answer), as MEND and EasyEdit score them, so
  the unedited model's locality is 1. The CounterFact comparison on the same prompts is kept as ``neighborhood``
  (true target more likely than the new one), which the unedited model itself often fails on hard neighbours.
- edit_success (MEND's ES): the whole target is the teacher-forced argmax continuation.
- fluency: ROME's n-gram entropy: per text ``mean(2/3 · H₂, 4/3 · H₃)`` of word bigram / trigram frequencies
  (bits), averaged over texts (×1, not ×100).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")  # words and punctuation, like nltk.word_tokenize for English


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the values that are present; 0 when any of them is 0."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def prefers(logprob_a: float, logprob_b: float) -> float:
    """1.0 when target a is more likely than target b (mean log-prob per token), else 0.0."""
    return float(logprob_a > logprob_b)


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two token sequences agree (teacher-forced argmax comparisons)."""
    n = max(len(a), len(b))
    return sum(int(x == y) for x, y in zip(a, b)) / n if n else 1.0


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p ‖ q) in nats from log-probabilities over the same vocabulary."""
    logp, logq = logp.double(), logq.double()
    return float((logp.exp() * (logp - logq)).sum().clamp_min(0.0))


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / max(1, n_tokens))


def relative_increase(post: float, pre: float) -> float:
    """(post − pre) / pre: the drawdown of a perplexity."""
    return (post - pre) / pre


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's compute_n_gram_entropy of one text (arithmetic aggregation)."""
    tokens = _WORD.findall(text)
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(h * w)
    return sum(parts) / len(parts)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean n-gram entropy over texts."""
    return sum(ngram_entropy(t) for t in texts) / len(texts) if texts else None


def mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
