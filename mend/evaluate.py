"""python -m mend.evaluate: run one or more editors on the same requests; write results.json / .md / plots."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from mend.api import create_editor, model_identity
from mend.cli import run
from mend.config import SEED, ModelSection, build_config
from mend.editor import Editor, config_keys, editor_class
from mend.errors import ConfigError
from mend.evaluation.evaluator import MODES, EvalSettings, Evaluator
from mend.evaluation.report import markdown_table, write_reports
from mend.models import load_model

USAGE = """
usage: python -m mend.evaluate [config.yaml] [key=value ...]

Run editors on the same edit requests and write <out>/results.json, <out>/results.md and plots.

  model=NAME              alias, local path or Hugging Face id [smollm2-135m]
  model.device_map=auto   shard a model too large for one device over all of them (accelerate)
  editors=[a,b,...]       editors to compare (or editor=NAME for one) [ft]
  editor.KEY=VALUE        a setting for every listed editor that has it (e.g. editor.checkpoint=RUN_DIR)
  settings.NAME.KEY=VALUE a setting for one editor (e.g. settings.ft.layers=[4])
  data=NAME               builtin, counterfact, zsre, knowedit, mquake [builtin]
  data.path=PATH          the data file (default: its usual place under $MEND_DATA_DIR)
  data.limit=N            the first N usable records
  data.split=SPLIT        builtin data: train, validation, test, all [test]
  data.on_error=skip|fail malformed records: skip them (reported) or stop [skip]
  mode=MODE               single (each edit from the original weights), batch (all at once),
                          sequential (one after another, never restored in between) [single]
  batch_size=N            sequential mode: N requests per edit, each edit on top of the earlier ones [1]
  curve_every=N           sequential mode: measure every N edited requests [about ten points]
  generation=true         also measure fluency on free generations (slower)
  drawdown.source=SRC     text for perplexity drawdown: auto (WikiText in the data folder, else model samples),
                          self, none, or a path [auto]; drawdown.chunks=8 drawdown.length=128 tokens;
                          in single mode measured after drawdown.samples=20 edits spread over the run
  out=DIR                 where the results go [runs/evaluate]
  seed=N                  random seed [0]
