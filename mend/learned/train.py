"""The training command (``python -m mend.train``): train a learned editor (MEND or MALMEN) with Lightning, then
evaluate it beside the untrained editor."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mend.config import build_config
from mend.errors import ConfigError
from mend.io import write_json
from mend.learned.hypernet import HypernetConfig
from mend.learned.run_dir import (
    BEST_DIR,
    CONFIG_FILE,
    EDITOR_FILE,
    LAST_DIR,
    METRICS_FILE,
    EditedWeight,
    EditorInfo,
)
from mend.learned.train_config import TrainCommand, validate
from mend.paths import config_dir, under_data_root

log = logging.getLogger(__name__)

USAGE = """
usage: python -m mend.train [config.yaml] [key=value ...]

Train a learned editor on a frozen model with PyTorch Lightning: MEND (Mitchell et al. 2022; method=mend, the
default) or MALMEN (Tan et al. 2024; method=malmen, configs/train/malmen.yaml: many edits per step aggregated by
least squares). configs/train/default.yaml is
always the base; a config file given first changes it, then key=value overrides. Writes <out>/editor.safetensors,
<out>/config.yaml, <out>/metrics.json, TensorBoard logs in <out>/logs, the resume state in <out>/last, the
editor of the best validation in <out>/best and the final evaluation in <out>/eval.

  method=mend|malmen|serac    the learned editor [mend]; serac: configs/train/serac.yaml
  model=NAME                  model alias, path or HF id [smollm2-135m]
  model.device_map=auto       shard the frozen base model over the devices (accelerate); the hypernetwork
                              trains on trainer.accelerator
  data=NAME                   builtin (train/validation splits), counterfact (flat format), zsre (MEND format)
  data.path= data.val_path=   training / validation files (default: under $MEND_DATA_DIR)
  data.limit=N data.variants=N  first N training records; built-in facts: new targets per fact [4]
  data.text_locality=N data.text_path=PATH   rows of ordinary text per edit in the KL term [0; text:
                              wikitext/wiki.valid.raw in the data root]
  data.relation_locality=N    rows per edit of other records with the same prompt template (relation) and
                              their true targets, in the KL term [0]
  edit.layers=[-3,-2,-1] edit.kinds=[mlp_out] edit.stacks=[encoder,decoder]   the edited weights
  hypernet.rank=N hypernet.n_blocks=N hypernet.combine=BOOL hypernet.shared=BOOL hypernet.alpha_init=X
  hypernet.precondition=BOOL  edit in the inputs' geometry: ΔW = −α Σ δ̃ (P ũ)ᵀ, P = (C/τ + λI)⁻¹, C their
                              second moment over hypernet.precondition_tokens tokens of text [true]
  hypernet.precondition_ridge=X  λ, relative to C's mean eigenvalue [0.01]
  hypernet.positions=all|target  tokens whose factors are edited: all, or those predicting the answer [all]
  malmen.lambda_init=X malmen.lr_lambda=X malmen.loss_rows=N malmen.chunk_tokens=N
                              MALMEN: initial ridge λ (in the keys' second-moment units) and its rate, rows per
                              edited forward, tokens per hypernetwork pass (memory per step stays flat)
  optim.lr=X optim.lr_alpha=X loss.c_edit=X loss.c_loc=X norm_warmup=N
  loss.c_text=X               KL(neighbours) + X * KL(text rows) instead of one token mean over both [null]
  optim.schedule=constant|cosine optim.warmup_steps=N optim.min_lr_ratio=X   learning rates over the steps [cosine]
  optim.schedule_steps=N      the cosine's length when it is not trainer.max_steps (a run that stops early)
  trainer.max_steps=N trainer.batch_size=N trainer.accumulate_grad_batches=N trainer.gradient_clip_val=X
  trainer.val_check_interval=N trainer.save_every_n_steps=N trainer.fast_dev_run=true
  trainer.keep_best=BOOL      keep <out>/best, the editor of the validation with the best val/score (harmonic
                              mean of edit_success and the neighbour rows' locality agreement) [true]
  trainer.reset_best=BOOL     on resume, forget the earlier steps' best val/score (resuming with other loss or
                              data settings): the next validation's editor replaces <out>/best [false]
  trainer.accelerator=cpu|gpu|auto trainer.devices=N trainer.strategy=auto|ddp trainer.precision=32-true
  eval.enabled=BOOL eval.limit=N    the evaluation at the end (built-in test split by default)
  eval.editor=last|best       evaluate the final editor or <out>/best [last]
  eval.drawdown_samples=N     its perplexity drawdown after N of the edits (0: every edit) [5]
  name=NAME out=DIR           run name [mend-<model>-<data>] and directory [checkpoints/<name>]
  resume=auto|true|false      auto: continue from <out>/last when it exists [auto]
  seed=N

examples:
  python -m mend.train                                   # the default short CPU run (make train)
  python -m mend.train configs/train/counterfact.yaml    # a longer CounterFact run (GPU or long CPU)
  python -m mend.train configs/train/malmen.yaml         # MALMEN on CounterFact (~40 min on 2 CPU cores)
"""


def run_name(cfg: Any) -> str:
    return cfg.name or f"{cfg.method}-{Path(cfg.model.name).name}-{cfg.data.name}"


def resume_path(cfg: Any, out: Path) -> Path | None:
    """The checkpoint to resume from, after checking that the run in ``out`` matches this config."""
    from mend.io import recover_dir

    last = out / LAST_DIR
    recover_dir(last)  # a kill in the middle of replacing it
    mode = str(cfg.resume).lower()
    if mode == "false":
        if last.exists():
            print(f"resume=false: starting afresh in {out} (the old resume state is removed)")
            shutil.rmtree(last)
        return None
    if not last.exists():
        if mode == "true":
            raise ConfigError(f"resume=true but there is no checkpoint at {last}")
        return None
    from mend.learned.run_dir import read_info

    _, saved = read_info(out)
    for key in ("method", "model", "edit", "hypernet"):
        was = saved.get(key, "mend" if key == "method" else None)  # runs from before method= were MEND runs
        if key == "hypernet" and isinstance(was, dict):
            was = {**OmegaConf.to_container(OmegaConf.structured(HypernetConfig)), **was}  # fields added since
        now = cfg[key] if isinstance(cfg[key], str) else OmegaConf.to_container(cfg[key], resolve=True)
        if was != now:
            raise ConfigError(f"{out} holds a run with other '{key}' settings; give another out= or resume=false")
    return last


def finished(cfg: Any, out: Path) -> bool:
    """A run that already reached ``max_steps`` and was evaluated with the same settings: say so, show its table."""
    import json

    try:
        metrics = json.loads((out / METRICS_FILE).read_text())
        saved_eval = OmegaConf.load(out / CONFIG_FILE).get("eval")
    except (OSError, ValueError):
        return False
    same_eval = saved_eval == cfg.eval and "evaluation" in metrics
    if metrics.get("steps", 0) < cfg.trainer.max_steps or (cfg.eval.enabled and not same_eval):
        return False
    print(f"{out} already holds this run, trained for {metrics['steps']} steps (raise trainer.max_steps to go on, "
          "or resume=false to start afresh)")
    table = out / "eval" / "results.md"
    if cfg.eval.enabled and table.exists():
        print(table.read_text())
        print(f"evaluation: {table}; reproduce it with: {metrics['evaluation']['command']}")
    print(f"editor: {out / EDITOR_FILE} (+ {CONFIG_FILE}); metrics: {out / METRICS_FILE}")
    return True


def main(argv: list[str]) -> int:
    cfg = build_config(TrainCommand, argv, text_keys=("out", "name"), base=config_dir() / "train" / "default.yaml")
    validate(cfg)
    out = Path(cfg.out) if cfg.out else Path("checkpoints") / run_name(cfg)
    if cfg.method == "serac":  # a classifier on frozen features: its own short loop (mend/learned/serac/train.py)
        from mend.learned.serac.train import train_serac

        return train_serac(cfg, out)
    ckpt = resume_path(cfg, out)
    if ckpt is not None and finished(cfg, out):
        return 0
    import lightning.pytorch as pl

    from mend.adapters import get_adapter
    from mend.learned.lit_data import EditDataModule
    from mend.learned.malmen.module import MalmenModule
    from mend.learned.mend.module import MendModule
    from mend.models import fingerprint, load_model

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 under torch 2.13: not ours to fix
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    adapter = get_adapter(model)
    refs = adapter.weight_refs(list(cfg.edit.kinds), list(cfg.edit.layers),
                               list(cfg.edit.stacks) if cfg.edit.stacks else None)
    if not refs:
        raise ConfigError(f"edit.kinds {list(cfg.edit.kinds)} select no weights of {type(model).__name__}")
    hcfg = OmegaConf.to_object(cfg.hypernet)
    optim, loss = OmegaConf.to_object(cfg.optim), OmegaConf.to_object(cfg.loss)
    if cfg.method == "malmen":
        module = MalmenModule(model, tok, refs, hcfg, optim, loss, OmegaConf.to_object(cfg.malmen), cfg.norm_warmup,
                              cfg.trainer.cache_mb, clip_norm=cfg.trainer.gradient_clip_val or None)
    else:
        module = MendModule(model, tok, refs, hcfg, optim, loss, cfg.norm_warmup, cfg.trainer.cache_mb)
    dm = EditDataModule(OmegaConf.to_object(cfg.data), cfg.trainer.batch_size, cfg.seed)
    info = EditorInfo(cfg.model.name, fingerprint(model),
                      [EditedWeight(r.stack, r.layer, r.kind, *adapter.get_weight(r).shape) for r in refs], hcfg,
                      method=cfg.method)
    train_doc = OmegaConf.to_container(cfg, resolve=True)
    trainer, callback = _trainer(cfg, out, module, info, train_doc)
    n_params = sum(p.numel() for p in module.hypernet.parameters())
    if trainer.is_global_zero:
        print(f"{cfg.method.upper()} on {cfg.model.name}: {len(refs)} weights ({', '.join(r.label for r in refs)}), hypernetwork "
              f"{n_params / 1e6:.2f}M parameters; {cfg.trainer.max_steps} steps of {cfg.trainer.batch_size} edits"
              f"{f', resuming from {ckpt}' if ckpt else ''}; run directory {out}")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return 0
    metrics: dict[str, Any] = {
        "model": cfg.model.name, "run": str(out), "steps": trainer.global_step, "train_seconds": round(seconds, 1),
        "last_logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "editor_sha256_per_rank": callback.digests,
    }
    if cfg.eval.enabled and not cfg.trainer.fast_dev_run:
        metrics["evaluation"] = final_evaluation(cfg, out, model, tok, module)
    write_json(out / METRICS_FILE, metrics)
    print(f"editor: {out / EDITOR_FILE} (+ {CONFIG_FILE}); metrics: {out / METRICS_FILE}; "
          f"TensorBoard: tensorboard --logdir {out / 'logs'}")
    if "evaluation" in metrics:
        print(f"evaluation: {out / 'eval' / 'results.md'}; reproduce it with: {metrics['evaluation']['command']}")
    return 0


def _trainer(cfg: Any, out: Path, module: Any, info: EditorInfo, train_doc: dict) -> tuple[Any, Any]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from mend.learned.checkpointing import EditorCheckpoint
    from mend.learned.run_dir import save_editor

    def write_editor(pl_module: Any, step: int) -> None:
        info.step = step
        save_editor(out, pl_module.hypernet, info, train_doc)

    def write_best(pl_module: Any, step: int, metrics: dict[str, float]) -> None:
        best = out / BEST_DIR
        save_editor(best, pl_module.hypernet, replace(info, step=step), train_doc)
        write_json(best / METRICS_FILE, {"step": step, "validation": metrics})

    t = cfg.trainer
    callback = EditorCheckpoint(out, t.save_every_n_steps, write_editor, write_best if t.keep_best else None,
                                reset_best=t.reset_best)
    batches = t.max_steps * t.accumulate_grad_batches
    try:
        trainer = _lightning_trainer(t, batches, out, callback, manual=cfg.method == "malmen")
    except (MisconfigurationException, TypeError, ValueError) as e:  # Lightning checks the trainer.* settings
        raise ConfigError(f"trainer settings: {str(e).strip().splitlines()[0]}") from e
    return trainer, callback


def _lightning_trainer(t: Any, batches: int, out: Path, callback: Any, manual: bool = False) -> Any:
    """The Lightning trainer; ``manual``: the module optimises by hand and clips its own gradients."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from mend.learned.checkpointing import SafetensorsCheckpointIO

    return pl.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        precision=t.precision, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=None if manual else t.gradient_clip_val or None, val_check_interval=min(t.val_check_interval, batches),
        limit_val_batches=t.limit_val_batches, num_sanity_val_steps=0, log_every_n_steps=t.log_every_n_steps,
        logger=TensorBoardLogger(str(out), name="logs", version=""),
        callbacks=[callback, *([TQDMProgressBar()] if t.progress else [])],
        plugins=[SafetensorsCheckpointIO()], enable_checkpointing=False, use_distributed_sampler=False,
        inference_mode=False, enable_progress_bar=t.progress, enable_model_summary=False,
        fast_dev_run=t.fast_dev_run, default_root_dir=str(out),
    )


