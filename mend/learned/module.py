"""The common part of the LightningModules that train a learned editor's hypernetwork on a frozen base model
(MEND: :mod:`mend.learned.mend.module`; MALMEN: :mod:`mend.learned.malmen.module`), and the metrics they share.

The loss of both: the edited model on the edit prompts and their paraphrases (``L_e``: mean target NLL per row) and
on locality examples (``L_loc``: KL(pre ‖ post) over the answer tokens), ``loss = c_edit · L_e + c_loc · L_loc``,
differentiated w.r.t. the hypernetwork only. The edit prompt itself is in ``L_e`` beside its paraphrases: trained
on paraphrases alone, success on the edit prompt decays.

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
from mend.learned.factors import edit_factors, target_tokens
from mend.learned.hypernet import MendHypernet, WeightSpec
from mend.learned.upper_blocks import UpperBlocks
from mend.moments import input_moments
from mend.scoring import TargetBatch, make_batch

log = logging.getLogger(__name__)
VAL_METRICS = ("loss", "edit_nll", "kl", "edit_acc", "edit_success", "edit_success_pre", "loc_agreement", "drawdown",
               "relation_agreement", "text_agreement")
LOC_KINDS = ("neighbour", "relation", "text")  # locality rows: the record's neighbours, same-relation prompts, text


@dataclass
class OptimSection:
    lr: float = field(default=2.0e-3, metadata=NONNEGATIVE)  # Adam, hypernetwork weights
    lr_alpha: float = field(default=3.0e-2, metadata=NONNEGATIVE)  # Adam, log step sizes (1e-2 moves α by ~1%)
    weight_decay: float = field(default=0.0, metadata=NONNEGATIVE)
    schedule: str = "cosine"  # cosine (both rates, from 1 to min_lr_ratio over max_steps) | constant (the last editor swings)
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
    c_loc: float = 1.25  # with the cosine: 1.0 gave edit_success 0.613 / locality 0.864, 1.25 0.638 / 0.881
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


class LearnedModule(pl.LightningModule):
    """What the learned editors' Lightning modules share: the frozen base model, the hypernetwork's set-up before
    step 0 (second moments, input statistics), the optimizer and its schedule, validation metrics. Subclasses give
    the hypernetwork and the steps."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef],
                 hypernet: MendHypernet, optim: OptimSection, loss: LossSection, norm_warmup: int = 20,
                 cache_mb: float = 0.0):
        super().__init__()
        model.requires_grad_(False)
        self.frozen = _Frozen(model, tok, refs, cache_mb)
        self.hypernet = hypernet
        self.optim, self.loss_cfg, self.norm_warmup = optim, loss, norm_warmup
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in VAL_METRICS})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "frozen":  # a plain attribute: never a registered child
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # --- set-up ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if getattr(self.frozen.model, "hf_device_map", None) is None:  # a sharded model stays where accelerate put it
            self.frozen.model.to(self.device)

    def on_train_start(self) -> None:
        if self.hypernet.needs_second_moment:
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
                factors, _ = edit_factors(self.frozen.model, self.frozen.adapter, self.frozen.refs, tb, len(tb.prompt_lens),
                                          positions=self.hypernet.cfg.positions)
            for label, (u, d) in factors.items():
                self.hypernet.update_stats(label, u, d)
        n = int(next(iter(self.hypernet.stats_u.values())).count)
        log.info("input statistics warmed up on %d batches (%d tokens per weight)", len(batches), n)

    def _scalar_rates(self) -> dict[str, float]:
        """The hypernetwork's scalar parameters with a learning rate of their own."""
        return {"log_alpha": self.optim.lr_alpha}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        scalars = self._scalar_rates()
        others = [p for n, p in self.hypernet.named_parameters() if n not in scalars]
        return torch.optim.Adam([
            {"params": others, "lr": self.optim.lr, "weight_decay": self.optim.weight_decay},
            *({"params": [getattr(self.hypernet, n)], "lr": lr, "weight_decay": 0.0} for n, lr in scalars.items()),
        ])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        factor = lr_factor(self.trainer.global_step, self.optim.schedule_steps or self.trainer.max_steps, self.optim)
        base = (self.optim.lr, *self._scalar_rates().values())
        for group, lr in zip(self.optimizers(use_pl_optimizer=False).param_groups, base, strict=True):
            group["lr"] = lr * factor

    # --- the step --------------------------------------------------------------------------------------------
    def _tokenize(self, prompts: list[str], targets: list[str]) -> TargetBatch:
        return make_batch(self.frozen.tok, prompts, targets, self.frozen.model)

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


def token_kinds(batch: dict[str, list], rows: torch.Tensor, n_edit: int) -> torch.Tensor:
    """(N,) the kind of each target token's row: -1 for the edit rows, else its index in ``LOC_KINDS`` (from
    ``batch["loc_kind"]``, which ``collate`` writes)."""
    per_row = torch.tensor([-1] * n_edit + [LOC_KINDS.index(k) for k in batch["loc_kind"]], device=rows.device)
    return per_row[rows]


@torch.no_grad()
def accuracies(pre_top: torch.Tensor, post_top: torch.Tensor, tb: TargetBatch, n_edit: int,
                kind: torch.Tensor) -> dict[str, torch.Tensor]:
    """Edit accuracy / success (the first ``n_edit`` rows), locality agreement on the neighbour rows, agreement on
    the relation and text rows (when there are any; ``kind`` from ``_token_kinds``) and drawdown (all locality
    rows), from the (N,) argmax of the packed target logits before and after the edit."""
    rows, ids = target_tokens(tb)
    hit_post, hit_pre = post_top == ids, pre_top == ids  # (N,)
    edit, loc = rows < n_edit, rows >= n_edit
    agree = post_top == pre_top

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
