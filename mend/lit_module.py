"""The LightningModule that trains MEND's hypernetwork on a frozen base model.

One step (Mitchell et al. 2022, Alg. 1): the edit examples' factors ``(u, δ)`` → ``ΔW = −α Σ δ̃ ũᵀ`` (the B edits
of a batch summed) → the edited model, run with ``torch.func.functional_call``, on the edit prompts and their
paraphrases (``L_e``: mean target NLL per row) and on locality examples (``L_loc``: KL(pre ‖ post) over the answer
tokens) → ``loss = c_edit · L_e + c_loc · L_loc``, differentiated w.r.t. the hypernetwork only. The edit prompt
itself is in ``L_e`` beside its paraphrases: trained on paraphrases alone, success on the edit prompt decays.

The base model is held outside the module's registered children: it is neither trained, checkpointed nor
wrapped by DDP; it follows the module's device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef, get_adapter
from mend.config import NONNEGATIVE
from mend.factors import edit_factors, edited_target_logits, row_nll, target_tokens
from mend.hypernet import HypernetConfig, MendHypernet, WeightSpec
from mend.moments import input_moments
from mend.scoring import TargetBatch, forward_target_logits, make_batch, select_rows
from mend.upper_blocks import UpperBlocks

log = logging.getLogger(__name__)
VAL_METRICS = ("loss", "edit_nll", "kl", "edit_acc", "edit_success", "edit_success_pre", "loc_agreement", "drawdown",
               "relation_agreement", "text_agreement")
LOC_KINDS = ("neighbour", "relation", "text")  # locality rows: the record's neighbours, same-relation prompts, text


@dataclass
class OptimSection:
    lr: float = field(default=2.0e-3, metadata=NONNEGATIVE)  # Adam, hypernetwork weights
    lr_alpha: float = field(default=3.0e-2, metadata=NONNEGATIVE)  # Adam, log step sizes (1e-2 moves α by ~1%)
    weight_decay: float = field(default=0.0, metadata=NONNEGATIVE)
    schedule: str = "constant"  # constant | cosine (both rates, from 1 to min_lr_ratio over trainer.max_steps)
    warmup_steps: int = 0  # linear warm-up of both rates from 0
    min_lr_ratio: float = 0.1  # cosine: the rates' final fraction
    schedule_steps: int | None = None  # the cosine's length (default trainer.max_steps): a run may stop before its end


SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, max_steps: int, optim: OptimSection) -> float:
    """The learning-rate multiplier at optimizer step ``step``: a function of the step alone, so a resumed run
    (or one resumed with another schedule) continues on the curve instead of restarting it."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant" or max_steps <= optim.warmup_steps:
        return 1.0
    t = min(1.0, (step - optim.warmup_steps) / (max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class LossSection:
    c_edit: float = 0.1  # paper: 0.1
    c_loc: float = 1.0
    # The ordinary-text rows (data.text_locality): None pools their tokens with the neighbours' into one mean, so
    # that a 12-word continuation outweighs a 1-3 token neighbour answer; a number X makes the locality term
    # KL(neighbour and relation tokens) + X · KL(text tokens), each a mean over its own tokens.
    c_text: float | None = None


class _Frozen:
    """The base model and what goes with it, kept out of nn.Module registration."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef],
                 cache_mb: float = 0.0):
        self.model, self.tok, self.refs = model, tok, refs
        self.adapter = get_adapter(model)
        self.upper = UpperBlocks(self.adapter, refs, cache_mb)


def weight_specs(model: PreTrainedModel, refs: list[WeightRef]) -> list[WeightSpec]:
    adapter = get_adapter(model)
    return [WeightSpec(r.label, *adapter.get_weight(r).shape) for r in refs]


class MendModule(pl.LightningModule):
    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef],
                 hypernet: HypernetConfig, optim: OptimSection, loss: LossSection, norm_warmup: int = 20,
                 cache_mb: float = 0.0):
        super().__init__()
        model.requires_grad_(False)
        self.frozen = _Frozen(model, tok, refs, cache_mb)
        self.hypernet = MendHypernet(weight_specs(model, refs), hypernet)
        self.optim, self.loss_cfg, self.norm_warmup = optim, loss, norm_warmup
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in VAL_METRICS})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "frozen":  # a plain attribute: never a registered child
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # --- set-up ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.frozen.model.to(self.device)

    def on_train_start(self) -> None:
        if self.hypernet.cfg.precondition and not self.hypernet.preconditioned:
            self.fit_preconditioner()
        if self.hypernet.cfg.norm and not self.hypernet.stats_ready:
            self.warm_up_statistics()

    @torch.no_grad()
    def fit_preconditioner(self) -> None:
        """``hypernet.precondition``: each edited weight's ``P`` from the second moment of its input over
        ``hypernet.precondition_tokens`` tokens of ordinary text (one pass of the frozen model, before step 0)."""
        f, n = self.frozen, self.hypernet.cfg.precondition_tokens
        ids = self.trainer.datamodule.statistics_tokens(f.model, f.tok, n)
        for label, C in input_moments(f.model, ids, f.refs, progress=self.trainer.progress_bar_callback is not None).items():
            self.hypernet.set_preconditioner(label, C)
        log.info("preconditioner set from the input second moments over %d tokens", ids.numel())

    @torch.no_grad()
    def warm_up_statistics(self) -> None:
        """Fill the running input statistics from ``norm_warmup`` training batches before the first step."""
        dm = self.trainer.datamodule
        batches = dm.warmup_batches(max(1, self.norm_warmup))
        for b in batches:
            tb = self._tokenize(b["prompt"], b["target"])
            with self.frozen.upper.only(tb):
                factors, _ = edit_factors(self.frozen.model, self.frozen.adapter, self.frozen.refs, tb, len(tb.prompt_lens))
            for label, (u, d) in factors.items():
                self.hypernet.update_stats(label, u, d)
        n = int(next(iter(self.hypernet.stats_u.values())).count)
        log.info("input statistics warmed up on %d batches (%d tokens per weight)", len(batches), n)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        others = [p for n, p in self.hypernet.named_parameters() if n != "log_alpha"]
        return torch.optim.Adam([
            {"params": others, "lr": self.optim.lr, "weight_decay": self.optim.weight_decay},
            {"params": [self.hypernet.log_alpha], "lr": self.optim.lr_alpha, "weight_decay": 0.0},
        ])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        factor = lr_factor(self.trainer.global_step, self.optim.schedule_steps or self.trainer.max_steps, self.optim)
        base = (self.optim.lr, self.optim.lr_alpha)
        for group, lr in zip(self.optimizers(use_pl_optimizer=False).param_groups, base):
            group["lr"] = lr * factor

    # --- the step --------------------------------------------------------------------------------------------
    def _tokenize(self, prompts: list[str], targets: list[str]) -> TargetBatch:
        return make_batch(self.frozen.tok, prompts, targets, self.frozen.model)

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
        with f.upper.start_from(_slice(hidden, edit_tb, 0, n)):
            factors, pre_edit = edit_factors(f.model, f.adapter, f.refs, edit_tb, n)
        with torch.no_grad(), f.upper.start_from(_slice(hidden, rest_tb, n, rows_all)):
            pre_rest = forward_target_logits(f.model, rest_tb, packed=True)
        pre = torch.cat([pre_edit, pre_rest])  # (N, V) unedited, packed (rows in order)
        if update_stats:
            for label, (u, d) in factors.items():
                self.hypernet.update_stats(label, u, d)
        deltas = self.deltas(factors)
        with f.upper.start_from(hidden):
            post = edited_target_logits(f.model, f.adapter, tb, deltas)  # (N, V) edited
        rows, _ = target_tokens(tb)
        kind = _token_kinds(batch, rows, n_edit)
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
        out.update(_accuracies(pre.detach(), post.detach(), tb, n_edit, kind))
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

    def on_validation_epoch_end(self) -> None:
        values: dict[str, torch.Tensor] = {}
        for k in VAL_METRICS:
            m = self.val_metrics[k]
            if m.update_count:
                values[k] = m.compute()
                self.log(f"val/{k}", values[k], prog_bar=k in ("edit_success", "kl"))
            m.reset()
        if "edit_success" in values and "loc_agreement" in values:
            self.log("val/score", val_score(values["edit_success"], values["loc_agreement"]), prog_bar=True)


def val_score(edit_success: torch.Tensor, loc_agreement: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of edit success and locality agreement: what ``<out>/best`` keeps the editor with the best of."""
    a, b = edit_success.float(), loc_agreement.float()
    return 2 * a * b / (a + b).clamp_min(1e-12)  # 0 when both are 0


def _slice(hidden: torch.Tensor | None, sub: TargetBatch, lo: int, hi: int) -> torch.Tensor | None:
    """The rows [lo, hi) of a cached hidden state, trimmed like ``sub`` (see ``select_rows``)."""
    return None if hidden is None else hidden[lo:hi, : sub.inputs["input_ids"].shape[1]]


def _token_kinds(batch: dict[str, list], rows: torch.Tensor, n_edit: int) -> torch.Tensor:
    """(N,) the kind of each target token's row: -1 for the edit rows, else its index in ``LOC_KINDS`` (from
    ``batch["loc_kind"]``, which ``collate`` writes)."""
    per_row = torch.tensor([-1] * n_edit + [LOC_KINDS.index(k) for k in batch["loc_kind"]], device=rows.device)
    return per_row[rows]


@torch.no_grad()
def _accuracies(pre: torch.Tensor, post: torch.Tensor, tb: TargetBatch, n_edit: int,
                kind: torch.Tensor) -> dict[str, torch.Tensor]:
    """Edit accuracy / success (the first ``n_edit`` rows), locality agreement on the neighbour rows, agreement on
    the relation and text rows (when there are any; ``kind`` from ``_token_kinds``) and drawdown (all locality
    rows), from packed (N, V) target logits before and after the edit."""
    rows, ids = target_tokens(tb)
    hit_post, hit_pre = post.argmax(-1) == ids, pre.argmax(-1) == ids  # (N,)
    edit, loc = rows < n_edit, rows >= n_edit
    agree = post.argmax(-1) == pre.argmax(-1)

    def success(hit: torch.Tensor) -> torch.Tensor:  # rows whose every target token is the argmax
        misses = torch.zeros(tb.target_mask.shape[0], device=hit.device).index_add(0, rows, (~hit).float())
        return (misses[:n_edit] == 0).float().mean()

    out = {
        "edit_acc": hit_post[edit].float().mean(),
        "edit_success": success(hit_post),
        "edit_success_pre": success(hit_pre),
        "loc_agreement": agree[kind == 0].float().mean(),
        "drawdown": hit_pre[loc].float().mean() - hit_post[loc].float().mean(),
    }
    for i, name in enumerate(LOC_KINDS[1:], 1):
        if (kind == i).any():
            out[f"{name}_agreement"] = agree[kind == i].float().mean()
    return out
