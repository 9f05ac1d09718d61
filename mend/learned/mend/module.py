"""MEND's LightningModule (Mitchell et al. 2022, Alg. 1): the edit examples' factors ``(u, δ)`` →
``ΔW = −α Σ δ̃ ũᵀ`` (the B edits of a batch summed) → the edited model, run with ``torch.func.functional_call`` →
``loss = c_edit · L_e + c_loc · L_loc`` (:mod:`mend.learned.module`), backpropagated in one graph."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef
from mend.learned.factors import edit_factors, edited_target_logits, row_nll, target_tokens
from mend.learned.hypernet import HypernetConfig, MendHypernet
from mend.learned.module import (
    LOC_KINDS,
    VAL_METRICS,
    LearnedModule,
    LossSection,
    OptimSection,
    accuracies,
    token_kinds,
    weight_specs,
)
from mend.learned.upper_blocks import hidden_rows
from mend.scoring import forward_target_logits, select_rows


class MendModule(LearnedModule):
    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef],
                 hypernet: HypernetConfig, optim: OptimSection, loss: LossSection, norm_warmup: int = 20,
                 cache_mb: float = 0.0):
        super().__init__(model, tok, refs, MendHypernet(weight_specs(model, refs), hypernet), optim, loss,
                         norm_warmup, cache_mb)

    def deltas(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[WeightRef, torch.Tensor]:
        return {ref: self.hypernet.delta(ref.label, *factors[ref.label]) for ref in self.frozen.refs}

    def step(self, batch: dict[str, list], update_stats: bool) -> dict[str, torch.Tensor]:
        """Loss and diagnostics for a batch of B edits. Rows: B edit prompts, their paraphrases (the edit loss
        rows, ``n_edit`` in all), then the locality examples (``batch["loc_kind"]``: neighbour, relation or text)."""
        n = len(batch["prompt"])
        n_edit = n + len(batch["paraphrase"])
        f = self.frozen
        tb = self._tokenize(batch["prompt"] + batch["paraphrase"] + batch["loc_prompt"],
                            batch["target"] + batch["para_target"] + batch["loc_target"])
        rows_all = tb.target_ids.shape[0]
        hidden = f.upper.lower(tb)  # (R, L, d) input of the first edited block, or None (no partial passes)
        # The factors need gradients on the edit rows only; the other rows' unedited logits need none.
        edit_tb, rest_tb = select_rows(tb, 0, n), select_rows(tb, n, rows_all)
        with f.upper.start_from(hidden_rows(hidden, edit_tb, 0, n)):
            factors, pre_edit = edit_factors(f.model, f.adapter, f.refs, edit_tb, n, positions=self.hypernet.cfg.positions)
        with torch.no_grad(), f.upper.start_from(hidden_rows(hidden, rest_tb, n, rows_all)):
            pre_rest = forward_target_logits(f.model, rest_tb, packed=True)
        pre = torch.cat([pre_edit, pre_rest])  # (N, V) unedited, packed (rows in order)
        if update_stats:
            for label, (u, d) in factors.items():
                self.hypernet.update_stats(label, u, d)
        deltas = self.deltas(factors)
        with f.upper.start_from(hidden):
            post = edited_target_logits(f.model, f.adapter, tb, deltas)  # (N, V) edited
        rows, _ = target_tokens(tb)
        kind = token_kinds(batch, rows, n_edit)
        text = kind == LOC_KINDS.index("text")
        loc = rows >= n_edit  # (N,) locality tokens
        edit_nll = row_nll(post, tb)[:n_edit].mean()
        lp_pre = torch.log_softmax(pre[loc].float(), -1)
        lp_post = torch.log_softmax(post[loc].float(), -1)
        kl_tok = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)  # KL(pre ‖ post) per locality token
        c_text, text_loc = self.loss_cfg.c_text, text[loc]
        if c_text is None or not text_loc.any():
            kl = kl_tok.mean()
        else:
            kl = kl_tok[~text_loc].mean() + c_text * kl_tok[text_loc].mean()
        loss = self.loss_cfg.c_edit * edit_nll + self.loss_cfg.c_loc * kl
        out = {"loss": loss, "edit_nll": edit_nll.detach(), "kl": kl.detach()}
        out.update(accuracies(pre.detach().argmax(-1), post.detach().argmax(-1), tb, n_edit, kind))
        out["delta_norm"] = torch.stack([d.detach().norm() for d in deltas.values()]).mean()
        return out

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        out = self.step(batch, update_stats=self.hypernet.cfg.norm)
        bs = len(batch["prompt"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/edit_success", out["edit_success"], prog_bar=True, batch_size=bs)
        self.log("train/kl", out["kl"], prog_bar=True, batch_size=bs)
        for k in ("edit_nll", "edit_acc", "edit_success_pre", "loc_agreement", "drawdown", "delta_norm",
                  "relation_agreement", "text_agreement"):
            if k in out:
                self.log(f"train/{k}", out[k], batch_size=bs)
        self.log("train/alpha", self.hypernet.log_alpha.detach().exp().mean(), batch_size=bs)
        self.log("train/lr", self.optimizers(use_pl_optimizer=False).param_groups[0]["lr"], batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        out = self.step(batch, update_stats=False)
        for k in VAL_METRICS:
            if k in out:  # relation_agreement / text_agreement: only with such rows
                self.val_metrics[k].update(out[k].detach())
