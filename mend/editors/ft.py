"""Constrained fine-tuning (FT-L): the baseline of Meng et al. 2022 (ROME, appendix), after Zhu et al. 2020.

Fine-tunes the chosen layers' MLP output weights on the targets' negative log-likelihood with Adam, projecting the
change back into an L∞ ball after every step: ``‖ΔW‖_∞ ≤ norm_constraint`` element-wise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import get_adapter
from mend.config import NONNEGATIVE
from mend.editor import Editor, EditResult
from mend.hooks import weight_deltas
from mend.requests import EditRequest
from mend.scoring import forward_target_logits, make_batch, nll_at_targets


@dataclass
class FTConfig:
    layers: list[int] = field(default_factory=lambda: [0])  # negative counts from the last layer
    kind: str = "mlp_out"
    stack: str | None = None  # encoder-decoder models: "encoder" or "decoder" (default: the first stack)
    lr: float = field(default=5e-4, metadata=NONNEGATIVE)
    steps: int = 25
    norm_constraint: float = 5e-4  # L∞ bound on every element of ΔW; <= 0 disables it
    weight_decay: float = field(default=0.0, metadata=NONNEGATIVE)
    early_stop_loss: float = 1e-2  # stop when the mean target NLL per token falls below this


class FTEditor(Editor):
    name = "ft"
    Config = FTConfig

    def edit(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]
    ) -> EditResult:
        cfg: FTConfig = self.config
        t0 = time.perf_counter()
        adapter = get_adapter(model)
        stacks = [cfg.stack or adapter.default_stack]  # one stack, as documented in FTConfig.stack
        refs = adapter.weight_refs(kinds=[cfg.kind], layers=cfg.layers, stacks=stacks)
        modules = {ref.param: adapter.module(ref) for ref in refs}
        # Δ in the (d_out, d_in) convention, applied through hooks: W itself is never touched
        deltas = {ref.param: torch.zeros_like(adapter.get_weight(ref), requires_grad=True) for ref in refs}
        opt = torch.optim.Adam(deltas.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        batch = make_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests], model)
        losses: list[float] = []
        pairs = [(modules[name], d) for name, d in deltas.items()]
        for _ in range(cfg.steps):
            with weight_deltas(pairs):
                loss = nll_at_targets(forward_target_logits(model, batch), batch)
            losses.append(loss.item())
            if losses[-1] < cfg.early_stop_loss:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            if cfg.norm_constraint > 0:
                with torch.no_grad():
                    for d in deltas.values():
                        d.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
        out = {ref: deltas[ref.param].detach() for ref in refs}
        return EditResult(out, {"losses": losses, "steps": len(losses)}, time.perf_counter() - t0)
