"""ROME (Meng et al. 2022) and r-ROME (Gupta et al. 2024): a rank-one update of one MLP output projection.

k* is the key at the subject's last token averaged over context templates, v* = W k_p + δ (the output at the
request prompt's own key k_p plus δ optimised there, locate_edit.values), and ΔW = (v* − W k) (C⁻¹k*)ᵀ /
((C⁻¹k*)ᵀ k), so that (W + ΔW) k = v*. ``key_mode`` picks k: ``prompt`` — k_p, as the reference ROME code does;
``average`` — k* itself, r-ROME's consistent use of the averaged key (Gupta et al.'s code: ``cur_input`` and
``cur_output`` averaged over the templates, the target still the prompt's output plus δ; ``v_base: key`` makes
it W k* + δ). ``realized_values`` optimises δ through the update it becomes (``locate_edit.values.Realized``).
Several requests are applied one after another (each on top of the last).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.common import ClosedFormSettings, Guard, KeyMemory, StatsCache, prepare_closed_form
from locate_edit.keys import context_templates, request_keys
from locate_edit.layer_choice import resolve_layers
from locate_edit.solvers import rome_direction, rome_update
from locate_edit.values import Realized, ValueSettings, optimize_values
from mend.adapters import get_adapter
from mend.editor import Editor, EditResult, register_editor, trial_edits
from mend.errors import ConfigError
from mend.requests import EditRequest


@dataclass
class ROMEConfig(ClosedFormSettings):
    layer: int | str = 5  # or auto / auto:TRACE.json: chosen by causal tracing (locate_edit.layer_choice)
    key_mode: str = "prompt"  # prompt (ROME) | average (r-ROME)
    # optimise δ as the update will write it at each template (locate_edit.values.Realized); off: the
    # reference's δ added unchanged at every template
    realized_values: bool = False
    # sequential use: C + memory · Σ k kᵀ over the keys of the earlier edits (since reset()), so that an edit mostly
    # leaves earlier edits' keys, and the direction they share, alone (AlphaEdit keeps them the same way); 0: off
    memory: float = 0.0
    # v* = W k_base + δ: prompt — k_base the bare prompt's own key (both reference codes); key — the key the update
    # is normalised by (r-ROME: the averaged key, whose update is then δ ⊗ direction, without W(k_prompt − k*))
    v_base: str = "prompt"
    value: ValueSettings = field(default_factory=ValueSettings)


@register_editor
class ROMEEditor(Editor):
    name = "rome"
    Config = ROMEConfig

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.key_mode not in ("prompt", "average"):
            raise ConfigError(f"key_mode must be prompt or average, got '{self.config.key_mode}'")
        if self.config.v_base not in ("prompt", "key"):
            raise ConfigError(f"v_base must be prompt or key, got '{self.config.v_base}'")
        self._stats = StatsCache(self.config.stats)
        self._guard = Guard(self.config.guard)
        self._memory = KeyMemory()

    def reset(self) -> None:
        self._memory.reset()

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        layer = resolve_layers(self.config.layer, model, tokenizer, many=False)
        prepare_closed_form(self, model, tokenizer, [get_adapter(model).weight_ref(layer, self.config.kind)])

    def edit(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]) -> EditResult:
        cfg: ROMEConfig = self.config
        t0 = time.perf_counter()
        adapter = get_adapter(model)
        ref = adapter.weight_ref(resolve_layers(cfg.layer, model, tokenizer, many=False), cfg.kind)
        C0 = self._stats.get(model, tokenizer, [ref])[ref]
        templates = context_templates(model, tokenizer, cfg.templates.spec, cfg.templates.seed)
        total = None
        diag: dict = {"steps": [], "loss": [], "rejected": []}
        with trial_edits(model, adapter) as apply:
            for req in requests:  # each edit sees the previous ones
                earlier = self._memory.get(ref) if cfg.memory else None
                C = C0 if earlier is None else C0 + cfg.memory * earlier
                k_avg, k_own = request_keys(model, tokenizer, adapter, ref, [req], templates)
                W = adapter.get_weight(ref).detach()
                k_norm = k_own if cfg.key_mode == "prompt" else k_avg
                k_base = k_own if cfg.v_base == "prompt" else k_norm
                realized = None
                if cfg.realized_values:  # the update is (W k_base + δ − W k_norm) ⊗ direction
                    offset = (W.double() @ (k_base[0] - k_norm[0]).double()).float()
                    realized = Realized(rome_direction(C, k_avg[0], k_norm[0])[None].float(), offset[None])
                vals = optimize_values(model, tokenizer, adapter, [req], templates, adapter.module(ref), ref.layer,
                                       cfg.value, realized)
                # v* = the bare prompt's output plus δ in both modes unless v_base=key (see the module docstring)
                v = (W.double() @ k_base[0].double()).float() + vals.delta[0]
                d = rome_update(W.float(), C, k_avg[0], v, k_norm[0])
                diag["steps"].append(vals.steps[0])
                diag["loss"].append(vals.final_loss[0])
                reason = self._guard.check(model, tokenizer, {ref: d})
                if reason:
                    diag["rejected"].append(reason)
                    continue
                total = d if total is None else total + d
                if cfg.memory:
                    self._memory.add(ref, k_norm[0][:, None])
                if len(requests) > 1:
                    apply(EditResult({ref: d}))
        deltas = {} if total is None else {ref: total}
        return EditResult(deltas, diag, time.perf_counter() - t0)


@dataclass
class RROMEConfig(ROMEConfig):
    key_mode: str = "average"


@register_editor
class RROMEEditor(ROMEEditor):
    """r-ROME: ROME with the averaged key used consistently (``key_mode: average``)."""

    name = "r-rome"
    Config = RROMEConfig
