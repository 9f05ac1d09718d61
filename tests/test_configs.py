"""Every YAML file under configs/ validates against its schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mend.config import ModelFile, build_config, model_file_for, model_files
from mend.edit import EditCommand
from mend.editor import available_editors, build_editor_config
from mend.errors import ConfigError
from mend.paths import config_dir

MODEL_FILES = sorted((config_dir() / "model").glob("*.yaml"))
EDITOR_FILES = sorted((config_dir() / "editor").glob("*.yaml"))


def test_there_are_configs():
    assert len(MODEL_FILES) >= 6


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_validates(path: Path):
    mf = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelFile), OmegaConf.load(path)))
    for editor, section in mf.editors.items():
        assert editor in available_editors(), f"{path.name}: unknown editor {editor}"
        build_editor_config(editor, section)  # raises on unknown keys or wrong types
        assert not any("." in str(v) and "proj" in str(v) for v in dict(section).values()), "name layers, not paths"


def _repeats(name: str, section) -> list[str]:
    """The settings of ``section`` (an editor's YAML layer) equal to the editor's code defaults."""
    from mend.editor import editor_class

    code = OmegaConf.structured(editor_class(name).Config)

    def walk(sec, ref, prefix=""):
        for key, value in sec.items():
            if OmegaConf.is_dict(value) and OmegaConf.is_dict(ref.get(key)):
                yield from walk(value, ref[key], f"{prefix}{key}.")
            elif key in ref and ref[key] == value:
                yield f"{prefix}{key}"

    return list(walk(OmegaConf.create(section), code))


@pytest.mark.parametrize("path", EDITOR_FILES, ids=lambda p: p.name)
def test_editor_file_holds_only_what_differs_from_the_code(path: Path):
    assert path.stem in available_editors()
    build_editor_config(path.stem, OmegaConf.load(path))
    assert not _repeats(path.stem, OmegaConf.load(path)), "the code's defaults, repeated: they would drift"


def test_repeats_are_found(tmp_path):
    """The drift check above: a repeated default is reported, a changed one is not."""
    assert _repeats("rome", {"layer": 5, "value": {"steps": 20, "lr": 0.1}, "kind": "mlp_out"}) == [
        "layer", "value.steps", "kind"]
    assert _repeats("memit", {"mom2_weight": 500.0}) == []


def test_model_file_lookup():
    assert model_file_for("smollm2-135m", "llama").n_layers == 30
    assert model_file_for("some-org/unknown-llama", "llama").family_default  # family default
    assert model_file_for("some-org/unknown", "bert") is None
    assert len(model_files()) == len(MODEL_FILES)


def test_overrides_and_group_shorthand(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("editor: ft\nmodel:\n  name: tiny-llama\nseed: 3\n")
    cfg = build_config(EditCommand, [str(cfg_file), "editor.lr=0.1", "prompt={} is in", "target= Rome"],
                       text_keys=("prompt", "target"))
    assert cfg.editor.name == "ft" and cfg.editor.lr == 0.1 and cfg.model.name == "tiny-llama" and cfg.seed == 3
    assert cfg.prompt == "{} is in" and cfg.target == " Rome"  # verbatim: not YAML, space kept
    with pytest.raises(ConfigError):
        build_config(EditCommand, ["seed=[1"])
    with pytest.raises(ConfigError):
        build_config(EditCommand, [str(tmp_path / "missing.yaml")])


TRAIN_FILES = sorted((config_dir() / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_FILES, ids=lambda p: p.name)
def test_train_file_validates(path: Path):
    from mend.learned.train_config import TrainCommand, validate

    cfg = build_config(TrainCommand, [str(path)], base=config_dir() / "train" / "default.yaml")
    validate(cfg)
    assert cfg.trainer.max_steps > 0


def test_train_defaults_are_the_schema_defaults():
    """default.yaml documents the schema's defaults; the two must not drift apart."""
    from mend.learned.train_config import TrainCommand

    schema = OmegaConf.structured(TrainCommand)
    assert OmegaConf.merge(schema, OmegaConf.load(config_dir() / "train" / "default.yaml")) == schema
