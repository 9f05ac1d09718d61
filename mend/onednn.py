"""Faster float32 linear layers for inference on CPU: oneDNN with prepacked weights instead of MKL.

On the AMD EPYC (Zen 5) machines this project runs on, MKL's sgemm takes its AVX2 path (~85 GFLOP/s per core for
SmolLM2's shapes) while oneDNN's prepacked kernel uses AVX-512 (~200 GFLOP/s): the same float32 maths, summed
in another order (outputs agree to ~1e-6 relative). Inside :func:`onednn_linears`, every ``nn.Linear`` and GPT-2
``Conv1D`` of a float32 CPU model runs that way; with gradients enabled (which the oneDNN op does not propagate)
layers fall back to their own forward. Weights must not change inside the block (the packed copies would be stale).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


def _op_available() -> bool:
    """The prepacked oneDNN linear exists and agrees with ``F.linear`` on a small case."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return False
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        with torch.inference_mode():
            y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, None), None, "none", [], "")
        return bool(torch.allclose(y, x @ w.T, atol=1e-5))
    except (RuntimeError, TypeError) as e:
        log.info("oneDNN linear unavailable: %s", e)
        return False


def _weight(mod: nn.Module) -> torch.Tensor | None:
    """The (d_out, d_in) float32 CPU weight of a linear layer, or None for anything else."""
    if isinstance(mod, nn.Linear):
        w = mod.weight
    elif isinstance(mod, Conv1D):
        w = mod.weight.T  # stored [in, out]
    else:
        return None
    return w.detach() if w.dtype == torch.float32 and w.device.type == "cpu" else None


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, original):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32:
            return original(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Inside the block, the model's float32 CPU linear layers run through oneDNN (see the module docstring);
    yields whether any did. A no-op when disabled, on other devices or dtypes, or when the op is missing."""
    layers = [(m, w) for m in model.modules() if (w := _weight(m)) is not None] if enabled else []
    if not layers or not _op_available():
        yield False
        return
    ops = torch.ops.mkldnn
    patched = []  # (module, the instance's own forward attribute before, if it had one)
    try:
        for mod, w in layers:
            bias = None if mod.bias is None else mod.bias.detach()
            patched.append((mod, mod.__dict__.get("forward")))
            mod.forward = _packed_forward(ops._reorder_linear_weight(w.contiguous(), None), bias, mod.forward)
        yield True
    finally:
        for mod, own in patched:
            if own is None:
                del mod.forward  # the class's forward shows again
            else:
                mod.forward = own  # e.g. a hook wrapper that was there before
