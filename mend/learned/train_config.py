"""The typed config of ``python -m mend.train``. ``configs/train/default.yaml`` states the same defaults with the
measurements behind them; experiment files (e.g. ``configs/train/counterfact.yaml``) hold only what they change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mend.config import SEED, ModelSection
from mend.errors import ConfigError
from mend.learned.hypernet import ACTIVATIONS, HypernetConfig
from mend.learned.lit_data import TRAIN_FILES, TrainDataSection
from mend.learned.malmen.solve import MalmenSection
from mend.learned.module import SCHEDULES, LossSection, OptimSection
from mend.learned.serac.scope import ScopeConfig

METHODS = ("mend", "malmen", "serac")  # the learned editor a run trains (editor name of the run directory)


@dataclass
class EditSection:
    """Which weights MEND edits (layers count from the end when negative; stacks: all of the model's when null)."""

    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])
    kinds: list[str] = field(default_factory=lambda: ["mlp_gate", "mlp_up", "mlp_out"])  # those the model has
    stacks: list[str] | None = None


@dataclass
class TrainerSection:
    """Passed to ``lightning.Trainer`` (plus the batch size and checkpoint cadence)."""

    max_steps: int = 1200
    batch_size: int = 1  # edits per step on each device; their ΔW are summed
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    val_check_interval: int = 400  # training batches between validations
    limit_val_batches: int | None = None
    save_every_n_steps: int = 400  # <out>/last (resume) and the editor files
    keep_best: bool = True  # <out>/best: the editor of the validation with the best val/score
    reset_best: bool = False  # on resume: forget the earlier best score (other loss / data settings since)
    log_every_n_steps: int = 10
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"  # e.g. ddp (CPU: gloo)
    precision: str = "32-true"
    fast_dev_run: bool = False
    progress: bool = True
    threads: int = 0  # torch CPU threads (0: leave as is)
    cache_mb: float = 1500.0  # cache the frozen lower blocks' output per sequence, up to this many MB (0: off)


@dataclass
class EvalSection:
    """The evaluation printed at the end: the trained editor beside the untrained one (identity hypernetwork)."""

    enabled: bool = True
    data: str = "builtin"
    path: str | None = None  # the data file; relative: under the data root (default: the data set's usual file)
    split: str = "test"
    limit: int | None = None
    drawdown: str = "auto"  # as python -m mend.evaluate drawdown.source
    drawdown_samples: int = 5  # as drawdown.samples: perplexity after this many edits (evaluate: 20; ~2 s each)
    editor: str = "last"  # last: the editor at the end of training; best: <out>/best (needs trainer.keep_best)


@dataclass
class TrainCommand:
    method: str = "mend"  # mend: one edit's factors summed (Mitchell et al.); malmen: many edits, least squares
    model: ModelSection = field(default_factory=ModelSection)
    data: TrainDataSection = field(default_factory=TrainDataSection)
    edit: EditSection = field(default_factory=EditSection)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    malmen: MalmenSection = field(default_factory=MalmenSection)
    serac: ScopeConfig = field(default_factory=ScopeConfig)  # method=serac: the scope classifier
    norm_warmup: int = 20  # batches of factors that fill the input statistics before the first step
    name: str | None = None  # run name (default: mend-<model>-<data>)
    out: str | None = None  # run directory (default: checkpoints/<name>)
    resume: str = "auto"  # auto: continue from <out>/last when it exists; true: require it; false: start afresh
    seed: int = field(default=0, metadata=SEED)


def validate(cfg: Any) -> None:
    """Value checks the types alone do not catch."""
    t = cfg.trainer
    positive = {"trainer.max_steps": t.max_steps, "trainer.batch_size": t.batch_size,
                "trainer.accumulate_grad_batches": t.accumulate_grad_batches,
                "trainer.val_check_interval": t.val_check_interval, "hypernet.rank": cfg.hypernet.rank,
                "optim.lr": cfg.optim.lr, "hypernet.alpha_init": cfg.hypernet.alpha_init}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")
    if cfg.hypernet.precondition and (cfg.hypernet.precondition_ridge <= 0 or cfg.hypernet.precondition_tokens <= 0):
        raise ConfigError("hypernet.precondition_ridge and hypernet.precondition_tokens must be positive")
    if cfg.hypernet.n_blocks < 0 or cfg.norm_warmup < 0 or cfg.eval.drawdown_samples < 0:
        raise ConfigError("hypernet.n_blocks, norm_warmup and eval.drawdown_samples must be >= 0")
    if cfg.hypernet.act not in ACTIVATIONS:
        raise ConfigError(f"hypernet.act must be one of {', '.join(sorted(ACTIVATIONS))}, got '{cfg.hypernet.act}'")
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{cfg.method}'")
    if cfg.method == "malmen" and t.accumulate_grad_batches != 1:
        raise ConfigError("method=malmen steps by hand (split backward): trainer.accumulate_grad_batches must be 1; "
                          "raise trainer.batch_size (edits per step) instead")
    from mend.learned.factors import POSITIONS

    if cfg.hypernet.positions not in POSITIONS:
        raise ConfigError(f"hypernet.positions must be one of {', '.join(POSITIONS)}, got '{cfg.hypernet.positions}'")
    cfg.resume = str(cfg.resume).lower()
    if cfg.resume not in ("auto", "true", "false"):
        raise ConfigError(f"resume must be auto, true or false, got '{cfg.resume}'")
    if cfg.data.name != "builtin" and cfg.data.name not in TRAIN_FILES:
        raise ConfigError(f"data.name must be builtin or one of {', '.join(sorted(TRAIN_FILES))} for training, "
                          f"got '{cfg.data.name}'")
    if cfg.data.locality < 1 or min(cfg.data.paraphrases, cfg.data.text_locality, cfg.data.relation_locality) < 0:
        raise ConfigError("data.locality must be >= 1, data.paraphrases, data.text_locality and "
                          "data.relation_locality >= 0")
    if not cfg.edit.layers or not cfg.edit.kinds:
        raise ConfigError("edit.layers and edit.kinds must not be empty")
    if cfg.loss.c_edit < 0 or cfg.loss.c_loc < 0 or (cfg.loss.c_text is not None and cfg.loss.c_text < 0):
        raise ConfigError("loss.c_edit, loss.c_loc and loss.c_text must be >= 0")
    if cfg.eval.editor not in ("last", "best"):
        raise ConfigError(f"eval.editor must be last or best, got '{cfg.eval.editor}'")
    if cfg.eval.editor == "best" and not cfg.trainer.keep_best:
        raise ConfigError("eval.editor=best needs trainer.keep_best=true")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.optim.schedule}'")
    if cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
    if cfg.optim.schedule_steps is not None and cfg.optim.schedule_steps < cfg.trainer.max_steps:
        raise ConfigError(f"optim.schedule_steps ({cfg.optim.schedule_steps}) must be at least trainer.max_steps "
                          f"({cfg.trainer.max_steps}): it lets a run stop before the end of its schedule")
