"""``python -m locate_edit.trace``: causal traces of many facts, their average as a heatmap and JSON, and the
layers to edit (cached for ``layer=auto``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locate_edit.trace.core import KINDS, TraceSettings
from mend.config import SEED, ModelSection, build_config
from mend.errors import ConfigError, MendError

USAGE = """
usage: python -m locate_edit.trace [config.yaml] [key=value ...]

Causal tracing (Meng et al. 2022): corrupt the subject's embeddings with Gaussian noise, restore one hidden state
at a time and measure how much of the probability of the model's own answer comes back. Writes
<out>/trace.json (every fact and the average), <out>/trace_average.png, and with per_fact=true
<out>/facts/fact_NNN.png; prints the layers recommended for ROME and MEMIT and caches them for layer=auto.

  model=NAME          alias, local path or Hugging Face id [smollm2-135m]; model.dtype=, model.device=,
                      model.device_map=auto
  data=NAME           known (ROME's known facts: subject, prompt, attribute), counterfact, builtin [known]
  data.path=PATH      the data file (default: its usual place under $MEND_DATA_DIR)
  data.limit=N        trace N facts (those passed over by correct_only do not count) [all]
  data.correct_only=B keep only facts whose expected answer's first token the model predicts, as the reference
                      code does [true]; the traced answer is always the model's own prediction
  out=DIR             where the results go [runs/trace]
  samples=N           noise draws per fact [1]; each draw costs a whole trace (3-10 for per-fact heatmaps)
  noise=X             noise std as a multiple of the std of the subjects' token embeddings [3.0]
  window=N            layers restored together for the MLP and attention traces [10]
  kinds=[...]         residual, mlp, attn [all three]
  per_fact=true       also a heatmap per fact
  seed=N              noise seed [0]
  batch_tokens=N      tokens per forward pass [2048]
  onednn=false        keep the default float32 matmuls on CPU (oneDNN's are ~2× faster on AMD, same precision)
  cache=false         do not store the layer recommendation for layer=auto
  progress=false      no progress bar
"""


@dataclass
class TraceData:
    name: str = "known"
    path: str | None = None
    limit: int | None = None
    on_error: str = "skip"
    correct_only: bool = True


@dataclass
class TraceCommand:
    model: ModelSection = field(default_factory=ModelSection)
    data: TraceData = field(default_factory=TraceData)
    out: str = "runs/trace"
    samples: int = TraceSettings.samples
    noise: float = 3.0
    window: int = TraceSettings.window
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    per_fact: bool = False
    seed: int = field(default=0, metadata=SEED)
    batch_tokens: int = TraceSettings.batch_tokens
    onednn: bool = True
    cache: bool = True
    progress: bool = True


def main(argv: list[str]) -> int:
    cfg = build_config(TraceCommand, argv, text_keys=("out", "data.path"))
    settings = TraceSettings(samples=cfg.samples, window=cfg.window, kinds=tuple(cfg.kinds),
                             batch_tokens=cfg.batch_tokens, onednn=cfg.onednn)
    settings.check()
    if cfg.noise < 0:
        raise ConfigError(f"noise must be >= 0, got {cfg.noise}")
    if cfg.data.limit is not None and cfg.data.limit <= 0:
        raise ConfigError(f"data.limit must be positive, got {cfg.data.limit}")
    from locate_edit.trace.facts import load_facts, select_facts

    correct_only = cfg.data.correct_only
    facts = load_facts(cfg.data.name, cfg.data.path, None if correct_only else cfg.data.limit, cfg.data.on_error)
    from mend.models import load_model

    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    t0 = time.perf_counter()
    facts, passed = select_facts(model, tok, facts, correct_only, cfg.data.limit)
    if not facts:
        raise MendError(f"no fact to trace: the model predicts none of the {passed} expected answers "
                        "(data.correct_only=false traces the model's own predictions)")
    from locate_edit.trace.facts import trace_facts

    traces, noise_std = trace_facts(model, tok, facts, cfg.noise, settings, cfg.seed, cfg.progress)
    seconds = time.perf_counter() - t0
    doc, paths = _write(cfg, model, traces, noise_std, passed, seconds)
    _print_summary(cfg, doc, paths)
    return 0


def _write(cfg: Any, model, traces, noise_std: float, passed: int, seconds: float) -> tuple[dict, dict[str, Path]]:
    from locate_edit.layer_choice import make_choice, store_choice
    from locate_edit.trace.average import average
    from locate_edit.trace.plot import plot_average, plot_fact
    from mend.io import write_json
    from mend.models import fingerprint

    out = Path(cfg.out)
    avg = average(traces)
    name = str(cfg.model.name)
    doc: dict[str, Any] = {
        "model": name, "fingerprint": fingerprint(model),
        "data": {"name": cfg.data.name, "path": cfg.data.path, "n": len(traces), "passed_over": passed,
                 "correct_only": cfg.data.correct_only},
        "settings": {"samples": cfg.samples, "noise": cfg.noise, "noise_std": noise_std, "window": cfg.window,
                     "kinds": list(cfg.kinds), "seed": cfg.seed},
        "seconds": round(seconds, 2),
        "average": avg.to_json(),
    }
    paths = {"json": out / "trace.json", "average_plot": plot_average(avg, out / "trace_average.png", cfg.window, name)}
    if "mlp" in cfg.kinds:
        choice = make_choice(avg, model, str(out / "trace.json"))
        doc["recommendation"] = {"rome": choice.rome, "memit": choice.memit, "rule": choice.rule}
        if cfg.cache:
            cached = store_choice(choice, model)
            if cached:
                paths["layer_choice"] = cached
    doc["facts"] = [t.to_json() for t in traces]
    write_json(paths["json"], doc)
    if cfg.per_fact:
        for i, t in enumerate(traces):
            plot_fact(t, out / "facts" / f"fact_{i:03d}.png", cfg.window, name)
        paths["fact_plots"] = out / "facts"
    return doc, paths


def _print_summary(cfg: Any, doc: dict[str, Any], paths: dict[str, Path]) -> None:
    from locate_edit.trace.average import ROWS

    avg = doc["average"]
    print(f"model {doc['model']} | data {cfg.data.name}: {doc['data']['n']} facts traced "
          f"({doc['data']['passed_over']} passed over) | {doc['seconds']:.1f} s")
    print(f"p(answer): clean {avg['p_clean']:.3f}, corrupted {avg['p_corrupted']:.3f} "
          f"(noise std {doc['settings']['noise_std']:.4g}, {cfg.samples} samples)")
    print(f"{'kind':<9} {'peak row':<24} {'layer':>5} {'effect':>8}   last subject token: layer (effect)")
    for kind, m in avg["effects"].items():
        cells = [(v, r, c) for r, row in enumerate(m) for c, v in enumerate(row) if v is not None]
        v, r, c = max(cells)
        last = m[ROWS.index("last subject token")]
        best = max(range(len(last)), key=lambda j: last[j])
        print(f"{kind:<9} {ROWS[r]:<24} {c:>5} {v:>8.4f}   {best} ({last[best]:.4f})")
    if "recommendation" in doc:
        rec = doc["recommendation"]
        print(f"recommended layers: rome {rec['rome']}, memit {rec['memit']}  ({rec['rule']})")
    print("written: " + ", ".join(str(p) for p in paths.values()))
