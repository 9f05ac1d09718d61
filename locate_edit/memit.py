"""MEMIT (Meng et al. 2023) and its relatives EMMET (Gupta et al. 2024) and AlphaEdit (Fang et al. 2025):
batch edits spread over several MLP output projections.

The target z of the residual stream after the last edited layer L is optimised once (z = h + δ); then, layer by
layer in ascending order, the keys K of that layer and the remaining residual (z − h_current) / (layers left)
give the update from the chosen ``solver``:

- ``memit``: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ (least squares with covariance preservation);
- ``emmet``: minimise tr(ΔW C ΔWᵀ) subject to (W + ΔW) K = W K + R (equality constraint);
- ``alphaedit``: the update projected onto the null space of the preserved keys, also of earlier edits' keys in
  sequential use (kept by the editor until ``reset()``).

Each layer's update is applied before the next layer's keys and residual are measured, as in the reference code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.common import ClosedFormSettings, Guard, KeyMemory, StatsCache, prepare_closed_form
from locate_edit.keys import context_templates, module_io_at, request_keys, subject_rows
from locate_edit.layer_choice import resolve_layers
from locate_edit.solvers import alphaedit_update, emmet_update, memit_update, null_space_projector
from locate_edit.values import ValueSettings, optimize_values
from mend.adapters import WeightRef, get_adapter
from mend.editor import Editor, EditResult, register_editor, trial_edits
from mend.errors import ConfigError
from mend.requests import EditRequest

SOLVERS = ("memit", "emmet", "alphaedit")


def _memit_values() -> ValueSettings:
    return ValueSettings(clamp_norm_factor=0.75)


@dataclass
class MEMITConfig(ClosedFormSettings):
    layers: list[int] | str = field(default_factory=lambda: [3, 4, 5, 6, 7])  # or auto (locate_edit.layer_choice)
    solver: str = "memit"  # memit | emmet | alphaedit
    mom2_weight: float = 15000.0  # λ of MEMIT (GPT-J's reference value; configs/model/*.yaml set it per model)
    emmet_lambda: float = 0.1  # regularises Kᵀ C⁻¹ K in EMMET
    null_threshold: float = 2e-2  # AlphaEdit: eigenvalues of C below this span the preserved null space
    null_relative: bool = False  # threshold relative to the largest eigenvalue
    l2: float = 10.0  # AlphaEdit's ridge term
    value: ValueSettings = field(default_factory=_memit_values)


@register_editor
class MEMITEditor(Editor):
    name = "memit"
    Config = MEMITConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, got '{self.config.solver}'")
        self._stats = StatsCache(self.config.stats)
        self._guard = Guard(self.config.guard)
        self._projectors: dict[str, torch.Tensor] = {}
        self._memory = KeyMemory()  # AlphaEdit: Σ K_p K_pᵀ of earlier edits, per weight

    def reset(self) -> None:
        self._memory.reset()

    def _refs(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[WeightRef]:
        adapter = get_adapter(model)
        layers = sorted({adapter.resolve_layer(x) for x in resolve_layers(self.config.layers, model, tokenizer, True)})
        return [adapter.weight_ref(layer, self.config.kind) for layer in layers]

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        prepare_closed_form(self, model, tokenizer, self._refs(model, tokenizer))

    def edit(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> EditResult:
        cfg: MEMITConfig = self.config
        t0 = time.perf_counter()
        adapter = get_adapter(model)
        refs = self._refs(model, tokenizer)
        Cs = self._stats.get(model, tokenizer, refs)
        templates = context_templates(model, tokenizer, cfg.templates.spec, cfg.templates.seed)
        last = refs[-1].layer
        out_module = adapter.block(last)
        t_v = time.perf_counter()
        vals = optimize_values(model, tokenizer, adapter, requests, templates, out_module, last, cfg.value)
        v_seconds = time.perf_counter() - t_v
        z = vals.init + vals.delta  # (n, d) targets of the residual stream after block L
        texts, pos = subject_rows(tokenizer, requests, ["{}"])
        deltas: dict[WeightRef, torch.Tensor] = {}
        keys: dict[WeightRef, torch.Tensor] = {}
        diag: dict = {"v_seconds": v_seconds, "steps": vals.steps, "loss": vals.final_loss}
        with trial_edits(model, adapter) as apply:
            for i, ref in enumerate(refs):
                K = request_keys(model, tokenizer, adapter, ref, requests, templates)[0].T.double()  # (d_in, n)
                cur = module_io_at(model, tokenizer, adapter, out_module, texts, pos, output=True)  # (n, d)
                R = ((z - cur).T / (len(refs) - i)).double()  # (d_out, n)
                W = adapter.get_weight(ref).detach()
                d = self._solve(ref, W, Cs[ref], K, R).to(W.dtype)
                reason = self._guard.check(model, tokenizer, {ref: d}, perplexity=False)
                if reason:
                    diag["rejected"] = [reason]
                    deltas = {}
                    break
                deltas[ref], keys[ref] = d, K
                apply(EditResult({ref: d}))
        reason = self._guard.check(model, tokenizer, deltas) if deltas else None
        if reason:
            diag["rejected"], deltas = [reason], {}
        if cfg.solver == "alphaedit" and deltas:
            for ref, K in keys.items():
                self._memory.add(ref, K)
        return EditResult(deltas, diag, time.perf_counter() - t0)

    def _solve(self, ref: WeightRef, W: torch.Tensor, C: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        cfg: MEMITConfig = self.config
        if cfg.solver == "memit":
            return memit_update(C, K, R, cfg.mom2_weight)
        if cfg.solver == "emmet":
            lam = cfg.emmet_lambda if K.shape[1] > 1 else 0.0  # as the reference code: one key is never regularised
            return emmet_update(W.double(), C, K, W.double() @ K + R, lam)
        if ref.param not in self._projectors:
            self._projectors[ref.param] = null_space_projector(C, cfg.null_threshold, cfg.null_relative)
        return alphaedit_update(self._projectors[ref.param], K, R, self._memory.get(ref), cfg.l2)


@dataclass
class EMMETConfig(MEMITConfig):
    solver: str = "emmet"


@register_editor
class EMMETEditor(MEMITEditor):
    """EMMET: MEMIT's layer spreading with the equality-constrained solver."""

    name = "emmet"
    Config = EMMETConfig


@dataclass
class AlphaEditConfig(MEMITConfig):
    solver: str = "alphaedit"


@register_editor
class AlphaEditEditor(MEMITEditor):
    """AlphaEdit: MEMIT's layer spreading with null-space projected updates."""

    name = "alphaedit"
    Config = AlphaEditConfig
