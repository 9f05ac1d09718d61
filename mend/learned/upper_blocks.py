"""Run only the blocks a MEND edit can change: the frozen blocks below the first edited layer run once per batch
(without gradients), and their output is fed to every pass of the step. Optionally that output is cached per
token sequence, so a sequence seen again (the next epoch, a shared locality prompt) skips the lower blocks.

With right padding a row's hidden states at its real tokens do not depend on the other rows or on padding
(causal attention, absolute positions from 0), so rows computed in different batches can be put together; pad
positions get zeros, which only pad positions ever see.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from mend.adapters import ModelAdapter, WeightRef
from mend.adapters.partial import block_output_len, hidden_before, start_at_layer, supports_partial
from mend.scoring import TargetBatch

log = logging.getLogger(__name__)


class UpperBlocks:
    """Knows the first edited layer of a decoder-only model; see :meth:`only`."""

    def __init__(self, adapter: ModelAdapter, refs: Sequence[WeightRef], cache_mb: float = 0.0):
        self.adapter = adapter
        self.layer = min(r.layer for r in refs) if supports_partial(adapter) else None
        self._tuple_len: int | None = None
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}  # token ids -> (len, d) hidden state
        self._used = 0
        self.hits = self.misses = 0

    @property
    def active(self) -> bool:
        return self.layer is not None and self.layer > 0

    def lower(self, batch: TargetBatch) -> torch.Tensor | None:
        """(B, L, d) input of the first edited block for ``batch`` (no gradients; cached rows reused), or None
        for models without partial passes (T5)."""
        if not self.active:
            return None
        with torch.no_grad():
            return self._hidden(batch.inputs) if self.cache_bytes > 0 else self._lower(batch.inputs)

    @contextlib.contextmanager
    def start_from(self, hidden: torch.Tensor | None) -> Iterator[None]:
        """Inside, forward passes run only the blocks from the first edited layer on, starting from ``hidden``
        (from :meth:`lower`, for the batch being run); a no-op when ``hidden`` is None."""
        if hidden is None:
            yield
            return
        if self._tuple_len is None:
            self._tuple_len = block_output_len(self.adapter, self.layer)
        with start_at_layer(self.adapter, self.layer, hidden, self._tuple_len):
            yield

    @contextlib.contextmanager
    def only(self, batch: TargetBatch) -> Iterator[None]:
        """Inside, forward passes on ``batch``'s inputs run only the blocks from the first edited layer on; the
        blocks below run once here, without gradients. A no-op for models without partial passes (T5)."""
        with self.start_from(self.lower(batch)):
            yield

    def _lower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_before(self.adapter.model, self.adapter.block(self.layer), **inputs)  # (B, L, d)

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, d) hidden states from the cache where present; the other rows computed together."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lens = mask.sum(1).tolist()
        keys = [tuple(ids[i, :n].tolist()) for i, n in enumerate(lens)]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            width = max(lens[i] for i in missing)
            sub = {"input_ids": ids[missing, :width], "attention_mask": mask[missing, :width]}
            h = self._lower(sub)
            for j, i in enumerate(missing):
                fresh[i] = h[j, : lens[i]].clone()
                self._store(keys[i], fresh[i])
        rows = [fresh[i] if i in fresh else self._cache[k] for i, k in enumerate(keys)]
        out = rows[0].new_zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def _store(self, key: tuple[int, ...], h: torch.Tensor) -> None:
        size = h.numel() * h.element_size()
        if self._used + size <= self.cache_bytes:
            self._cache[key] = h
            self._used += size
        elif self._used <= self.cache_bytes:
            log.info("hidden-state cache full (%d sequences, %.0f MB)", len(self._cache), self._used / 2**20)
            self._used = self.cache_bytes + 1  # log once


def hidden_rows(hidden: torch.Tensor | None, sub: TargetBatch, lo: int, hi: int) -> torch.Tensor | None:
    """The rows [lo, hi) of a hidden state from :meth:`UpperBlocks.lower`, trimmed like ``sub`` (``select_rows``)."""
    return None if hidden is None else hidden[lo:hi, : sub.inputs["input_ids"].shape[1]]
