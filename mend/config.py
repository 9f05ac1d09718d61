"""Typed configs: YAML files plus ``key=value`` overrides (omegaconf dotlist), validated against dataclasses.

``model=X``, ``editor=X`` and ``data=X`` name a group; they are shorthand for ``model.name=X`` (etc.; ``lora=DIR``
for ``lora.dir=DIR``), so that ``editor=ft editor.lr=1e-3`` works. Per-model defaults live in ``configs/model/*.yaml`` (layers, not module
paths); per-editor defaults in ``configs/editor/<name>.yaml``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mend.errors import ConfigError
from mend.paths import config_dir

GROUPS = {"model": "name", "editor": "name", "data": "name", "lora": "dir"}  # group=X means group.<key>=X


@dataclass
class ModelSection:
    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # auto | balanced | sequential: shard over the devices with accelerate


@dataclass
class ModelFile:
    """Schema of ``configs/model/*.yaml``."""

    family: str  # the HF model_type the file is written for (llama, gpt2, gptj, gemma3_text, t5)
    match: list[str] = field(default_factory=list)  # aliases / HF ids this file applies to
    family_default: bool = False  # use for any model of this family that no file matches
    description: str = ""
    n_layers: int | None = None
    editors: dict[str, Any] = field(default_factory=dict)  # editor name -> defaults for this model


def _rewrite(arg: str) -> str:
    key, _, value = arg.partition("=")
    key = key.strip()
    return f"{key}.{GROUPS[key]}={value}" if key in GROUPS else f"{key}={value}"


def parse_overrides(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Split argv into an optional YAML config path (first positional argument) and dotlist overrides."""
    path, dotlist = None, []
    for i, arg in enumerate(argv):
        if "=" in arg:
            dotlist.append(_rewrite(arg))
        elif i == 0 and arg.endswith((".yaml", ".yml")):
            path = Path(arg)
        else:
            raise ConfigError(f"unexpected argument '{arg}': give an optional config.yaml first, then key=value pairs")
    return path, dotlist


def load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except Exception as e:  # YAML syntax errors come from several libraries
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping")
    for key, sub in GROUPS.items():  # `editor: ft` in a file means `editor: {name: ft}`
        if isinstance(cfg.get(key), str):
            cfg[key] = {sub: cfg[key]}
    return cfg


def build_config(
    schema: type, argv: list[str], text_keys: tuple[str, ...] = (), base: Path | None = None,
    values: dict[str, Any] | None = None,
) -> DictConfig:
    """Schema defaults, then the ``base`` YAML file (a command's defaults) and the user's YAML file, then
    ``values`` (a nested dict: the Python API's keyword arguments), then the overrides; type errors become
    ConfigError.

    Values of ``text_keys`` (free text such as prompts), values with surrounding spaces and values that are not
    valid YAML are taken verbatim: YAML would read ``{} is in`` as a mapping and strip the space of `` Rome``.
    """
    path, dotlist = parse_overrides(argv)
    try:
        cfg = OmegaConf.structured(schema)
        for file in (base, path):
            if file is not None:
                cfg = OmegaConf.merge(cfg, load_yaml(file))
        if values:
            cfg = OmegaConf.merge(cfg, values)
        for item in dotlist:
            key, _, raw = item.partition("=")
            OmegaConf.update(cfg, key, _value(key, raw, text_keys), merge=True, force_add=False)
        check_values(OmegaConf.to_object(cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(omega_message(e)) from e
    return cfg


SEED = {"min": 0, "max": 2**32 - 1}  # field metadata of every seed: what numpy and Lightning accept
NONNEGATIVE = {"min": 0}  # e.g. an optimiser's rates and weight decay
INT64 = 2**63  # every integer setting must fit torch's and numpy's index type


def check_values(obj: Any, where: str = "") -> None:
    """Every float of a typed config (dataclass) is finite, no string holds a NUL character (no command line can
    carry one, and no path may), and every number of a field declared with ``metadata={"min": a, "max": b}``
    lies in that range (lists: each item). ConfigError otherwise."""
    if not is_dataclass(obj):
        return
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{where}{f.name}"
        if is_dataclass(value):
            check_values(value, f"{key}.")
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, str) and "\x00" in x:
                raise ConfigError(f"{key} contains a NUL character")
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{key} must be a finite number, got {x}")
            if isinstance(x, int) and not -INT64 <= x < INT64:
                raise ConfigError(f"{key} is out of range (a 64-bit integer), got {x}")
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                    f"at least {lo}" if lo is not None else f"at most {hi}")
                raise ConfigError(f"{key} must be {bounds}, got {x}")


def _value(key: str, raw: str, text_keys: tuple[str, ...]) -> Any:
    if key in text_keys or raw != raw.strip():
        return verbatim(raw)
    try:
        return OmegaConf.from_dotlist([f"v={raw}"])["v"]
    except Exception:  # not YAML: keep the text
        return raw


def verbatim(text: str) -> str:
    """``text`` escaped so that omegaconf stores it as written: ``${...}`` in a prompt is text, not an
    interpolation (backslashes just before it are doubled, as omegaconf's grammar reads them)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def omega_message(e: OmegaConfBaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{msg} (key: {key})" if key and str(key) not in msg else msg


def model_files() -> dict[Path, ModelFile]:
    """Every model config file, validated."""
    out = {}
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        try:
            out[path] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelFile), OmegaConf.load(path)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {omega_message(e)}") from e
    return out


def model_file_for(name: str, model_type: str | None) -> ModelFile | None:
    """The model config that matches ``name`` (alias / HF id / path stem), else its family's default."""
    files = model_files()
    stem = Path(name).name
    for path, mf in files.items():
        if name in mf.match or stem in mf.match or path.stem == name:
            return mf
    for mf in files.values():
        if mf.family_default and mf.family == model_type:
            return mf
    return None


def editor_defaults(name: str) -> DictConfig | None:
    path = config_dir() / "editor" / f"{name}.yaml"
    return OmegaConf.load(path) if path.exists() else None


def editor_preset(preset: str, editor: str) -> DictConfig:
    """The settings of ``configs/preset/<preset>.yaml`` for ``editor``."""
    path = config_dir() / "preset" / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (config_dir() / "preset").glob("*.yaml"))
        raise ConfigError(f"unknown editor preset '{preset}' (known: {', '.join(known) or 'none'})")
    section = OmegaConf.load(path).get(editor)
    if section is None:
        raise ConfigError(f"preset '{preset}' has no settings for editor '{editor}'")
    return section


def editor_layers(editor: str, model_name: str, model_type: str | None, user: dict[str, Any]) -> list[Any]:
    """Config layers for an editor, lowest priority first: editor file, model file, the preset the user names
    (``preset=reference``: configs/preset/), user overrides."""
    mf = model_file_for(model_name, model_type)
    user = dict(user or {})
    preset = user.pop("preset", None)
    return [editor_defaults(editor), (mf.editors.get(editor) if mf else None),
            (editor_preset(str(preset), editor) if preset else None), user]
