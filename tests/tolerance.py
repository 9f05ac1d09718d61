"""Tolerances for floating-point comparisons, derived from the dtype's epsilon and the magnitudes involved.

Rounding model (IEEE round to nearest): every float operation returns the exact result times (1 + δ) with
|δ| ≤ eps/2, eps = ``torch.finfo(dtype).eps`` (2⁻²³ ≈ 1.19e-7 for float32). So

- one addition / multiplication of values of size M is off by at most eps/2 · M;
- a sum or dot product of n terms is off by about sqrt(n) · eps · Σ|terms| when the rounding errors are
  independent (the usual case) and by at most n · eps · Σ|terms| (``worst_case=True``), whatever the
  summation order: a different order (another batch shape, another kernel, another library version) moves the
  result within that bound, never by a fixed number of ulps;
- the magnitude that matters is the size of the terms, not of the result (cancellation), e.g. ``W.abs().max()``
  for ``(W + Δ) − W``, ``(|x| @ |w|).max()`` for ``x @ w``.

A model's logits after L layers of such sums (with normalisations and softmaxes in between) carry relative errors
of many eps: two forward passes of the same tiny model that differ only in batching, padding, caching or which
kernel runs are compared with ``safety=FORWARD`` against the size of their outputs. Logits off by δ ≤ that move a
softmax probability p by ≤ 2p·δ, a log-probability by ≤ 2δ and a KL divergence by ≤ 4δ.
"""

from __future__ import annotations

import torch

FORWARD = 64.0
"""Safety factor for comparing two forward passes of a tiny model (4 layers, width 64-256) that differ only in how
they round (batch shapes, padding, caches, skipped blocks, other kernels): each layer's sums over 64-256 products
and its norms add a few eps of relative error. Measured here (torch 2.13, transformers 5.25, one thread): logits
within 4.1 eps × max|logits|, log-probability sums within 1.1 eps × their size, probabilities within 1.5% of the
softmax bound 2p · FORWARD · eps · max|logits|; FORWARD leaves > 10× for other CPUs, kernels and library
versions. A real bug (a wrong position, a missing term, a factor 2) moves outputs by > 1e-3 of their size, ≥ 100×
FORWARD · eps ≈ 7.6e-6 of it."""


def f32_tol(magnitude: float | torch.Tensor, terms: int = 1, *, safety: float = 8.0,
            dtype: torch.dtype = torch.float32, worst_case: bool = False) -> float:
    """``safety · eps(dtype) · magnitude · g(terms)``, with g(n) = sqrt(n), or n if ``worst_case``.

    ``magnitude``: the size of the terms (a float or a tensor holding one value); ``terms``: how many are summed
    into each compared value; ``safety``: a small constant for the few roundings per term (8 by default,
    ``FORWARD`` for whole forward passes, 1-2 where a comparison's rounding is bounded exactly).
    """
    n = max(1, int(terms))
    return float(safety * torch.finfo(dtype).eps * float(magnitude) * (n if worst_case else n ** 0.5))
