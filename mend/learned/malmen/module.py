"""MALMEN's LightningModule: many edits per step, aggregated by least squares, the backward split at ``ΔW``
(:func:`mend.learned.malmen.solve.meta_step`); manual optimisation, since a step runs several backward passes."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef
from mend.learned.factors import target_tokens
from mend.learned.hypernet import HypernetConfig
from mend.learned.malmen.hypernet import MalmenHypernet
from mend.learned.malmen.solve import LossPlan, MalmenSection, fact_moments, meta_step
from mend.learned.module import (
    VAL_METRICS,
    LearnedModule,
    LossSection,
    OptimSection,
    accuracies,
    token_kinds,
    weight_specs,
)
from mend.moments import input_moments
from mend.scoring import TargetBatch

log = logging.getLogger(__name__)


class MalmenModule(LearnedModule):
    """Trains MALMEN's hypernetwork (:mod:`mend.learned.malmen.solve`): many edits per step, aggregated by least squares, the
    backward split at ``ΔW`` (manual optimisation: several backward passes per step, one chunk's graph each)."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef],
                 hypernet: HypernetConfig, optim: OptimSection, loss: LossSection, malmen: MalmenSection,
                 norm_warmup: int = 20, cache_mb: float = 0.0, clip_norm: float | None = 1.0):
        super().__init__(model, tok, refs, MalmenHypernet(weight_specs(model, refs), hypernet, malmen.lambda_init),
                         optim, loss, norm_warmup, cache_mb)
        self.malmen, self.clip_norm = malmen, clip_norm
        self.automatic_optimization = False

    def _scalar_rates(self) -> dict[str, float]:
        return {"log_alpha": self.optim.lr_alpha, "log_lambda": self.malmen.lr_lambda}

    @torch.no_grad()
    def fit_preconditioner(self) -> None:
        """M of every weight: its inputs' second moment over ``hypernet.precondition_tokens`` tokens of text and,
        with ``malmen.fact_rows``, at the answer positions of that many known facts (the training batches'
        neighbour and relation rows with their true answers), before step 0."""
        f, dm = self.frozen, self.trainer.datamodule
        ids = dm.statistics_tokens(f.model, f.tok, self.hypernet.cfg.precondition_tokens)
        text = input_moments(f.model, ids, f.refs, progress=self.trainer.progress_bar_callback is not None)
        facts: dict[str, torch.Tensor] = {}
        prompts: list[str] = []
        targets: list[str] = []
        if self.malmen.fact_rows > 0:
            for b in dm.warmup_batches(max(1, -(-self.malmen.fact_rows // dm.batch_size))):
                for p, t, k in zip(b["loc_prompt"], b["loc_target"], b["loc_kind"]):
                    if k != "text" and len(prompts) < self.malmen.fact_rows:
                        prompts.append(p)
                        targets.append(t)
            if prompts:
                facts = fact_moments(f.model, f.adapter, f.refs, prompts, targets, f.tok)
        for label, C in text.items():
            self.hypernet.set_preconditioner(label, C, facts.get(label))
        log.info("M set from %d tokens of text and %d facts", ids.numel(), len(prompts) if facts else 0)

    def malmen_step(self, batch: dict[str, list], train: bool) -> tuple[Any, TargetBatch, int, torch.Tensor]:
        n = len(batch["prompt"])
        n_edit = n + len(batch["paraphrase"])
        f = self.frozen
        tb = self._tokenize(batch["prompt"] + batch["paraphrase"] + batch["loc_prompt"],
                            batch["target"] + batch["para_target"] + batch["loc_target"])
        rows, _ = target_tokens(tb)
        kind = token_kinds(batch, rows, n_edit)
        plan = LossPlan(n_edit, kind, self.loss_cfg.c_edit, self.loss_cfg.c_loc, self.loss_cfg.c_text)
        out = meta_step(self.hypernet, f.model, f.adapter, f.refs, f.upper, tb, n, plan, self.malmen,
                        self.manual_backward if train else None, update_stats=train and self.hypernet.cfg.norm)
        return out, tb, n_edit, kind

    def _metrics(self, batch: dict[str, list], train: bool) -> dict[str, torch.Tensor]:
        out, tb, n_edit, kind = self.malmen_step(batch, train)
        metrics = {"loss": torch.tensor(out.loss), "edit_nll": torch.tensor(out.edit_nll), "kl": torch.tensor(out.kl),
                   "delta_norm": torch.tensor(out.delta_norm), "fit_residual": torch.tensor(out.residual)}
        metrics.update(accuracies(out.pre_top, out.post_top, tb, n_edit, kind))
        return metrics

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        ddp = self.trainer.strategy.model if isinstance(self.trainer.strategy.model, DistributedDataParallel) else None
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():  # several backward passes: no reducer
            out = self._metrics(batch, train=True)
        if ddp is not None:
            _average_gradients(self.hypernet)
        if self.clip_norm:
            self.clip_gradients(opt, gradient_clip_val=self.clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        bs = len(batch["prompt"])
        for k, v in out.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "edit_success", "kl"), batch_size=bs)
        self.log("train/alpha", self.hypernet.log_alpha.detach().exp().mean(), batch_size=bs)
        self.log("train/lambda", self.hypernet.log_lambda.detach().exp().mean(), batch_size=bs)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        out = self._metrics(batch, train=False)
        for k in VAL_METRICS:
            if k in out:
                self.val_metrics[k].update(out[k])


def _average_gradients(module: torch.nn.Module) -> None:
    """Mean of every parameter's gradient over the ranks (DDP's reduction, done once after the split backward)."""
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)
