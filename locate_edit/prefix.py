"""Prefix caching for the v* optimisation. δ is added at each row's subject's last token, so in a causal model every
position before it computes the same thing at every step: their keys and values are kept from the first full
pass over the rows (which computes them anyway), and each step runs only the rest of the row (from the subject's
last token on; on SmolLM2 about a third of the tokens of a context template row).

Layout: row i's tokens before its split position ``p_i`` are the prefix (right-padded to ``P = max p_i``), the
rest is the suffix (right-padded). The suffix's attention mask spans prefix and suffix columns, its position ids
continue from ``p_i``, so each suffix token sees exactly the tokens it saw in the full row. The split token is the
suffix's first column in every row.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import DynamicCache, PreTrainedModel

from mend.adapters.partial import cache_kv, kv_cache, prefix_cache_applies
from mend.models import fingerprint
from mend.scoring import TargetBatch, forward_target_logits, index_rows, split_head

log = logging.getLogger(__name__)

_checked: dict[str, bool] = {}  # model fingerprint -> whether the cached forward matched the full one


@dataclasses.dataclass
class SuffixBatch:
    """The suffix rows of a batch, with the prefix's keys and values; :meth:`batch` gives a fresh cache per call
    (a forward pass appends to it)."""

    suffix: TargetBatch
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    cols: torch.Tensor  # (B, S) column of each suffix token in the full batch (clamped at the row's end)

    def batch(self) -> TargetBatch:
        return dataclasses.replace(self.suffix, inputs={**self.suffix.inputs, "cache": kv_cache(self.kv)})

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) suffix positions of a (B, L, ...) tensor computed on the full batch."""
        idx = self.cols.view(*self.cols.shape, *([1] * (full.ndim - 2))).expand(-1, -1, *full.shape[2:])
        return full.gather(1, idx)

    def select(self, rows: torch.Tensor) -> SuffixBatch:
        """The suffix batch of ``rows`` (indices) only."""
        return SuffixBatch(index_rows(self.suffix, rows), [(k[rows], v[rows]) for k, v in self.kv], self.cols[rows])


def _cacheable(model: PreTrainedModel, batch: TargetBatch) -> bool:
    base, head = split_head(model)
    ids = batch.inputs.get("input_ids")
    return base is not None and head is not None and ids is not None and prefix_cache_applies(model, ids.shape[1])


def forward_keeping_cache(model: PreTrainedModel, batch: TargetBatch
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """:func:`mend.scoring.forward_target_logits` of the full rows and, where prefixes can be cached, every
    layer's keys and values: by the causal mask, a row's first columns hold what a run of its prefix alone
    computes, so :func:`split_batch` takes them instead of running the prefixes again."""
    if not _cacheable(model, batch):
        return forward_target_logits(model, batch), None
    cache = DynamicCache()
    logits = forward_target_logits(model, dataclasses.replace(
        batch, inputs={**batch.inputs, "cache": cache, "use_cache": True}))
    return logits, cache_kv(cache)


def split_batch(model: PreTrainedModel, batch: TargetBatch, split: torch.Tensor,
                kv: list[tuple[torch.Tensor, torch.Tensor]], min_saving: float = 0.2) -> SuffixBatch | None:
    """The suffix batch of the tokens from ``split[i]`` on in each row, attending to the tokens before it through
    ``kv`` (the full rows' keys and values from :func:`forward_keeping_cache`), or None when the model cannot
    (encoder-decoder, no separate LM head) or the suffix would save less than ``min_saving`` of the tokens."""
    if not _cacheable(model, batch):
        return None
    ids, attn = batch.inputs["input_ids"], batch.inputs.get("attention_mask")
    dev = ids.device
    split = split.to(dev)
    lens = attn.sum(1)
    P, S = int(split.max()), int((lens - split).max())
    if P == 0 or S > (1 - min_saving) * ids.shape[1]:
        return None
    ar_p, ar_s = torch.arange(P, device=dev), torch.arange(S, device=dev)
    pre_mask = (ar_p[None] < split[:, None]).long()
    kv = [(k[:, :, :P], v[:, :, :P]) for k, v in kv]  # a row's columns past its split are masked out below
    cols = (split[:, None] + ar_s[None]).clamp(max=ids.shape[1] - 1)
    suf_mask = (ar_s[None] < (lens - split)[:, None]).long()
    inputs = {"input_ids": ids.gather(1, cols) * suf_mask + ids[:, :1] * (1 - suf_mask),
              "attention_mask": torch.cat([pre_mask, suf_mask], 1), "position_ids": split[:, None] + ar_s[None]}
    logit_pos = (batch.logit_pos - split[:, None]).clamp(min=0)
    suffix = TargetBatch(inputs, batch.target_ids, batch.target_mask, logit_pos, batch.prompt_lens)
    return SuffixBatch(suffix, kv, cols)


def cached_rows(model: PreTrainedModel, batch: TargetBatch, split: torch.Tensor, full_logits: torch.Tensor,
                kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> SuffixBatch | None:
    """:func:`split_batch`, checked once per model: the suffix's target logits must match ``full_logits`` (the
    full batch's, from :func:`mend.scoring.forward_target_logits`, nothing added); if they do not, the model is
    run in full from then on, with a warning."""
    if kv is None:
        return None
    fp = fingerprint(model)
    if fp in _checked:
        return split_batch(model, batch, split, kv) if _checked[fp] else None
    mask = batch.target_mask
    try:  # an architecture whose forward takes no position ids or cache is run in full
        rows = split_batch(model, batch, split, kv)
        if rows is None:
            return None
        with torch.no_grad():
            got = forward_target_logits(model, rows.batch())[mask].float()
        problem = None
        if not torch.allclose(got, full_logits[mask].float(), atol=1e-3, rtol=1e-3):
            problem = f"max logit error {float((got - full_logits[mask].float()).abs().max()):.3g}"
    except (TypeError, ValueError, AttributeError, RuntimeError) as e:
        problem = f"{type(e).__name__}: {e}"
    _checked[fp] = problem is None
    if problem:
        log.warning("prefix caching does not reproduce %s (%s): v* runs the full rows", type(model).__name__, problem)
        return None
    return rows
