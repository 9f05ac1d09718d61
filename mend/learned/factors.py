"""MEND's rank-one gradient factors and edited forward passes.

For an edited weight the gradient of the edit loss is ``Σ_t δ_t u_tᵀ`` (``u_t``: the module's input at token t,
``δ_t``: the gradient of the loss w.r.t. its output). :func:`edit_factors` returns these per token, pad tokens
masked, for every edited weight of every architecture the adapters know (GPT-2's Conv1D included: hooks see
module inputs and outputs, never the stored layout). :func:`edited_target_logits` runs the model with
``W + ΔW`` through ``torch.func.functional_call``, differentiable in ``ΔW``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from mend.adapters import ModelAdapter, WeightRef
from mend.scoring import TargetBatch, forward_target_logits

Factors = tuple[torch.Tensor, torch.Tensor]  # u (N, d_in), δ (N, d_out): one row per non-pad token


def target_tokens(batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The row (N,) and id (N,) of every real target token, in the order of packed target logits."""
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    return rows, batch.target_ids[rows, cols]


def token_logprobs(plogits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(N,) log-probability of each real target token from packed (N, V) target logits."""
    _, ids = target_tokens(batch)
    return torch.log_softmax(plogits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def row_nll(plogits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B,) mean NLL per target token of each row, from packed (N, V) target logits."""
    rows, _ = target_tokens(batch)
    total = torch.zeros(batch.target_mask.shape[0], device=plogits.device).index_add(0, rows, -token_logprobs(plogits, batch))
    return total / batch.target_mask.sum(1).clamp_min(1)


def token_mask(model: PreTrainedModel, batch: TargetBatch, ref: WeightRef) -> torch.Tensor:
    """(B, L) bool: the real (non-pad) tokens of the sequence ``ref``'s module runs on."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    key = "decoder_attention_mask" if enc_dec and ref.stack == "decoder" else "attention_mask"
    return batch.inputs[key].bool()


def target_positions(model: PreTrainedModel, batch: TargetBatch, ref: WeightRef) -> torch.Tensor:
    """(B, L) bool: the positions whose outputs predict target tokens (decoder-only: ``logit_pos``), or, for an
    encoder-decoder, every real token of the sequence ``ref``'s module runs on (MALMEN's answer tokens)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return token_mask(model, batch, ref)
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    mask = torch.zeros_like(batch.inputs["attention_mask"], dtype=torch.bool)
    mask[rows, batch.logit_pos[rows, cols]] = True
    return mask


POSITIONS = ("all", "target")


def edit_factors(
    model: PreTrainedModel, adapter: ModelAdapter, refs: Sequence[WeightRef], batch: TargetBatch, n_rows: int,
    positions: str = "all",
) -> tuple[dict[str, Factors], torch.Tensor]:
    """Factors of the edit loss ``Σ_{b < n_rows} mean_t NLL(target_b)`` for each edited weight (by label), and
    the detached packed (N, V) target logits of every row of ``batch`` (rows ``>= n_rows`` ride along, unedited).

    Tokens are kept where the attention mask is set and ``δ ≠ 0`` (as the reference code does): a token no loss
    depends on (the last one; a decoder position after a shorter target) has no gradient to transform, and
    keeping it would make a request's edit depend on the other requests' lengths. ``positions="target"`` keeps
    only the positions that predict target tokens (:func:`target_positions`; MALMEN's ``token: ans``).

    A zero scalar that requires grad is added to each edited module's output: it roots the autograd graph at the
    first edited module, so nothing below it is recorded, and the value is unchanged.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    root = torch.zeros((), device=model.device, requires_grad=True)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def make_hook(ref: WeightRef):
        def hook(_mod, args, out):
            inputs[ref.param] = args[0].detach()
            outputs[ref.param] = y = out + root.to(out.device, out.dtype)  # a sharded model: out on its block's device
            return y

        return hook

    handles = [adapter.module(ref).register_forward_hook(make_hook(ref)) for ref in refs]
    try:
        with torch.enable_grad():
            tlogits = forward_target_logits(model, batch, packed=True)  # (N, V)
            loss = row_nll(tlogits, batch)[:n_rows].sum()
            outs = [outputs[ref.param] for ref in refs]
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for ref, out, g in zip(refs, outs, grads):
        g = torch.zeros_like(out) if g is None else g
        where = target_positions(model, batch, ref) if positions == "target" else token_mask(model, batch, ref)
        mask = where[:n_rows] & (g[:n_rows] != 0).any(-1)  # (n, L)
        factors[ref.label] = (inputs[ref.param][:n_rows][mask], g[:n_rows][mask])  # (N, d_in), (N, d_out)
    return factors, tlogits.detach()


class _TargetLogits(nn.Module):
    """Wraps a model so that ``functional_call`` can run its target-only logits."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, batch: TargetBatch) -> torch.Tensor:
        return forward_target_logits(self.model, batch, packed=True)


def edited_params(adapter: ModelAdapter, deltas: dict[WeightRef, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{parameter name: W + ΔW}`` in each parameter's storage layout and dtype (differentiable in ΔW)."""
    out = {}
    for ref, d in deltas.items():
        p = adapter.parameter(ref)
        out[ref.param] = p + adapter.to_stored(ref, d).to(p.dtype)
    return out


def edited_target_logits(
    model: PreTrainedModel, adapter: ModelAdapter, batch: TargetBatch, deltas: dict[WeightRef, torch.Tensor]
) -> torch.Tensor:
    """Packed (N, V) target logits of the model with ``W + ΔW`` for every weight in ``deltas``; ``W`` is
    untouched."""
    params = {f"model.{k}": v for k, v in edited_params(adapter, deltas).items()}
    return torch.func.functional_call(_TargetLogits(model), params, (batch,))