def held_out_evaluation(cfg: Any, out: Path, model: Any, tok: Any, editors: list[tuple[str, Any]],
                        run_dir: Path) -> tuple[dict[str, Any], Path, str]:
    """``editors`` on the run's held-out evaluation data (``cfg.eval``), reports in ``<out>/eval``; prints the table.
    Returns the results, the results.json path and the command that reproduces the trained editor's row."""
    from mend.evaluate import DrawdownSection, EvaluateCommand, evaluate_editors
    from mend.evaluation.report import markdown_table, write_reports

    e = cfg.eval
    args = [f"model={cfg.model.name}", f"data={e.data}", f"data.split={e.split}", f"drawdown.source={e.drawdown}",
            f"out={out / 'eval'}", f"progress={cfg.trainer.progress}"]
    extra = ([f"data.path={under_data_root(e.path)}"] if e.path else []) + ([f"data.limit={e.limit}"] if e.limit else [])
    if e.drawdown_samples != DrawdownSection.samples:
        extra.append(f"drawdown.samples={e.drawdown_samples}")
    args += extra
    ecfg = build_config(EvaluateCommand, args, text_keys=("out", "data.path"))
    results = evaluate_editors(ecfg, model, tok, editors)
    paths = write_reports(results, ecfg.out)
    print(markdown_table(results))
    command = (f"python -m mend.evaluate editors=[{cfg.method}] editor.checkpoint={run_dir} model={cfg.model.name} "
               f"data={e.data}"
               + (f" data.split={e.split}" if e.split != "test" else "") + "".join(f" {a}" for a in extra)
               + (f" drawdown.source={e.drawdown}" if e.drawdown != "auto" else "") + f" out={out / 'eval-check'}")
    return results, paths["json"], command


