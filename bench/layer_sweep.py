"""Sweep ROME's edited layer on CounterFact records with the evaluator, and check the layer that ``layer=auto``
(causal tracing, locate_edit.layer_choice) picks against the best one.

Prints one table (efficacy, generalization, locality, score per layer; the auto layer marked) and whether the
auto layer's score is within 0.03 of the best; writes bench/results/layer_sweep.json and .md. The auto layer is
evaluated too when the sweep does not include it.

    python bench/layer_sweep.py model=smollm2-135m n=50 layers=[2,3,4,5,6,8,10,12]   # ~an hour on 2 CPU cores
    python bench/layer_sweep.py model=tiny-gpt2 n=2 layers=[0,1] out=/tmp/sweep       # smoke test
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mend.config import ModelSection, build_config
from mend.errors import ConfigError

USAGE = """
usage: python bench/layer_sweep.py [key=value ...]

  model=NAME        [smollm2-135m]
  editor=NAME       rome or r-rome [rome]
  n=N               CounterFact records [50]
  layers=[a,b,...]  layers to sweep [2,3,4,5,6,8,10,12]
  data.path=PATH    CounterFact file [$MEND_DATA_DIR/counterfact/counterfact_rome.json]
  auto=SPEC         what layer=auto means here: auto (cached trace, else traced once) or auto:TRACE.json [auto]
  tolerance=X       the auto layer passes when its score is within X of the best [0.03]
  out=DIR           [bench/results]
  seed=N            [0]
  progress=false    no progress bars
"""

RESULTS = Path(__file__).parent / "results"


@dataclass
class SweepData:
    name: str = "counterfact"
    path: str | None = None


@dataclass
class Sweep:
    model: ModelSection = field(default_factory=ModelSection)
    editor: str = "rome"
    n: int = 50
    layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8, 10, 12])
    data: SweepData = field(default_factory=SweepData)
    auto: str = "auto"
    tolerance: float = 0.03
    out: str = str(RESULTS)
    seed: int = 0
    progress: bool = True


KEYS = ("efficacy", "generalization", "locality", "score")


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# ROME layer sweep · {doc['model']} · {doc['n']} CounterFact records", "",
             "| layer | " + " | ".join(KEYS) + " | s / edit |", "|---:|" + "---:|" * (len(KEYS) + 1)]
    for row in doc["rows"]:
        mark = " (auto)" if row["layer"] == doc["auto_layer"] else ""
        lines.append(f"| {row['layer']}{mark} | " + " | ".join(f"{row[k]:.3f}" for k in KEYS)
                     + f" | {row['seconds_per_edit']:.2f} |")
    lines += ["", "unedited: " + ", ".join(f"{k} {doc['unedited'][k]:.3f}" for k in KEYS if doc['unedited'].get(k)
                                             is not None),
              f"best layer {doc['best_layer']} (score {doc['best_score']:.3f}); auto picked layer {doc['auto_layer']} "
              f"(score {doc['auto_score']:.3f}): {'within' if doc['auto_ok'] else 'NOT within'} "
              f"{doc['tolerance']} of the best"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    cfg = build_config(Sweep, argv, text_keys=("out", "data.path", "auto"))
    if not cfg.layers or cfg.n <= 0:
        raise ConfigError("give at least one layer (layers=[...]) and n > 0")
    from locate_edit.layer_choice import resolve_layers
    from mend.api import create_editor
    from mend.data.registry import load_dataset
    from mend.evaluation.evaluator import EvalSettings, Evaluator
    from mend.io import write_json, write_text
    from mend.models import load_model

    ds = load_dataset(cfg.data.name, cfg.data.path, cfg.n)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model.name, getattr(torch, cfg.model.dtype), cfg.model.device)
    auto_layer = resolve_layers(cfg.auto, model, tok, many=False)
    layers = sorted({*[int(x) for x in cfg.layers], auto_layer})
    ev = Evaluator(model, tok, ds.requests, ds.style, None, EvalSettings(mode="single", seed=cfg.seed),
                   progress=cfg.progress)
    rows = []
    for layer in layers:
        editor = create_editor(cfg.editor, model, layer=layer)
        t0 = time.perf_counter()
        m = ev.run(editor).metrics
        rows.append({"layer": layer, **{k: m[k] for k in KEYS}, "seconds_per_edit": m["seconds_per_edit"],
                     "wall_s": round(time.perf_counter() - t0, 1)})
    best = max(rows, key=lambda r: r["score"])
    auto_row = next(r for r in rows if r["layer"] == auto_layer)
    doc = {"model": cfg.model.name, "editor": cfg.editor, "n": len(ds.requests), "data": ds.path,
           "auto": cfg.auto, "auto_layer": auto_layer, "auto_score": auto_row["score"],
           "best_layer": best["layer"], "best_score": best["score"], "tolerance": cfg.tolerance,
           "auto_ok": best["score"] - auto_row["score"] <= cfg.tolerance,
           "unedited": {k: ev.pre().metrics.get(k) for k in KEYS}, "rows": rows}
    text = markdown(doc)
    print(text, end="")
    out = Path(cfg.out)
    paths = [write_json(out / "layer_sweep.json", doc), write_text(out / "layer_sweep.md", text)]
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    from mend.cli import run

    run(main, USAGE)
