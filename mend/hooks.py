"""Context managers over module hooks: capture inputs / outputs / output-gradients, patch hidden states.

Every hook is removed when the ``with`` block exits, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextlib.contextmanager
def _hooked(module: nn.Module, hook) -> Iterator[None]:
    """Register a forward hook for the duration of the block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Capture:
    """What one module saw: one entry per forward call (the hook keeps every call, e.g. under generate)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)  # d loss / d output, in backward order

    @property
    def input(self) -> torch.Tensor:
        return self.inputs[-1]

    @property
    def output(self) -> torch.Tensor:
        return self.outputs[-1]

    @property
    def grad(self) -> torch.Tensor:
        return self.grads[-1]


@contextlib.contextmanager
def capture(
    modules: dict[str, nn.Module],
    inputs: bool = True,
    outputs: bool = False,
    grads: bool = False,
    detach: bool = True,
) -> Iterator[dict[str, Capture]]:
    """Record each named module's first positional input, its output and/or the gradient w.r.t. its output."""
    caps = {name: Capture() for name in modules}
    handles = []

    def make_hook(cap: Capture):
        def hook(_mod, args, out):
            out_t = _first(out)
            if inputs:
                x = _first(args)
                cap.inputs.append(x.detach() if detach else x)
            if outputs:
                cap.outputs.append(out_t.detach() if detach else out_t)
            if grads and out_t.requires_grad:
                out_t.register_hook(lambda g: cap.grads.append(g.detach()))

        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make_hook(caps[name])))
        yield caps
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add_to_output(
    module: nn.Module, vector: torch.Tensor, positions: Sequence[int] | torch.Tensor
) -> Iterator[None]:
    """Add ``vector`` (d,) or per-row ``(batch, d)`` to ``module``'s output at token ``positions[b]`` of row b."""
    pos = torch.as_tensor(positions, dtype=torch.long)

    def hook(_mod, _args, out):
        hidden = _first(out)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        p = pos.to(hidden.device).expand(hidden.shape[0]) if pos.ndim == 0 else pos.to(hidden.device)
        vec = vector.to(hidden.dtype)
        hidden = hidden.clone()
        hidden[rows, p] = hidden[rows, p] + vec
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    with _hooked(module, hook):
        yield


@contextlib.contextmanager
def replace_output(module: nn.Module, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> Iterator[None]:
    """Replace ``module``'s output (all of it, or the (row, position) entries in ``positions``) with ``hidden``."""

    def hook(_mod, _args, out):
        cur = _first(out)
        if positions is None:
            new = hidden.to(cur.dtype)
        else:
            new = cur.clone()
            new[positions[:, 0], positions[:, 1]] = hidden.to(cur.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    with _hooked(module, hook):
        yield


@contextlib.contextmanager
def weight_deltas(pairs: Sequence[tuple[nn.Module, torch.Tensor]]) -> Iterator[None]:
    """Run modules as if their weight were ``W + Δ`` without touching ``W``: each hook adds ``x Δᵀ`` to the output
    (right for ``nn.Linear`` and GPT-2's ``Conv1D`` alike, since Δ is in the ``(d_out, d_in)`` convention).
    ``pairs`` holds (module, Δ); the result is differentiable in Δ."""

    def make_hook(delta: torch.Tensor):
        def hook(_mod, args, out):
            x = _first(args)
            return out + x @ delta.T.to(x.dtype)

        return hook

    handles = [mod.register_forward_hook(make_hook(d)) for mod, d in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
