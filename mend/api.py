"""The Python API's editor factory: an editor with the defaults for a model, as the commands build it."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from mend.config import editor_layers
from mend.editor import Editor, editor_class
from mend.editor import create_editor as _create
from mend.errors import ConfigError


def model_identity(model: PreTrainedModel | str | None) -> tuple[str, str | None]:
    """The name and family that per-model defaults (``configs/model/*.yaml``) are looked up by."""
    if model is None:
        from mend.config import ModelSection

        return ModelSection.name, None
    if isinstance(model, str):
        return model, None
    if isinstance(model, PreTrainedModel):
        name = getattr(model, "mend_model_name", None) or getattr(model, "name_or_path", "") or ""
        return name, model.config.model_type
    raise ConfigError(f"model must be a loaded model (mend.load_model) or a model name, got {type(model).__name__}")


def create_editor(name: str, model: PreTrainedModel | str | None = None, **overrides: Any) -> Editor:
    """The editor ``name`` configured as ``python -m mend.edit editor=NAME`` would configure it for ``model``:
    its ``configs/editor/<name>.yaml``, then the model's defaults (``configs/model/*.yaml``, found by the model's
    alias or family), then ``overrides`` (the editor's settings; nested sections as dicts, e.g.
    ``value={"steps": 10}``, a trained editor as ``checkpoint="checkpoints/RUN"``)."""
    editor_class(name)  # an unknown name fails before anything else
    model_name, model_type = model_identity(model)
    return _create(name, *editor_layers(name, model_name, model_type, overrides))
