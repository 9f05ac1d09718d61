"""Partial forward passes: run only the blocks from layer l up (lower blocks skipped, their output supplied), or
stop a forward pass once a module has run. Editors that optimise at layer l use the first to compute the layers
below once; statistics use the second to skip the layers above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from mend.adapters.base import ModelAdapter


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; caught by :func:`stop_after`."""


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Inside the block, a forward pass ends (silently) as soon as ``module`` has produced its output."""

    def hook(_mod, _args, _out):
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


def run_until(model: nn.Module, module: nn.Module, **inputs) -> None:
    """Run ``model(**inputs)`` only as far as ``module`` (capture what you need with hooks)."""
    with stop_after(module):
        model(**inputs)


def hidden_before(model: nn.Module, block: nn.Module, **inputs) -> torch.Tensor:
    """The hidden state ``block`` receives under ``model(**inputs)``; the forward pass stops before the block."""
    seen: list[torch.Tensor] = []

    def pre_hook(_mod, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input hidden state in the block's output structure."""

    def __init__(self, tuple_len: int):
        super().__init__()
        self.tuple_len = tuple_len

    def forward(self, hidden_states, *args, **kwargs):
        if self.tuple_len:
            return (hidden_states, *([None] * (self.tuple_len - 1)))
        return hidden_states


def block_output_len(adapter: ModelAdapter, layer: int, stack: str | None = None) -> int:
    """0 when the block returns a tensor, else the length of the tuple it returns (probed on one token)."""
    seen: list[int] = []
    block = adapter.block(layer, stack)
    h = block.register_forward_hook(lambda _m, _a, out: seen.append(len(out) if isinstance(out, tuple) else 0))
    try:
        dev = adapter.model.device
        run_until(adapter.model, block, input_ids=torch.ones(1, 1, dtype=torch.long, device=dev))
    finally:
        h.remove()
    return seen[0]


def prefix_cache_applies(model: nn.Module, seq_len: int) -> bool:
    """Whether keys and values cached from a prefix run give a later pass the same attention as the whole
    sequence: decoder-only models, on sequences within any sliding attention window."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    return not getattr(cfg, "is_encoder_decoder", False) and (window is None or seq_len <= window)


def cache_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a transformers cache, each (batch, heads, positions, d_head)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def kv_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh transformers cache holding ``kv`` (a forward pass appends to it, so build one per pass)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


def supports_partial(adapter: ModelAdapter) -> bool:
    """Blocks are independent of each other's extra outputs (not T5, whose first block makes the position bias)."""
    return not adapter.is_encoder_decoder


@contextlib.contextmanager
def start_at_layer(
    adapter: ModelAdapter, layer: int, hidden: torch.Tensor, tuple_len: int | None = None
) -> Iterator[None]:
    """Inside the block, forward passes skip blocks ``< layer`` and feed ``hidden`` (the input the block saw)
    to block ``layer``. The caller passes the same input ids / mask as when ``hidden`` was captured.
    ``tuple_len`` (from :func:`block_output_len`) saves the probe forward when the caller already knows it."""
    if not supports_partial(adapter):
        raise ValueError(f"{type(adapter.model).__name__} does not support partial forward passes")
    layer = adapter.resolve_layer(layer)
    blocks = adapter.blocks()
    if tuple_len is None:
        tuple_len = block_output_len(adapter, layer)
    originals = [blocks[i] for i in range(layer)]

    def pre_hook(_mod, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(layer):
            blocks[i] = _PassThrough(tuple_len)
        yield
    finally:
        for i, blk in enumerate(originals):
            blocks[i] = blk
        handle.remove()
