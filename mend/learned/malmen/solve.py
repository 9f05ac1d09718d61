"""MALMEN's aggregation and its memory-flat meta-gradient (Tan et al. 2024, "Massive Editing for Large Language
Models via Meta Learning"; method note: docs/malmen.md).

Editing: every kept token of every edit gives a key ``u_t`` and a predicted value shift ``d_t``
(:meth:`MalmenHypernet.value_shift`); per weight, ``ΔW = D Uᵀ (U Uᵀ + λ M + C_prev)⁻¹`` by
``locate_edit.solvers.ridge_system`` / ``ridge_update``, the solve the closed-form editors use.

Training (:func:`meta_step`), the split backward of the paper's §4.2: the loss of the edited model is run in chunks
of rows with ``ΔW`` as a detached leaf, so each chunk's graph is freed after its ``∂L/∂ΔW`` is added up;
``ridge_backward`` turns ``G = ∂L/∂ΔW`` into ``∂L/∂D`` and ``∂L/∂λ``; the hypernetwork is then differentiated
chunk by chunk of tokens against ``∂L/∂D``. No graph ever holds more than one chunk, so the memory of a step
does not grow with the number of edits beyond the O(tokens · d) factors themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from locate_edit.solvers import RidgeSystem, ridge_backward, ridge_system, ridge_update
from mend.adapters import ModelAdapter, WeightRef
from mend.config import NONNEGATIVE
from mend.learned.factors import (
    Factors,
    edit_factors,
    edited_target_logits,
    row_nll,
    target_positions,
    target_tokens,
)
from mend.learned.malmen.hypernet import MalmenHypernet
from mend.learned.upper_blocks import UpperBlocks, hidden_rows
from mend.scoring import TargetBatch, forward_target_logits, select_rows


@dataclass
class MalmenSection:
    """``python -m mend.train method=malmen`` settings."""

    lambda_init: float = field(default=1000.0, metadata={"min": 1e-12})  # λ of every weight at step 0 (in key units)
    chunk_tokens: int = field(default=1024, metadata={"min": 1})  # tokens per hypernetwork pass (paper: 1024)
    loss_rows: int = field(default=32, metadata={"min": 1})  # rows per edited forward of the loss (paper: 32)
    lr_lambda: float = field(default=3.0e-2, metadata=NONNEGATIVE)  # Adam, log λ
    fact_rows: int = field(default=2000, metadata={"min": 0})  # known facts (locality rows) whose answer keys join M


def shifts(hypernet: MalmenHypernet, label: str, u: torch.Tensor, d: torch.Tensor, chunk: int) -> torch.Tensor:
    """(N, d_out) value shifts of all tokens, ``chunk`` tokens per pass of the hypernetwork."""
    if u.shape[0] == 0:
        return u.new_zeros(0, d.shape[1])
    return torch.cat([hypernet.value_shift(label, u[i:i + chunk], d[i:i + chunk]) for i in range(0, u.shape[0], chunk)])


def aggregate(hypernet: MalmenHypernet, label: str, u: torch.Tensor, D: torch.Tensor,
              C_prev: torch.Tensor | None = None, lam: float | None = None) -> tuple[RidgeSystem, torch.Tensor]:
    """The solve and ``ΔW`` (d_out, d_in, float32) writing shifts ``D`` (N, d_out) at keys ``u`` (N, d_in)."""
    lam_value = hypernet.lam(label).detach() if lam is None else lam
    system = ridge_system(u.T, lam_value, hypernet.preservation(label), C_prev)
    return system, ridge_update(system, D.detach().T.double()).float()


def fit_residual(dW: torch.Tensor, u: torch.Tensor, D: torch.Tensor) -> float:
    """``‖ΔW U − D‖ / ‖D‖``: how far the solve is from writing every shift exactly (λ and ``C_prev`` pull it)."""
    return float((dW @ u.T.float() - D.T).norm() / D.norm().clamp_min(1e-30))


def batched_factors(model, adapter: ModelAdapter, refs: Sequence[WeightRef], batch: TargetBatch,
                    rows: int, positions: str, n: int | None = None, upper: UpperBlocks | None = None,
                    hidden: torch.Tensor | None = None) -> dict[str, Factors]:
    """Factors of the first ``n`` rows of ``batch`` (all by default), ``rows`` rows per forward and backward: each
    row's factors depend on that row alone, and the graph never holds more than ``rows`` rows. With ``upper`` and
    ``hidden`` (its :meth:`~UpperBlocks.lower` of ``batch``) only the blocks from the first edited one run."""
    n = batch.target_ids.shape[0] if n is None else n
    parts = []
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        sub = select_rows(batch, lo, hi)
        with upper.start_from(hidden_rows(hidden, sub, lo, hi)) if upper is not None else contextlib.nullcontext():
            parts.append(edit_factors(model, adapter, refs, sub, hi - lo, positions=positions)[0])
    return {r.label: (torch.cat([p[r.label][0] for p in parts]), torch.cat([p[r.label][1] for p in parts]))
            for r in refs}


@torch.no_grad()
def fact_moments(model, adapter: ModelAdapter, refs: Sequence[WeightRef], prompts: Sequence[str],
                 targets: Sequence[str], tok, rows: int = 32) -> dict[str, torch.Tensor]:
    """``{label: E[k kᵀ]}`` (float64) of each weight's input at the positions that predict the targets of known
    facts ``(prompt, true target)``: the keys an edit at those positions must preserve. Under ``torch.distributed``
    the sums are reduced over the ranks (each rank holds its own facts; all end with the same moments)."""
    from mend.scoring import make_batch

    sums = {r.label: torch.zeros(adapter.get_weight(r).shape[1], adapter.get_weight(r).shape[1], dtype=torch.float64,
                                 device=model.device) for r in refs}
    count = torch.zeros((), dtype=torch.float64, device=model.device)
    seen: dict[str, torch.Tensor] = {}
    hooks = [adapter.module(r).register_forward_hook(lambda m, a, o, r=r: seen.__setitem__(r.label, a[0]))
             for r in refs]
    try:
        for lo in range(0, len(prompts), rows):
            batch = make_batch(tok, prompts[lo:lo + rows], targets[lo:lo + rows], model)
            model(**batch.inputs)
            mask = target_positions(model, batch, refs[0])
            for r in refs:
                keys = seen[r.label][mask].double()
                sums[r.label] += (keys.T @ keys).to(sums[r.label].device)
            count += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for s in [*sums.values(), count]:
            torch.distributed.all_reduce(s)
    return {label: s / count.clamp_min(1) for label, s in sums.items()}


@dataclass
class LossPlan:
    """How each target token enters the meta loss: ``c_edit · mean row NLL (edit rows) + c_loc · KL``."""

    n_edit: int  # the first n_edit rows are edit rows (edit prompts and paraphrases)
    kind: torch.Tensor  # (N,) per target token: -1 edit row, else its locality kind (0 neighbour, 1 relation, 2 text)
    c_edit: float
    c_loc: float
    c_text: float | None  # None: one KL mean over all locality tokens; else KL(others) + c_text · KL(text)

    def kl_weights(self) -> torch.Tensor:
        """(N,) each locality token's weight in the KL term (0 for edit tokens)."""
        loc = self.kind >= 0
        text = self.kind == 2
        w = torch.zeros(self.kind.shape, dtype=torch.float32, device=self.kind.device)
        if self.c_text is None or not text.any():
            w[loc] = 1.0 / max(1, int(loc.sum()))
        else:
            other = loc & ~text
            w[other] = 1.0 / max(1, int(other.sum()))
            w[text] = self.c_text / int(text.sum())
        return w


