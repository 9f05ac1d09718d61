"""What the closed-form editors share: settings for statistics and templates, the statistics cache of an editor
instance, and the guard against disabling edits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef
from mend.errors import MendError
from mend.models import fingerprint

log = logging.getLogger(__name__)


@dataclass
class StatsSettings:
    corpus: str = "auto"  # auto (WikiText in the data folder, else model samples), self, a path, hf:NAME
    tokens: int = 100_000
    seq_len: int = 128


@dataclass
class GuardSettings:
    """Reject an update whose relative size ‖ΔW‖_F / ‖W‖_F exceeds ``max_norm_ratio`` (a disabling edit).
    ``action``: reject (return no change, with the reason in the diagnostics), warn, or off."""

    action: str = "reject"
    max_norm_ratio: float = 0.25


def default_templates() -> list[list[int]]:
    return [[10, 5]]


@dataclass
class TemplateSettings:
    spec: list[list[int]] = field(default_factory=default_templates)  # [[length, count], ...]
    seed: int = 0


class StatsCache:
    """C = E[k kᵀ] per weight, loaded once per editor instance (computed and cached on disk by locate_edit.stats)."""

    def __init__(self, settings: StatsSettings):
        self.s = settings
        self._mem: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef]) -> dict[WeightRef, torch.Tensor]:
        fp = fingerprint(model)
        missing = [r for r in refs if (fp, r.param) not in self._mem]
        if missing:
            from locate_edit.stats import second_moments

            by_stack: dict[tuple[str, str], list[WeightRef]] = {}
            for r in missing:
                by_stack.setdefault((r.stack, r.kind), []).append(r)
            for (stack, kind), rs in by_stack.items():
                got = second_moments(model, tok, [r.layer for r in rs], corpus=self.s.corpus, n_tokens=self.s.tokens,
                                     seq_len=self.s.seq_len, kind=kind, stack=stack)
                for r in rs:
                    self._mem[(fp, r.param)] = got[r.layer].double()
        return {r: self._mem[(fp, r.param)] for r in refs}


def guard(deltas: dict[WeightRef, torch.Tensor], weights: dict[WeightRef, torch.Tensor], s: GuardSettings,
          ) -> str | None:
    """The reason to reject these deltas, or None. Logs a warning when action is 'warn'."""
    if str(s.action).lower() in ("off", "false", "no"):  # YAML reads a bare `off` as false
        return None
    if s.action not in ("reject", "warn"):
        raise MendError(f"guard.action must be reject, warn or off, got '{s.action}'")
    for ref, d in deltas.items():
        ratio = float(d.norm() / weights[ref].float().norm().clamp_min(1e-12))
        if not torch.isfinite(d).all() or ratio > s.max_norm_ratio:
            reason = (f"update of {ref.label} rejected: ‖ΔW‖/‖W‖ = {ratio:.3g} > {s.max_norm_ratio} "
                      "(a disabling edit; raise guard.max_norm_ratio or set guard.action=warn to allow it)")
            if s.action == "warn":
                log.warning(reason)
                return None
            return reason
    return None


@dataclass
class ClosedFormSettings:
    """Settings every closed-form editor has (ROMEConfig and MEMITConfig extend it)."""

    kind: str = "mlp_out"
    templates: TemplateSettings = field(default_factory=TemplateSettings)
    stats: StatsSettings = field(default_factory=StatsSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)


def prepare_closed_form(editor, model: PreTrainedModel, tok: PreTrainedTokenizerBase, refs: list[WeightRef]) -> None:
    """Load (or compute and cache) the statistics and the context templates an editor will need."""
    from locate_edit.keys import context_templates

    editor._stats.get(model, tok, refs)
    context_templates(model, tok, editor.config.templates.spec, editor.config.templates.seed)
