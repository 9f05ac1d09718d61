"""The Editor contract shared by learned and closed-form editors, their registry, and exact apply / restore."""

from __future__ import annotations

import contextlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import ModelAdapter, WeightRef, get_adapter
from mend.config import check_values
from mend.errors import ConfigError, MendError
from mend.io import atomic_write
from mend.requests import EditRequest

if TYPE_CHECKING:
    from mend.lora import PeftExport


@dataclass(frozen=True)
class ForwardPatch:
    """A replacement of one module's forward while an edit is applied, for editors that leave the weights alone
    (memory-based editors such as SERAC). ``wrap(forward)`` gets the forward beneath (the module's own, or an
    earlier patch's) and returns the one to run; ``module`` is a module path ("" is the model itself)."""

    module: str
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass
class EditResult:
    """Weight deltas in the ``(d_out, d_in)`` convention, keyed by the weight they change, plus diagnostics, and
    forward patches keyed by name: applying a patch whose key is already applied replaces it (a memory that grows
    from call to call stays one patch)."""

    deltas: dict[WeightRef, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    patches: dict[str, ForwardPatch] = field(default_factory=dict)

    def weights_only(self, what: str) -> None:
        """Refuse ``what`` (saving, a LoRA export, ...) for an edit that lives in forward patches."""
        if self.patches:
            raise MendError(f"{what} needs an edit made of weight changes; this one holds forward patches "
                            f"({', '.join(self.patches)}) of a memory-based editor, which only live in this process")

    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors; the weight references travel in the metadata (JSON)."""
        from safetensors.torch import save_file

        self.weights_only("saving an edit")
        tensors = {ref.param: d.detach().contiguous().cpu() for ref, d in self.deltas.items()}
        if len(tensors) != len(self.deltas):
            raise MendError("an EditResult to save must hold at most one delta per weight")
        refs = [dict(vars(ref)) for ref in self.deltas]
        meta = {"refs": json.dumps(refs), "diagnostics": json.dumps(self.diagnostics, default=str)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> EditResult:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            refs = [WeightRef(**r) for r in json.loads(meta["refs"])]
            deltas = {ref: f.get_tensor(ref.param) for ref in refs}
        return cls(deltas, json.loads(meta.get("diagnostics", "{}")))

    def to_peft(self, path: str | Path, model: PreTrainedModel, rank: int | None = None) -> PeftExport:
        """Write the edit as a PEFT LoRA adapter folder (exact at the update's rank; ``rank`` truncates by SVD):
        ``peft.PeftModel.from_pretrained(model, path)`` then gives the edited model. See :mod:`mend.lora`."""
        from mend.lora import export_peft

        self.weights_only("a LoRA export")
        return export_peft(self.deltas, model, path, rank)

    @classmethod
    def combine(cls, results: list[EditResult]) -> EditResult:
        """Several edits applied one after another, as one result (their deltas summed per weight)."""
        deltas: dict[WeightRef, torch.Tensor] = {}
        patches: dict[str, ForwardPatch] = {}
        for r in results:
            for ref, d in r.deltas.items():
                deltas[ref] = d.clone() if ref not in deltas else deltas[ref] + d.to(deltas[ref].dtype)
            patches.update(r.patches)  # a later patch with the same key replaces the earlier one
        return cls(deltas, {"combined": len(results)}, sum(r.seconds for r in results), patches)


_PATCHES = "_mend_patches"  # model attribute: patch key -> (module, forward beneath, installed forward)
_ABSENT = object()


class AppliedEdit:
    """Handle returned by :func:`apply_edit`; ``restore()`` puts back the original weights bit for bit and the
    forwards as they were (an earlier patch that a same-key patch replaced comes back)."""

    def __init__(self, originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]):
        self._originals = originals
        # (registry, key, module, previous forward attribute, previous entry) of each patch installed
        self._installed: list[tuple[dict, str, torch.nn.Module, Any, Any]] = []

    @torch.no_grad()
    def restore(self) -> None:
        for param, saved in self._originals.values():
            param.copy_(saved)
        self._originals = {}
        for registry, key, module, prev_attr, prev_entry in reversed(self._installed):
            if prev_attr is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev_attr
            if prev_entry is None:
                registry.pop(key, None)
            else:
                registry[key] = prev_entry
        self._installed = []


def _install(model: PreTrainedModel, key: str, patch: ForwardPatch) -> tuple[dict, str, torch.nn.Module, Any, Any]:
    """Put ``patch`` on its module; a patch already applied under ``key`` is replaced (it must be the outermost
    one on its module, so that nothing installed later wraps it)."""
    registry = model.__dict__.setdefault(_PATCHES, {})
    try:
        module = model.get_submodule(patch.module) if patch.module else model
    except AttributeError as e:
        raise MendError(f"patch '{key}': the model has no module '{patch.module}'") from e
    prev_attr = module.__dict__.get("forward", _ABSENT)
    prev_entry = registry.get(key)
    beneath = module.forward
    if prev_entry is not None:
        old_module, old_beneath, old_fn = prev_entry
        if old_module is not module or module.__dict__.get("forward") is not old_fn:
            raise MendError(f"patch '{key}' cannot replace the applied one: another patch wraps it")
        beneath = old_beneath
    fn = patch.wrap(beneath)
    module.forward = fn
    registry[key] = (module, beneath, fn)
    return registry, key, module, prev_attr, prev_entry


@torch.no_grad()
def apply_edit(model: PreTrainedModel, result: EditResult, adapter: ModelAdapter | None = None) -> AppliedEdit:
    """Add the deltas to the model's weights in place (in the parameters' dtype and layout) and install the
    forward patches."""
    adapter = adapter or get_adapter(model)
    staged = []
    for ref, delta in result.deltas.items():  # check every shape before changing anything
        param = adapter.parameter(ref)
        stored = adapter.to_stored(ref, delta)
        if stored.shape != param.shape:
            raise MendError(f"delta for {ref.param} has shape {tuple(delta.shape)}, weight is {tuple(param.shape)}")
        staged.append((ref, param, stored))
    originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for ref, param, stored in staged:
        if ref.param not in originals:
            originals[ref.param] = (param, param.detach().clone())
        param.add_(stored.to(device=param.device, dtype=param.dtype))
    handle = AppliedEdit(originals)
    try:
        for key, patch in result.patches.items():
            handle._installed.append(_install(model, key, patch))
    except BaseException:
        handle.restore()
        raise
    return handle


@contextlib.contextmanager
def trial_edits(model: PreTrainedModel, adapter: ModelAdapter | None = None) -> Iterator[Callable[[EditResult], None]]:
    """Yield ``apply(result)``: results applied inside the block are seen by later computations and all undone,
    newest first, when it exits (also on an exception). Editors use it to build an edit step by step."""
    handles: list[AppliedEdit] = []
    try:
        yield lambda result: handles.append(apply_edit(model, result, adapter))
    finally:
        for h in reversed(handles):
            h.restore()


@contextlib.contextmanager
def edited(model: PreTrainedModel, result: EditResult) -> Iterator[PreTrainedModel]:
    """Apply ``result`` for the duration of the block; always restore afterwards."""
    with trial_edits(model) as apply:
        apply(result)
        yield model


class Editor(ABC):
    """Every editor: configured by a dataclass, ``edit`` returns deltas without changing the model.

    Editors may hold state across calls (e.g. keys of earlier edits in sequential use); ``reset`` clears it.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @abstractmethod
    def edit(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]
    ) -> EditResult:
        """Compute the weight deltas that make ``model`` satisfy ``requests``."""

    def reset(self) -> None:  # noqa: B027  (optional hook)
        """Forget state kept across edits."""

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:  # noqa: B027
        """Do once-per-model work (statistics, templates) before edits are timed; optional."""


