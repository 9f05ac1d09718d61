"""Uncentred second moments E[k kᵀ] of module inputs, accumulated over a streamed forward pass.

The closed-form editors' statistics (``locate_edit.stats``: cached per layer, from a corpus) and MEND's optional
preconditioner (``hypernet.precondition``) both gather them here: forward pre-hooks add ``kᵀk`` of each watched
module's input over a batch's real positions into a running sum (float64 by default), and each pass stops once
the last watched module has run, so no upper block and no LM head is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from mend.adapters import ModelAdapter, WeightRef, get_adapter
from mend.adapters.partial import stop_after
from mend.errors import MendError


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision keys (no overflow, fast), else the keys' own dtype (float64 stays float64)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class KeyMoments:
    """Forward pre-hooks that add k kᵀ of each module's input, over the current batch's real positions, into a
    running sum per key. ``select`` (flat boolean mask, or None for all positions) is set before each batch."""

    def __init__(self, adapter: ModelAdapter, refs: dict[Hashable, WeightRef], dtype: torch.dtype):
        self.modules = {key: adapter.module(ref) for key, ref in refs.items()}
        # (d_in, d_in) sums beside each weight (the same device unless the model is split over several)
        weights = {key: adapter.get_weight(ref) for key, ref in refs.items()}
        self.sums = {key: torch.zeros(w.shape[1], w.shape[1], dtype=dtype, device=w.device)
                     for key, w in weights.items()}
        self.select: torch.Tensor | None = None

    def hook(self, key: Hashable) -> Callable[[nn.Module, tuple], None]:
        total = self.sums[key]

        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            k = args[0].reshape(-1, args[0].shape[-1])
            if self.select is not None:
                k = k[self.select]
            k = k.to(device=total.device, dtype=matmul_dtype(k.dtype))
            total.add_(k.T @ k)

        return pre_hook

    @contextmanager
    def attached(self) -> Iterator[KeyMoments]:
        handles = [m.register_forward_pre_hook(self.hook(key)) for key, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def collect(self, model: PreTrainedModel, input_ids: torch.Tensor, stop: nn.Module,
                attention_mask: torch.Tensor | None = None, stack: str | None = None, batch_size: int = 8,
                progress: bool = False, desc: str = "statistics") -> dict[Hashable, torch.Tensor]:
        """Add every real position of ``input_ids`` to the sums (one :func:`forward_batches` pass ending after
        ``stop``) and return them."""

        def on_batch(select: torch.Tensor | None) -> None:
            self.select = select

        with self.attached():
            forward_batches(model, input_ids, stop, attention_mask, stack, batch_size, on_batch, progress, desc)
        return self.sums


def run_model(model: PreTrainedModel, adapter: ModelAdapter, stack: str, ids: torch.Tensor,
              mask: torch.Tensor | None) -> None:
    """One forward pass over a batch; the encoder alone for T5's encoder stack. An encoder-decoder's decoder reads
    the chunk shifted right (teacher forcing on the same text)."""
    if not adapter.is_encoder_decoder:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    elif stack == "encoder":
        model.get_encoder()(input_ids=ids, attention_mask=mask)
    else:
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(ids),
              decoder_attention_mask=mask, use_cache=False)


def forward_batches(model: PreTrainedModel, input_ids: torch.Tensor, stop: nn.Module,
                    attention_mask: torch.Tensor | None = None, stack: str | None = None, batch_size: int = 8,
                    on_batch: Callable[[torch.Tensor | None], None] | None = None, progress: bool = False,
                    desc: str = "statistics") -> None:
    """Run the model over ``input_ids`` in batches, each pass ending once ``stop`` has run (inference mode).

    ``on_batch(select)`` is called before each batch with the flat boolean mask of its real positions (None when
    the batch has no padding, in which case no mask is given to the model either, keeping its fastest path).
    The statistics pass and the benchmark's plain forward share this loop, so both batch identically.
    """
    from tqdm.auto import tqdm

    adapter = get_adapter(model)
    stack = stack or adapter.default_stack
    dev = model.device
    starts = range(0, input_ids.shape[0], batch_size)
    with torch.inference_mode():
        for lo in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            ids = input_ids[lo:lo + batch_size].to(dev)
            mask = None if attention_mask is None else attention_mask[lo:lo + batch_size].to(dev)
            if mask is not None and bool(mask.all()):
                mask = None
            if on_batch is not None:
                on_batch(None if mask is None else mask.reshape(-1).bool())
            with stop_after(stop):
                run_model(model, adapter, stack, ids, mask)


def input_moments(model: PreTrainedModel, input_ids: torch.Tensor, refs: Sequence[WeightRef], batch_size: int = 8,
                  accumulate: torch.dtype = torch.float64, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{ref.label: E[k kᵀ]}`` of each weight's module input over every position of ``input_ids`` (no padding),
    in one pass (an encoder-decoder runs whole, its decoder on the chunks shifted right)."""
    if not refs:
        raise MendError("no weights to gather input statistics for")
    adapter = get_adapter(model)
    last = max(refs, key=lambda r: (r.stack == "decoder", r.layer))  # decoders run after their encoder
    stop = adapter.block(last.layer, last.stack)  # the whole block: every watched module in it has run
    stack = "decoder" if adapter.is_encoder_decoder else None
    sums = KeyMoments(adapter, {r.label: r for r in refs}, accumulate).collect(
        model, input_ids, stop, None, stack, batch_size, progress, desc="input statistics")
    return {label: s / input_ids.numel() for label, s in sums.items()}