"""


@dataclass
class DataSection:
    name: str = "builtin"
    path: str | None = None
    limit: int | None = None
    split: str = "test"
    on_error: str = "skip"


@dataclass
class DrawdownSection:
    source: str = "auto"
    chunks: int = field(default=8, metadata={"min": 0})
    length: int = field(default=128, metadata={"min": 1})
    samples: int = 20  # single mode: measured after this many edits, spread over the run (0: every edit)


@dataclass
class EvaluateCommand:
    model: ModelSection = field(default_factory=ModelSection)
    editors: list[str] = field(default_factory=list)
    editor: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    mode: str = "single"
    curve_every: int = 0
    generation: bool = False
    generation_tokens: int = field(default=50, metadata={"min": 1})
    batch_size: int = field(default=1, metadata={"min": 1})  # sequential mode: requests per edit
    score_batch_size: int = field(default=16, metadata={"min": 1})  # prompts per forward pass when scoring
    drawdown: DrawdownSection = field(default_factory=DrawdownSection)
    out: str = "runs/evaluate"
    seed: int = field(default=0, metadata=SEED)
    progress: bool = True


def editor_names(cfg: Any) -> list[str]:
    names = list(cfg.editors) or ([cfg.editor["name"]] if "name" in cfg.editor else ["ft"])
    if len(set(names)) != len(names):
        raise ConfigError(f"editors listed twice: {names}")
    for n in names:
        editor_class(n)
    return names


def per_editor_settings(cfg: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """``editor.KEY`` goes to every listed editor whose config has KEY (``editor.preset`` to every editor);
    ``settings.NAME.KEY`` to one editor."""
    shared = {k: v for k, v in OmegaConf.to_container(cfg.editor, resolve=True).items() if k != "name"}
    own = OmegaConf.to_container(cfg.settings, resolve=True)
    unknown = [n for n in own if n not in names]
    if unknown:
        raise ConfigError(f"settings for editors not in the run: {unknown}")
    out = {}
    for n in names:
        keys = [*config_keys(editor_class(n).Config), "preset"]
        out[n] = {k: v for k, v in shared.items() if k in keys} | dict(own.get(n) or {})
    for k in shared:
        if k != "preset" and not any(k in config_keys(editor_class(n).Config) for n in names):
            raise ConfigError(f"editor.{k} is not a setting of {', '.join(names)}")
    return out


def evaluate_config(argv: list[str], values: dict[str, Any] | None = None) -> Any:
    """The command's typed config from ``key=value`` arguments (or the API's ``values``), its mode checked."""
    cfg = build_config(EvaluateCommand, argv, text_keys=("out",), values=values)
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    return cfg


def main(argv: list[str]) -> int:
    cfg = evaluate_config(argv)
    names = editor_names(cfg)
    settings = per_editor_settings(cfg, names)
    ds = load_eval_dataset(cfg)  # bad data fails before the model loads
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    from mend.adapters import get_adapter

    get_adapter(model)
    editors = [(n, create_editor(n, model, **settings[n])) for n in names]

    def finished(label: str, partial: dict[str, Any]) -> None:
        """Report each editor as soon as it is measured, and keep the reports written so far on disk."""
        m = partial["editors"][label]["metrics"]
        print(f"{label}: " + ", ".join(f"{k} {m[k]:.3f}" for k in ("efficacy", "generalization", "locality", "score")
                                       if isinstance(m.get(k), float)), flush=True)
        if len(partial["editors"]) < len(editors):
            write_reports(partial, cfg.out)

    results = evaluate_editors(cfg, model, tok, editors, ds, on_editor=finished)
    paths = write_reports(results, cfg.out)
    print(markdown_table(results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def load_eval_dataset(cfg: Any) -> Any:
    """The data set of an EvaluateCommand config; says how many malformed records were skipped."""
    from mend.data.registry import load_dataset

    ds = load_dataset(cfg.data.name, cfg.data.path, cfg.data.limit, cfg.data.on_error, cfg.data.split, cfg.seed)
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} malformed record(s), e.g. record {ds.skipped[0][0]}: {ds.skipped[0][1]}")
    return ds


def evaluate_editors(cfg: Any, model: Any, tok: Any, editors: list[tuple[str, Any]], ds: Any = None,
                     on_editor: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure the unedited model and each (label, editor) on the data set of ``cfg`` (an EvaluateCommand);
    ``on_editor(label, results so far)`` is called after each editor."""
    from mend.data.text import drawdown_tokens

    ds = ds if ds is not None else load_eval_dataset(cfg)
    chunks = drawdown_tokens(model, tok, cfg.drawdown.source, cfg.drawdown.chunks, cfg.drawdown.length, cfg.seed)
    ev = Evaluator(model, tok, ds.requests, ds.style, chunks,
                   EvalSettings(cfg.mode, cfg.score_batch_size, cfg.curve_every, cfg.generation, cfg.generation_tokens,
                                cfg.seed, cfg.drawdown.samples, cfg.batch_size), progress=cfg.progress)
    results: dict[str, Any] = {
        "model": cfg.model.name,
        "dataset": {"name": ds.name, "path": ds.path, "n": len(ds.requests), "style": ds.style,
                    "skipped": [{"record": i, "reason": r} for i, r in ds.skipped]},
        "mode": cfg.mode,
        **({"batch_size": cfg.batch_size} if cfg.mode == "sequential" else {}),
        "pre": ev.pre().metrics,
        "pre_records": ev.pre().records,
        "editors": {},
    }
    for label, ed in editors:
        res = ev.run(ed)
        results["editors"][label] = {"metrics": res.metrics, "records": res.records,
                                     "config": OmegaConf.to_container(OmegaConf.structured(ed.config))}
        if res.curve:
            results["editors"][label]["curve"] = res.curve
        if on_editor is not None:
            on_editor(label, results)
    return results


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: ``results`` as in results.json; ``str()`` is the markdown table."""

    results: dict[str, Any]

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Label -> metrics, the unedited model first."""
        return {"unedited": self.results["pre"], **{k: v["metrics"] for k, v in self.results["editors"].items()}}

    @property
    def table(self) -> str:
        return markdown_table(self.results)

    def __str__(self) -> str:
        return self.table


def evaluate(editors: Any, model: Any = "smollm2-135m", data: str | dict[str, Any] = "builtin",
             out: str | None = None, **options: Any) -> Evaluation:
    """Python form of ``python -m mend.evaluate``: the editors (names, :class:`~mend.editor.Editor` objects, or a
    dict label -> either) on the same requests. ``model``: a name, or the ``(model, tokenizer)`` of
    :func:`mend.load_model`. ``data``: a data set name or its section (``{"name": "counterfact", "limit": 50}``);
    ``limit=N`` is short for ``data.limit``. ``options``: the command's other keys (``mode``, ``batch_size``,
    ``drawdown``, ``settings``, ...). Writes results.json / .md / plots only when ``out`` is given."""
    if isinstance(editors, (str, Editor)):
        editors = [editors]
    items = list(editors.items()) if isinstance(editors, dict) else [
        (e if isinstance(e, str) else e.name, e) for e in editors]
    if len({label for label, _ in items}) != len(items):
        raise ConfigError("editors listed twice: give a dict label -> editor to run one editor twice")
    data = {"name": data} if isinstance(data, str) else dict(data)
    if "limit" in options:
        data["limit"] = options.pop("limit")
    loaded = model if isinstance(model, tuple) else None
    name = model_identity(loaded[0])[0] if loaded else model
    cfg = evaluate_config([], {"model": {"name": name}, "data": data, **options})
    ds = load_eval_dataset(cfg)
    torch.manual_seed(cfg.seed)
    model, tok = loaded or load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    built = [(label, e if isinstance(e, Editor) else create_editor(e, model)) for label, e in items]
    results = evaluate_editors(cfg, model, tok, built, ds)
    if out:
        write_reports(results, out)
    return Evaluation(results)


class _CommandModule(types.ModuleType):
    """``mend.evaluate`` is both the command (``python -m mend.evaluate``) and the function: calling the module
    calls :func:`evaluate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Evaluation:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CommandModule

if __name__ == "__main__":
    run(main, USAGE)
