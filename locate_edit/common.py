"""What the closed-form editors share: settings for statistics and templates, the statistics cache of an editor
instance, and the guard against disabling edits."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef
from mend.config import SEED
from mend.errors import MendError
from mend.models import fingerprint

log = logging.getLogger(__name__)


@dataclass
class StatsSettings:
    corpus: str = "auto"  # auto (WikiText in the data folder, else model samples), self, a path, hf:NAME
    tokens: int = 100_000  # bench/stats_quality.py: scores equal from 30k on; C⁻¹k* within cos 0.95 of 280k's
    seq_len: int = 128


@dataclass
class GuardSettings:
    """When an update counts as a disabling edit: its relative size ‖ΔW‖_F / ‖W‖_F exceeds ``max_norm_ratio``, or
    it raises the perplexity of held-out text (``text_chunks`` × ``text_len`` tokens sampled once from the model) by
    more than ``max_ppl_increase`` (relative; 0 turns this check off). ``action``: reject (return no change, with
    the reason in the diagnostics), warn, or off."""

    action: str = "reject"
    max_norm_ratio: float = 1.0
    max_ppl_increase: float = 0.5
    text_chunks: int = 4
    text_len: int = 64


def default_templates() -> list[list[int]]:
    return [[10, 5]]


@dataclass
class TemplateSettings:
    spec: list[list[int]] = field(default_factory=default_templates)  # [[length, count], ...]
    seed: int = field(default=0, metadata=SEED)


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


class KeyMemory:
    """Σ K Kᵀ of the keys of earlier edits, per weight, kept across ``edit`` calls until :meth:`reset` (sequential
    editing: AlphaEdit's preserved keys, ROME's ``memory``)."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self._sums = {}

    def get(self, ref: WeightRef) -> torch.Tensor | None:
        return self._sums.get(ref.param)

    def add(self, ref: WeightRef, K: torch.Tensor) -> None:
        """Remember the keys ``K`` (d_in, n)."""
        K = K.double()
        prev = self._sums.get(ref.param)
        self._sums[ref.param] = K @ K.T + (0 if prev is None else prev)


class Guard:
    """Checks each update before it is kept (see :class:`GuardSettings`); holds the held-out text per model."""

    def __init__(self, settings: GuardSettings):
        self.s = settings
        if self.off:
            return
        if settings.action not in ("reject", "warn"):
            raise MendError(f"guard.action must be reject, warn or off, got '{settings.action}'")
        self._text: dict[str, torch.Tensor] = {}
        self._before: dict[tuple, float] = {}  # held-out perplexity per model state (see _state_key)

    @property
    def off(self) -> bool:
        return str(self.s.action).lower() in ("off", "false", "no")  # YAML reads a bare `off` as false

    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Sample the held-out text from the (unedited) model, once per model (cached on disk: ~6 s on SmolLM2)."""
        if self.off or self.s.max_ppl_increase <= 0:
            return
        fp = fingerprint(model)
        if fp not in self._text:
            from locate_edit.corpus import self_corpus  # sampled once per model and kept on disk

            self._text[fp] = self_corpus(model, tok, self.s.text_chunks, self.s.text_len, seed=GUARD_SEED,
                                         progress=False)

    def check(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, deltas: dict[WeightRef, torch.Tensor],
              perplexity: bool = True) -> str | None:
        """The reason to reject ``deltas`` (on top of the model's current weights), or None; warns instead when
        ``action`` is warn. ``perplexity=False`` checks the norms only (cheap, e.g. per layer)."""
        if self.off:
            return None
        reason = self._reason(model, tok, deltas, perplexity)
        if reason and self.s.action == "warn":
            log.warning(reason)
            return None
        return reason

    def _reason(self, model, tok, deltas, perplexity: bool) -> str | None:
        from mend.adapters import get_adapter
        from mend.editor import EditResult, edited

        adapter = get_adapter(model)
        for ref, d in deltas.items():
            ratio = float(d.norm() / adapter.get_weight(ref).float().norm().clamp_min(1e-12))
            if not torch.isfinite(d).all() or ratio > self.s.max_norm_ratio:
                return (f"update of {ref.label} rejected: ‖ΔW‖/‖W‖ = {ratio:.3g} > {self.s.max_norm_ratio} "
                        "(a disabling edit; raise guard.max_norm_ratio or set guard.action=warn to allow it)")
        if not perplexity or self.s.max_ppl_increase <= 0:
            return None
        self.prepare(model, tok)
        text = self._text[fingerprint(model)]
        key = _state_key(model)
        before = self._before.get(key)
        if before is None:  # single edits all start from the same weights: measured once, not before every edit
            before = self._before[key] = _ppl(model, text)
            while len(self._before) > 8:
                self._before.pop(next(iter(self._before)))
        with edited(model, EditResult(deltas)):
            after = _ppl(model, text)
        rise = after / before - 1
        if not math.isfinite(rise) or rise > self.s.max_ppl_increase:
            return (f"update of {', '.join(r.label for r in deltas)} rejected: held-out perplexity {before:.3g} -> "
                    f"{after:.3g} (+{rise:.0%} > {self.s.max_ppl_increase:.0%}; a disabling edit; raise "
                    "guard.max_ppl_increase or set guard.action=warn to allow it)")
        return None


def _state_key(model: PreTrainedModel, stride: int = 61) -> tuple:
    """Identifies the model's present weights cheaply (~20 ms on SmolLM2 instead of a 0.7 s perplexity): the
    fingerprint with the sum and sum of squares, in float64, of every ``stride``-th entry of every parameter. An
    edit (dense or a changed row) moves them; an exact restore gives the same key back."""
    s1 = s2 = 0.0
    with torch.no_grad():
        for p in model.parameters():
            x = p.detach().reshape(-1)[::stride].double()
            s1 += float(x.sum())
            s2 += float((x * x).sum())
    return fingerprint(model), s1, s2


GUARD_SEED = 7919  # the held-out text differs from the drawdown text of the evaluator (seed 0)


@torch.no_grad()
def _ppl(model: PreTrainedModel, chunks: torch.Tensor) -> float:
    from mend.evaluation.measure import text_nll

    nll, count = text_nll(model, chunks)
    return math.exp(nll / max(count, 1))


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
    editor._guard.prepare(model, tok)
    context_templates(model, tok, editor.config.templates.spec, editor.config.templates.seed)
