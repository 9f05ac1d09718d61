"""A trained MEND editor on disk: ``<run>/editor.safetensors`` (weights, running statistics, step sizes) and
``<run>/config.yaml`` (the training config plus an ``editor`` section: model, fingerprint, edited weights,
hypernetwork architecture). Nothing else is needed to edit with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mend.errors import MendError
from mend.io import atomic_write, write_text
from mend.learned.hypernet import HypernetConfig, MendHypernet, WeightSpec

EDITOR_FILE, CONFIG_FILE, METRICS_FILE, LAST_DIR = "editor.safetensors", "config.yaml", "metrics.json", "last"
BEST_DIR = "best"  # a run directory of its own: the editor of the best validation
FORMAT = "mend-editor/1"


@dataclass
class EditedWeight:
    """One edited weight: where it is (adapter terms) and its ``(d_out, d_in)`` shape."""

    stack: str
    layer: int
    kind: str
    d_out: int
    d_in: int

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.layer}.{self.kind}"


@dataclass
class EditorInfo:
    """The ``editor`` section of a run's config.yaml."""

    model: str
    fingerprint: str
    weights: list[EditedWeight]
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    step: int = 0
    method: str = "mend"  # the editor that reads this run: mend or malmen
    format: str = FORMAT

    def specs(self) -> list[WeightSpec]:
        return [WeightSpec(w.label, w.d_out, w.d_in) for w in self.weights]


def save_editor(out: str | Path, hypernet: MendHypernet, info: EditorInfo, train_config: dict[str, Any]) -> Path:
    """Write ``editor.safetensors`` and ``config.yaml`` (atomically, each)."""
    return write_run_files(out, hypernet, info, train_config, FORMAT)


def write_run_files(out: str | Path, module: torch.nn.Module, info: Any, train_config: dict[str, Any],
                    fmt: str) -> Path:
    """A trained editor's files, for every learned method: ``module``'s state as ``editor.safetensors`` and the
    training config plus the ``editor`` section (the dataclass ``info``) as ``config.yaml``."""
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(out / EDITOR_FILE, lambda tmp: save_file(state, tmp, metadata={"format": fmt}))
    doc = {**train_config, "editor": asdict(info)}
    write_text(out / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(doc)))
    return out / EDITOR_FILE


def read_info(run: str | Path) -> tuple[EditorInfo, dict[str, Any]]:
    """The editor section (typed) and the whole config of a run directory."""
    run = Path(run)
    cfg_path = run / CONFIG_FILE
    if not run.is_dir():
        raise MendError(f"MEND checkpoint '{run}' is not a directory (give the run directory of python -m mend.train)")
    if not cfg_path.exists() or not (run / EDITOR_FILE).exists():
        raise MendError(f"'{run}' holds no trained editor ({EDITOR_FILE} and {CONFIG_FILE} are needed)")
    try:
        doc = OmegaConf.load(cfg_path)
        section = OmegaConf.to_container(doc["editor"])
        if isinstance(section.get("hypernet"), dict):  # runs from before the option edited without P
            section["hypernet"].setdefault("precondition", False)
        info = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EditorInfo), section))
    except Exception as e:  # malformed YAML or a missing / mistyped key
        raise MendError(f"cannot read the editor section of {cfg_path}: {str(e).splitlines()[0]}") from e
    if info.format != FORMAT:
        raise MendError(f"{cfg_path}: editor format {info.format!r}, this version reads {FORMAT!r}")
    return info, OmegaConf.to_container(doc)


def build_hypernet(info: EditorInfo) -> MendHypernet:
    """An untrained hypernetwork of the run's method and architecture (MALMEN's λ come from the weights file)."""
    if info.method == "malmen":
        from mend.learned.malmen.hypernet import MalmenHypernet

        return MalmenHypernet(info.specs(), info.hypernet)
    if info.method != "mend":
        raise MendError(f"unknown editor method {info.method!r} (this version reads mend and malmen)")
    return MendHypernet(info.specs(), info.hypernet)


def load_editor(run: str | Path, device: str | torch.device = "cpu",
                method: str | None = None) -> tuple[MendHypernet, EditorInfo]:
    """The hypernetwork of a run directory (eval mode), with its info; ``method`` (mend / malmen) must match the
    run's when given."""
    info, _ = read_info(run)
    if method is not None and info.method != method:
        raise MendError(f"'{run}' holds a {info.method} editor, not a {method} one: use editor {info.method} "
                        f"(python -m mend.train method=... writes one)")
    path = Path(run) / EDITOR_FILE
    try:
        hypernet = build_hypernet(info)
    except (ValueError, TypeError, RuntimeError) as e:  # sizes or settings no network can have
        raise MendError(f"{Path(run) / CONFIG_FILE}: the editor section describes no valid hypernetwork "
                        f"({str(e).splitlines()[0]})") from e
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise MendError(f"cannot read the editor weights {path}: {e}") from e
    try:
        missing, unexpected = hypernet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        raise MendError(f"{path} does not match its config.yaml: {str(e).splitlines()[1].strip()}") from e
    if missing or unexpected:
        raise MendError(f"{path} does not match its config.yaml (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return hypernet.to(device).eval(), info


def check_model(editor: str, trained_for: str, trained_fp: str, where: str, model: Any) -> None:
    """Refuse a trained editor on a model other than the one it was trained for (by fingerprint)."""
    from mend.models import fingerprint

    fp = fingerprint(model)
    if fp != trained_fp:
        raise MendError(f"the {editor} editor in {where} was trained for {trained_for} (fingerprint {trained_fp}), "
                        f"not for this model ({fp}); train one with python -m mend.train model=...")
