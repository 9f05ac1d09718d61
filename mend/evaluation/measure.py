"""Measure a model on edit requests: every prompt of every request scored in batched forward passes.

``style`` picks the metric definitions (see metrics.py): ``counterfact`` compares the new target with the true
one; ``zsre`` uses teacher-forced token accuracy and agreement with the unedited model; ``mend`` (the MEND /
EasyEdit formats: flat CounterFact, the built-in facts) compares new with true for efficacy and generalization and
scores locality by agreement with the unedited model, keeping the true-vs-new comparison as ``neighborhood``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.evaluation.metrics import agreement, kl_divergence, mean, prefers
from mend.requests import EditRequest
from mend.scoring import TargetScore, score_targets

STYLES = ("counterfact", "zsre", "mend")
_TRUE_VS_NEW = ("counterfact", "mend")  # styles that score prompts by comparing the new target with the true one


@dataclass
class Reference:
    """What the unedited model did on one request's locality prompts (for KL and zsRE locality)."""

    loc_logdist: list[torch.Tensor] = field(default_factory=list)  # (V,) float16 each
    loc_argmax: list[list[int]] = field(default_factory=list)


@dataclass
class _Item:
    req: int
    group: str  # edit_new, edit_true, para_new, para_true, loc, loc_new, port
    prompt: str
    target: str


def _items(i: int, r: EditRequest, style: str) -> list[_Item]:
    cf = style in _TRUE_VS_NEW
    out = [_Item(i, "edit_new", r.text, r.target_new)]
    if cf:
        out.append(_Item(i, "edit_true", r.text, _true(r)))
    for p in r.paraphrases:
        out.append(_Item(i, "para_new", p, r.target_new))
        if cf:
            out.append(_Item(i, "para_true", p, _true(r)))
    for p, expected in r.neighborhood:
        out.append(_Item(i, "loc", p, expected))
        if cf:
            out.append(_Item(i, "loc_new", p, r.target_new))
    for q, a in r.portability:
        out.append(_Item(i, "port", q, a))
    return out


def _true(r: EditRequest) -> str:
    if r.target_true is None:
        raise ValueError("counterfact-style metrics need target_true on every request")
    return r.target_true


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    style: str,
    references: Sequence[Reference] | None = None,
    batch_size: int = 16,
) -> tuple[list[dict[str, float | None]], list[Reference]]:
    """Per-request metric values, and the references to pass when measuring an edited model later."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    items = [it for i, r in enumerate(requests) for it in _items(i, r, style)]
    # locality answers keep their next-token distribution (KL); nothing else needs it
    loc = [it for it in items if it.group == "loc"]
    rest = [it for it in items if it.group != "loc"]
    scores: dict[int, TargetScore] = {}
    for group, first_dist in ((loc, True), (rest, False)):
        order = sorted(range(len(group)), key=lambda k: len(group[k].prompt) + len(group[k].target))
        got = score_targets(model, tok, [group[k].prompt for k in order], [group[k].target for k in order],
                            batch_size=batch_size, first_dist=first_dist)
        for k, sc in zip(order, got):
            scores[id(group[k])] = sc
    by_req: list[dict[str, list[TargetScore]]] = [{} for _ in requests]
    for it in items:
        by_req[it.req].setdefault(it.group, []).append(scores[id(it)])
    records, refs = [], []
    for i, groups in enumerate(by_req):
        ref = references[i] if references is not None else None
        records.append(_record(groups, style, ref))
        refs.append(Reference([s.first_logdist.half() for s in groups.get("loc", [])],
                              [s.argmax for s in groups.get("loc", [])]))
    return records, refs


def _record(g: dict[str, list[TargetScore]], style: str, ref: Reference | None) -> dict[str, float | None]:
    new, paras, locs = g["edit_new"][0], g.get("para_new", []), g.get("loc", [])
    neighborhood = None  # true target beats the new one on the locality prompts
    if style in _TRUE_VS_NEW:
        efficacy = prefers(new.mean_logprob, g["edit_true"][0].mean_logprob)
        generalization = mean([prefers(a.mean_logprob, b.mean_logprob) for a, b in zip(paras, g.get("para_true", []))])
        neighborhood = mean([prefers(a.mean_logprob, b.mean_logprob) for a, b in zip(locs, g.get("loc_new", []))])
    else:
        efficacy = new.token_accuracy
        generalization = mean([s.token_accuracy for s in paras])
    if style == "counterfact":  # ROME's CounterFact: locality is that comparison itself
        locality, neighborhood = neighborhood, None
    else:  # agreement with the unedited model's argmax on the locality answers
        locality = mean([agreement(s.argmax, r) for s, r in zip(locs, ref.loc_argmax)]) if ref else (1.0 if locs else None)
    kl = mean([kl_divergence(r.float(), s.first_logdist) for s, r in zip(locs, ref.loc_logdist)]) if ref else (
        0.0 if locs else None)
    return {
        "efficacy": efficacy,
        "generalization": generalization,
        "locality": locality,
        "neighborhood": neighborhood,
        "edit_success": mean([float(s.greedy_match) for s in [new, *paras]]),
        "loc_accuracy": mean([s.token_accuracy for s in locs]),
        "kl_locality": kl,
        "portability": mean([s.token_accuracy for s in g.get("port", [])]),
    }


@torch.no_grad()
def text_nll(model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token NLL and token count over (N, L) token chunks (decoder-only: causal LM loss;
    encoder-decoder: each chunk is the decoder's labels with an empty encoder input)."""
    total, count = 0.0, 0
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    for s in range(0, len(chunks), batch_size):
        ids = chunks[s : s + batch_size].to(model.device)
        if enc_dec:
            eos = model.config.eos_token_id
            enc = torch.full((ids.shape[0], 1), eos, dtype=torch.long, device=ids.device)
            logits = model(input_ids=enc, labels=ids).logits
            tgt = ids
        else:
            logits = model(input_ids=ids).logits[:, :-1]
            tgt = ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += tgt.numel()
    return total, count
