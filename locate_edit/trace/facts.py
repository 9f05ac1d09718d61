"""Facts to trace: loaded from a data set (ROME's known facts, CounterFact, the built-in facts), optionally only
those whose expected answer the model predicts, and traced one after another with one noise scale."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.trace.core import Fact, FactTrace, Tracer, TraceSettings, embedding_std, prepare, trace_fact
from mend.errors import ConfigError, MendError
from mend.onednn import onednn_linears
from mend.scoring import encode_pair

log = logging.getLogger(__name__)

TRACE_DATA = ("known", "counterfact", "builtin")


def load_facts(name: str, path: str | None = None, limit: int | None = None, on_error: str = "skip",
               ) -> list[Fact]:
    """The facts of a data set (``limit`` of them, or all); the built-in facts come from all splits."""
    from mend.data.registry import load_dataset

    if name not in TRACE_DATA:
        raise ConfigError(f"data must be one of {', '.join(TRACE_DATA)} for tracing, got '{name}'")
    ds = load_dataset(name, path, limit, on_error, split="all")
    if ds.skipped:
        log.warning("skipped %d malformed record(s) of %s", len(ds.skipped), ds.path)
    return [Fact.from_request(r) for r in ds.requests]


@torch.inference_mode()
def select_facts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], correct_only: bool,
                 limit: int | None = None) -> tuple[list[Fact], int]:
    """The first ``limit`` facts (all without a limit) that can be traced and, with ``correct_only``, whose
    expected answer's first token is the model's prediction; and how many were passed over."""
    tr = Tracer(model, tok)
    kept: list[Fact] = []
    passed = 0
    for f in facts:
        if limit is not None and len(kept) >= limit:
            break
        try:
            prep = prepare(tok, f)
        except MendError as e:
            log.warning("not traced: %s", e)
            passed += 1
            continue
        if correct_only:
            if f.expected is None:
                raise MendError(f"fact {f.text!r} has no expected answer to compare the prediction with")
            want = encode_pair(tok, f.text, f.expected, tr.enc_dec)[1][0]
            if int(tr.next_token_probs(tr.embed(prep.ids[None]))[0].argmax()) != want:
                passed += 1
                continue
        kept.append(f)
    return kept, passed


def fact_seed(seed: int, index: int) -> int:
    """The noise seed of the ``index``-th fact: a fact's noise does not depend on which others are traced."""
    return seed * 1_000_003 + index


def trace_facts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact], noise: float = 3.0,
                settings: TraceSettings | None = None, seed: int = 0, progress: bool = True,
                ) -> tuple[list[FactTrace], float]:
    """Trace every fact with noise of std ``noise`` × the std of the subjects' embeddings; returns the traces
    and that absolute std."""
    from tqdm.auto import tqdm

    if not facts:
        raise MendError("no facts to trace")
    if noise < 0:
        raise ConfigError(f"noise must be >= 0, got {noise}")
    settings = settings or TraceSettings()
    settings.check()
    noise_std = noise * embedding_std(model, tok, facts)
    tr = Tracer(model, tok)
    with onednn_linears(model, settings.onednn):
        traces = [trace_fact(model, tok, f, noise_std, settings, fact_seed(seed, i), tracer=tr)
                  for i, f in enumerate(tqdm(facts, desc="tracing", unit="fact", disable=not progress))]
    return traces, noise_std
