"""The MALMEN editor: a hypernetwork trained by ``python -m mend.train method=malmen`` predicts a value shift at
each edit's keys, and the shifts of all requests in a call are aggregated by least squares with the keys' second
moment as the preservation term (:mod:`mend.learned.malmen.solve`). Hundreds of requests in one call are one solve, not a sum.

Sequential use (``memory``): the keys of earlier calls stay in the solve (``C_prev``, AlphaEdit's / r-ROME's
key memory), so a later batch keeps the values the earlier ones wrote; ``lifelong_norm`` keeps the input
statistics updating with each call's factors (UltraEdit's lifelong normalisation). ``reset()`` forgets both."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.common import KeyMemory
from mend.adapters import WeightRef, get_adapter
from mend.editor import EditResult
from mend.errors import MendError
from mend.learned.hypernet import HypernetConfig
from mend.learned.malmen.hypernet import MalmenHypernet
from mend.learned.malmen.solve import aggregate, batched_factors, fit_residual, shifts
from mend.learned.mend.editor import MendEditor
from mend.learned.run_dir import EditedWeight, EditorInfo
from mend.models import fingerprint
from mend.moments import input_moments
from mend.requests import EditRequest
from mend.scoring import make_batch


@dataclass
class MalmenConfig:
    checkpoint: str | None = None  # a run directory written by python -m mend.train method=malmen
    scale: float = 1.0  # multiplies every ΔW
    memory: bool = True  # sequential use: earlier calls' keys stay in the solve until reset()
    lifelong_norm: bool = True  # update the input statistics with each call's factors (until reset())
    lam: float | None = field(default=None, metadata={"min": 1e-12})  # overrides the learned λ of every weight
    chunk_tokens: int = field(default=1024, metadata={"min": 1})  # tokens per hypernetwork pass
    rows: int = field(default=64, metadata={"min": 1})  # requests per forward/backward for the factors


class MalmenEditor(MendEditor):
    name = "malmen"
    Config = MalmenConfig

    def __init__(self, config: MalmenConfig | None = None, hypernet: MalmenHypernet | None = None,
                 info: EditorInfo | None = None):
        super().__init__(config, hypernet, info)
        self._memory = KeyMemory()
        self._stats: dict[str, torch.Tensor] | None = None  # the statistics as loaded (restored by reset)

    def reset(self) -> None:
        self._memory.reset()
        if self._stats is not None and self._hypernet is not None:
            for name, value in self._stats.items():
                self._hypernet.get_buffer(name).copy_(value)

    def edit(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]
    ) -> EditResult:
        t0 = time.perf_counter()
        hypernet = self._check(model).eval()
        if not isinstance(hypernet, MalmenHypernet):
            raise MendError("the malmen editor needs a MALMEN hypernetwork (python -m mend.train method=malmen)")
        cfg = self.config
        adapter = get_adapter(model)
        refs = [adapter.weight_ref(w.layer, w.kind, w.stack) for w in self.info.weights]
        batch = make_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests], model)
        factors = batched_factors(model, adapter, refs, batch, cfg.rows, hypernet.cfg.positions)
        deltas: dict[WeightRef, torch.Tensor] = {}
        residual: dict[str, float] = {}
        with torch.no_grad():
            if cfg.lifelong_norm and hypernet.cfg.norm:
                if self._stats is None:
                    self._stats = {n: b.clone() for n, b in hypernet.named_buffers() if n.startswith("stats_")}
                for label, (u, d) in factors.items():
                    hypernet.update_stats(label, u, d)
            for ref in refs:
                u, d = factors[ref.label]
                D = shifts(hypernet, ref.label, u, d, cfg.chunk_tokens)
                C_prev = self._memory.get(ref) if cfg.memory else None
                _, dW = aggregate(hypernet, ref.label, u, D, C_prev, cfg.lam)
                residual[ref.label] = fit_residual(dW, u, D)
                deltas[ref] = (cfg.scale * dW).to(adapter.get_weight(ref).dtype)
                if cfg.memory:
                    self._memory.add(ref, u.T)
            lams = {ref.label: cfg.lam or hypernet.lam(ref.label).item() for ref in refs}
        return EditResult(deltas, {"lambda": lams, "fit_residual": residual,
                                   "tokens": int(sum(f[0].shape[0] for f in factors.values()) // max(1, len(refs)))},
                          time.perf_counter() - t0)


def untrained_malmen(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, refs: list[WeightRef],
                     hcfg: HypernetConfig, warm_requests: list[EditRequest], text_ids: torch.Tensor,
                     lambda_init: float = 1000.0, config: MalmenConfig | None = None) -> MalmenEditor:
    """MALMEN at initialisation (the identity network: each token's shift is a gradient step on its output, as in
    UltraEdit) on ``refs``: statistics from ``warm_requests``' factors, ``M`` from the inputs over ``text_ids``."""
    adapter = get_adapter(model)
    info = EditorInfo(str(model.config.name_or_path), fingerprint(model),
                      [EditedWeight(r.stack, r.layer, r.kind, *adapter.get_weight(r).shape) for r in refs], hcfg,
                      method="malmen")
    hypernet = MalmenHypernet(info.specs(), hcfg, lambda_init)
    batch = make_batch(tokenizer, [r.text for r in warm_requests], [r.target_new for r in warm_requests], model)
    for label, (u, d) in batched_factors(model, adapter, refs, batch, 64, hcfg.positions).items():
        hypernet.update_stats(label, u, d)
    for label, C in input_moments(model, text_ids, refs).items():
        hypernet.set_preconditioner(label, C)
    return MalmenEditor(config or MalmenConfig(), hypernet=hypernet.eval(), info=info)
