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


PRESET_FILES = sorted((config_dir() / "preset").glob("*.yaml"))
MODEL_FACTS = ("layer", "layers", "mom2_weight")  # what a preset leaves to the model file


def _keys(section, prefix=""):
    for key, value in section.items():
        if OmegaConf.is_dict(value):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.name)
def test_a_preset_sets_everything_the_model_files_change(path: Path):
    """A preset reproduces its settings on every model: each setting a model file changes for an editor the
    preset covers (except the model's layers and scale) is set by the preset too, so it cannot leak through."""
    preset = OmegaConf.load(path)
    editors = [e for e in preset if not str(e).startswith("_")]
    assert editors
    for editor in editors:
        build_editor_config(editor, preset[editor])  # raises on unknown keys or wrong types
        covered = set(_keys(preset[editor]))
        for mf in MODEL_FILES:
            section = OmegaConf.load(mf).get("editors", {}).get(editor)
            if section is None:
                continue
            missing = {k for k in _keys(section) if k.split(".")[0] not in MODEL_FACTS} - covered
            assert not missing, f"{path.name}: {editor} settings of {mf.name} the preset does not set: {missing}"


def test_a_preset_layer_sits_between_the_model_file_and_the_user():
    from mend.api import create_editor

    default = create_editor("rome", "smollm2-135m").config
    ref = create_editor("rome", "smollm2-135m", preset="reference").config
    assert default.value.stop_on == "nll" and default.realized_values  # the model file's measured settings
    assert ref.value.stop_on == "loss" and ref.value.early_stop_loss == 0.05 and not ref.realized_values
    assert ref.layer == default.layer  # the layer stays the model's
    assert create_editor("rome", "smollm2-135m", preset="reference", value={"steps": 7}).config.value.steps == 7
    with pytest.raises(ConfigError, match="unknown editor preset 'nope'"):
        create_editor("rome", "smollm2-135m", preset="nope")
    with pytest.raises(ConfigError, match="no settings for editor 'ft'"):
        create_editor("ft", "smollm2-135m", preset="reference")


def test_evaluate_passes_editor_preset_to_every_editor():
    from mend.api import create_editor
    from mend.evaluate import EvaluateCommand, editor_names, per_editor_settings

    cfg = build_config(EvaluateCommand, ["editors=[rome,memit]", "editor.preset=reference"])
    settings = per_editor_settings(cfg, editor_names(cfg))
    assert settings == {"rome": {"preset": "reference"}, "memit": {"preset": "reference"}}
    assert create_editor("rome", "smollm2-135m", **settings["rome"]).config.value.stop_on == "loss"


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