def final_evaluation(cfg: Any, out: Path, model: Any, tok: Any, module: Any) -> dict[str, Any]:
    """The trained editor (read back from ``out``) beside the untrained one, on held-out data; prints the table."""
    from mend.editor import create_editor, editor_class
    from mend.learned.run_dir import build_hypernet

    e = cfg.eval
    run_dir = out / BEST_DIR if e.editor == "best" and (out / BEST_DIR).exists() else out
    method = cfg.method
    trained = create_editor(method, {"checkpoint": str(run_dir)})
    torch.manual_seed(0)
    identity = build_hypernet(trained.info)
    for name, buf in module.hypernet.named_buffers():  # the statistics (and M): identity needs them only to be ready
        identity.get_buffer(name).copy_(buf)
    untrained = editor_class(method)(hypernet=identity.to(model.device), info=trained.info)
    results, path, command = held_out_evaluation(
        cfg, out, model, tok, [(f"{method} (untrained)", untrained), (method, trained)], run_dir)
    return {"data": e.data, "split": e.split, "n": results["dataset"]["n"], "editor": str(run_dir),
            "editor_step": trained.info.step, "unedited": results["pre"],
            "untrained": results["editors"][f"{method} (untrained)"]["metrics"],
            "trained": results["editors"][method]["metrics"], "results": str(path), "command": command}