@dataclass
class StepOutput:
    loss: float
    edit_nll: float
    kl: float
    pre_top: torch.Tensor  # (N,) argmax of the unedited target logits
    post_top: torch.Tensor  # (N,) argmax of the edited ones
    delta_norm: float
    residual: float  # mean over weights of ‖ΔW U − D‖ / ‖D‖


def meta_step(hypernet: MalmenHypernet, model, adapter: ModelAdapter, refs: Sequence[WeightRef],
              upper: UpperBlocks, tb: TargetBatch, n_prompts: int, plan: LossPlan, settings: MalmenSection,
              backward: Callable[[torch.Tensor], None] | None, update_stats: bool) -> StepOutput:
    """One meta step on a batch: rows ``[0, n_prompts)`` are the edits, ``[0, plan.n_edit)`` the edit loss rows,
    the rest locality rows. With ``backward`` (e.g. ``LightningModule.manual_backward``) the hypernetwork's and
    λ's gradients are accumulated through it; without, only the loss and diagnostics are computed."""
    train = backward is not None
    rows_all = tb.target_ids.shape[0]
    hidden = upper.lower(tb)
    factors = batched_factors(model, adapter, refs, tb, settings.loss_rows, hypernet.cfg.positions, n_prompts, upper,
                              hidden)
    if update_stats:
        for label, (u, d) in factors.items():
            hypernet.update_stats(label, u, d)
    systems, dws, ds = {}, {}, {}
    with torch.no_grad():
        for ref in refs:
            u, d = factors[ref.label]
            ds[ref] = shifts(hypernet, ref.label, u, d, settings.chunk_tokens)
            systems[ref], dws[ref] = aggregate(hypernet, ref.label, u, ds[ref])
    grads = {ref: torch.zeros_like(w) for ref, w in dws.items()}
    tok_rows, _ = target_tokens(tb)
    kl_w = plan.kl_weights()
    pre_top, post_top = [], []
    edit_total = kl_total = 0.0
    for lo in range(0, rows_all, settings.loss_rows):
        hi = min(rows_all, lo + settings.loss_rows)
        sub = select_rows(tb, lo, hi)
        sel = (tok_rows >= lo) & (tok_rows < hi)
        h = hidden_rows(hidden, sub, lo, hi)
        with torch.no_grad(), upper.start_from(h):
            pre = forward_target_logits(model, sub, packed=True).float()
        leaves = {ref: w.detach().requires_grad_(train) for ref, w in dws.items()}
        with torch.set_grad_enabled(train), upper.start_from(h):
            post = edited_target_logits(model, adapter, sub, leaves).float()
            nll = row_nll(post, sub)  # (hi - lo,)
            n_edit_here = max(0, min(hi, plan.n_edit) - lo)
            edit_part = nll[:n_edit_here].sum() / plan.n_edit
            lp_pre, lp_post = torch.log_softmax(pre, -1), torch.log_softmax(post, -1)
            kl_tok = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
            kl_part = (kl_tok * kl_w[sel]).sum()
            loss = plan.c_edit * edit_part + plan.c_loc * kl_part
        if train:
            for ref, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
                grads[ref] += g
        edit_total += float(edit_part.detach())
        kl_total += float(kl_part.detach())
        pre_top.append(pre.argmax(-1))
        post_top.append(post.detach().argmax(-1))
    residuals = []
    for ref in refs:
        u, d = factors[ref.label]
        D = ds[ref]
        residuals.append(fit_residual(dws[ref], u, D))
        if not train:
            continue
        gD, g_lam = ridge_backward(systems[ref], grads[ref].double(), dws[ref].double())
        backward(hypernet.lam(ref.label) * g_lam.float())  # ∂L/∂log λ = λ ∂L/∂λ
        gD = gD.T.float()  # (N, d_out)
        for i in range(0, u.shape[0], settings.chunk_tokens):
            c = slice(i, i + settings.chunk_tokens)
            backward((hypernet.value_shift(ref.label, u[c], d[c]) * gD[c]).sum())
    return StepOutput(plan.c_edit * edit_total + plan.c_loc * kl_total, edit_total, kl_total,
                      torch.cat(pre_top), torch.cat(post_top),
                      float(torch.stack([w.norm() for w in dws.values()]).mean()), sum(residuals) / len(residuals))