# name -> "module:Class"; imported on first use so that mend never imports locate_edit directly
_BUILTIN: dict[str, str] = {
    "ft": "mend.editors.ft:FTEditor",
    "mend": "mend.learned.mend.editor:MendEditor",
    "malmen": "mend.learned.malmen.editor:MalmenEditor",
    "serac": "mend.learned.serac.editor:SeracEditor",
    "rome": "locate_edit.rome:ROMEEditor",
    "r-rome": "locate_edit.rome:RROMEEditor",
    "memit": "locate_edit.memit:MEMITEditor",
    "emmet": "locate_edit.memit:EMMETEditor",
    "alphaedit": "locate_edit.memit:AlphaEditEditor",
}
_REGISTRY: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make an editor available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_editors() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTRY})


def editor_class(name: str) -> type[Editor]:
    if not isinstance(name, str):
        raise ConfigError(f"an editor name must be a string, got {name!r}; available: {', '.join(available_editors())}")
    if name not in _REGISTRY and name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown editor '{name}'; available: {', '.join(available_editors())}")
    return _REGISTRY[name]


def build_editor_config(name: str, *layers: Any) -> Any:
    """Merge config layers (dicts / DictConfigs, later wins) onto the editor's typed schema; validate."""
    klass = editor_class(name)
    assert is_dataclass(klass.Config)
    try:
        cfg = OmegaConf.structured(klass.Config)
        for layer in layers:
            if layer:
                cfg = OmegaConf.merge(cfg, layer)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"editor '{name}': {_omega_msg(e)}") from e
    try:
        check_values(obj)
    except ConfigError as e:
        raise ConfigError(f"editor '{name}': {e}") from e
    return obj


def create_editor(name: str, *layers: Any) -> Editor:
    return editor_class(name)(build_editor_config(name, *layers))


def config_keys(config_cls: type) -> list[str]:
    return [f.name for f in fields(config_cls)]


def _omega_msg(e: OmegaConfBaseException) -> str:
    return str(e).strip().splitlines()[0]
