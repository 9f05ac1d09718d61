"""Which layers to edit, read off an averaged causal trace; what ``layer=auto`` (ROME) and ``layers=auto``
(MEMIT, EMMET, AlphaEdit) resolve to.

The rule, on the curve c(l) = average indirect effect of restoring the MLP outputs (window around l) at the last
subject token (the paper's evidence for where facts are recalled):

- ROME edits the single layer argmax_l c(l);
- the MEMIT family edits the ``MEMIT_SPAN`` consecutive layers with the largest sum of c (the lowest such window
  on a tie; all layers of a shallower model): the block of high-effect layers, which is how the MEMIT paper
  chose its range (Meng et al. 2023).

Recommendations are cached per model fingerprint in ``cache_dir()/layer_choice/<fingerprint>.json``. The trace
command writes one there (unless a cached one rests on more facts); ``auto`` reads it, or on first use traces
``AUTO_FACTS`` known facts that the model predicts (the built-in facts when the data folder has none) and caches
the result; ``auto:PATH`` uses the trace JSON at PATH instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.trace.average import LAST_SUBJECT, AverageTrace
from mend.errors import ConfigError, MendError
from mend.io import write_json
from mend.models import fingerprint
from mend.paths import cache_dir, data_dir

log = logging.getLogger(__name__)

MEMIT_SPAN = 5
AUTO_FACTS = 30
RULE = ("rome: argmax over layers of the average MLP indirect effect at the last subject token; memit: the "
        f"{MEMIT_SPAN} consecutive layers with the largest sum of that effect")


@dataclass
class LayerChoice:
    rome: int
    memit: list[int]
    curve: list[float]  # average MLP indirect effect at the last subject token, per layer
    n_facts: int
    model: str
    fingerprint: str
    source: str  # the trace it was read from
    rule: str = RULE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recommend(avg: AverageTrace, span: int = MEMIT_SPAN) -> tuple[int, list[int]]:
    """(ROME layer, MEMIT layers) from an averaged trace, by the rule above."""
    if "mlp" not in avg.effects:
        raise MendError("choosing layers needs the MLP trace (kinds must include mlp)")
    curve = avg.effects["mlp"][LAST_SUBJECT].double()  # (L,)
    if not torch.isfinite(curve).all():
        raise MendError("the averaged trace has no last-subject-token row to choose layers from")
    n = min(span, len(curve))
    sums = curve.unfold(0, n, 1).sum(1)  # (L - n + 1,) window sums
    start = int(torch.argmax(sums))  # the first maximum: the lowest window on a tie
    return int(torch.argmax(curve)), list(range(start, start + n))


def make_choice(avg: AverageTrace, model: PreTrainedModel, source: str) -> LayerChoice:
    rome, memit = recommend(avg)
    curve = [round(float(v), 6) for v in avg.effects["mlp"][LAST_SUBJECT]]
    return LayerChoice(rome, memit, curve, avg.n_facts, str(model.config.name_or_path), fingerprint(model), source)


def choice_path(model: PreTrainedModel) -> Path:
    return cache_dir() / "layer_choice" / f"{fingerprint(model)}.json"


def cached_choice(model: PreTrainedModel) -> LayerChoice | None:
    """The cached recommendation for this model, or None (a damaged file is logged and ignored)."""
    path = choice_path(model)
    if not path.exists():
        return None
    try:
        choice = LayerChoice(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring the damaged layer choice %s: %s", path, e)
        return None
    return choice if choice.fingerprint == fingerprint(model) else None


def store_choice(choice: LayerChoice, model: PreTrainedModel) -> Path | None:
    """Cache ``choice`` unless the cached one rests on more facts; the path written, or None."""
    old = cached_choice(model)
    if old is not None and old.n_facts > choice.n_facts:
        log.info("keeping the cached layer choice from %d facts (this trace has %d)", old.n_facts, choice.n_facts)
        return None
    return write_json(choice_path(model), choice.to_json())


def choice_from_trace_file(path: str | Path, model: PreTrainedModel) -> LayerChoice:
    """The recommendation from a trace JSON written by ``python -m locate_edit.trace`` for this model."""
    try:
        doc = json.loads(Path(path).read_text())
        fp, avg = doc["fingerprint"], AverageTrace.from_json(doc["average"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read a causal trace from '{path}': {e}") from e
    if fp != fingerprint(model):
        raise ConfigError(f"the trace in '{path}' was made for model {doc.get('model')} ({fp}), "
                          f"not {model.config.name_or_path} ({fingerprint(model)})")
    return make_choice(avg, model, str(path))


def auto_choice(model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_facts: int | None = None) -> LayerChoice:
    """The cached recommendation, or one traced now on ``n_facts`` (``AUTO_FACTS``) default facts, and cached."""
    hit = cached_choice(model)
    if hit is not None:
        return hit
    n_facts = n_facts or AUTO_FACTS
    from locate_edit.trace.average import average
    from locate_edit.trace.facts import load_facts, select_facts, trace_facts

    known = data_dir() / "knowns" / "known_1000.json"
    name = "known" if known.exists() else "builtin"
    log.warning("layer=auto: no causal trace cached for %s; tracing %d %s facts once (cached in %s)",
                model.config.name_or_path, n_facts, name, choice_path(model).parent)
    pool = load_facts(name, str(known) if name == "known" else None)
    facts, _ = select_facts(model, tok, pool, correct_only=True, limit=n_facts)
    if not facts:  # a model that knows none of them (a random test model): trace its own predictions
        facts, _ = select_facts(model, tok, pool, correct_only=False, limit=n_facts)
    traces, _ = trace_facts(model, tok, facts, progress=True)
    choice = make_choice(average(traces), model, f"auto: {len(facts)} {name} facts")
    store_choice(choice, model)
    return choice


def resolve_layers(value: Any, model: PreTrainedModel, tok: PreTrainedTokenizerBase, many: bool) -> Any:
    """An editor's layer setting made concrete: numbers pass through; ``auto`` / ``auto:PATH`` give the ROME
    layer (``many=False``) or the MEMIT layers (``many=True``) recommended for this model."""
    if not isinstance(value, str):
        return value
    if value == "auto":
        choice = auto_choice(model, tok)
    elif value.startswith("auto:") and value[5:].strip():
        choice = choice_from_trace_file(value[5:].strip(), model)
    else:
        raise ConfigError(f"a layer setting must be a number (a list of numbers), 'auto' or 'auto:TRACE.json', "
                          f"got '{value}'")
    log.info("layer=%s -> %s (%s)", value, choice.memit if many else choice.rome, choice.source)
    return list(choice.memit) if many else choice.rome
