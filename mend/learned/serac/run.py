"""A trained SERAC scope classifier on disk, in the run-directory format of the other learned editors:
``editor.safetensors`` (the classifier) and ``config.yaml`` (the training config plus an ``editor`` section: model,
fingerprint, method, classifier settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors.torch import load_file

from mend.errors import MendError
from mend.learned.run_dir import CONFIG_FILE, EDITOR_FILE, write_run_files
from mend.learned.serac.scope import ScopeClassifier, ScopeConfig

FORMAT = "serac-editor/1"


@dataclass
class SeracInfo:
    model: str
    fingerprint: str
    d_model: int
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    step: int = 0
    method: str = "serac"
    format: str = FORMAT


def save_serac(out: str | Path, classifier: ScopeClassifier, info: SeracInfo, train_config: dict[str, Any]) -> Path:
    write_run_files(out, classifier, info, train_config, FORMAT)
    return Path(out)


def load_serac(run: str | Path) -> tuple[ScopeClassifier, SeracInfo]:
    run = Path(run)
    if not (run / EDITOR_FILE).exists() or not (run / CONFIG_FILE).exists():
        raise MendError(f"'{run}' holds no trained SERAC editor ({EDITOR_FILE} and {CONFIG_FILE} are needed)")
    try:
        section = OmegaConf.load(run / CONFIG_FILE)["editor"]
        info = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SeracInfo), section))
    except Exception as e:
        raise MendError(f"cannot read the editor section of {run / CONFIG_FILE}: {str(e).splitlines()[0]}") from e
    if info.format != FORMAT or info.method != "serac":
        raise MendError(f"{run / CONFIG_FILE}: not a SERAC editor (format {info.format!r}, method {info.method!r})")
    classifier = ScopeClassifier(info.d_model, info.scope)
    try:
        classifier.load_state_dict(load_file(str(run / EDITOR_FILE)))
    except Exception as e:
        raise MendError(f"{run / EDITOR_FILE}: not this classifier's weights ({str(e).splitlines()[0]})") from e
    return classifier.eval(), info
