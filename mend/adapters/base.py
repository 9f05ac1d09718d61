"""The adapter contract: where each block's MLP weights are and how they are stored.

All editor maths uses the ``nn.Linear`` convention, ``W`` of shape ``(d_out, d_in)`` and ``y = W x``; an adapter
converts at the boundary. Orientation is decided by the module type (``nn.Linear`` or GPT-2's ``Conv1D``), never
by shape, because square matrices would make shape-guessing silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from mend.errors import ConfigError, UnsupportedArchitecture

MLP_KINDS = ("mlp_in", "mlp_gate", "mlp_up", "mlp_out")


@dataclass(frozen=True)
class WeightRef:
    """One editable weight matrix."""

    stack: str  # "decoder" for decoder-only models; "encoder" or "decoder" for T5
    layer: int
    kind: str  # one of MLP_KINDS
    module: str  # module path, e.g. "model.layers.3.mlp.down_proj"
    transposed: bool  # True when stored as [in, out] (GPT-2 Conv1D)

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.layer}.{self.kind}"


def is_transposed(module: nn.Module) -> bool:
    """Whether a weight-bearing module stores its matrix as [in, out]."""
    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise UnsupportedArchitecture(f"cannot tell the weight orientation of module type {type(module).__name__}")


class ModelAdapter:
    """Locates the blocks, MLP weights, final norm, LM head and embedding of one architecture.

    Subclasses set the class attributes; the logic is shared.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    stacks: ClassVar[dict[str, str]] = {}  # stack name -> path of its ModuleList of blocks
    mlp: ClassVar[dict[str, dict[str, str]]] = {}  # stack -> kind -> module path inside a block
    final_norms: ClassVar[dict[str, str]] = {}  # stack -> final norm path
    lm_head_path: ClassVar[str] = "lm_head"
    embedding_path: ClassVar[str] = ""
    post_mlp_norm: ClassVar[str | None] = None  # norm applied to the MLP output inside a block (Gemma 3)
    # stack -> path inside a block of the module whose output is the MLP's (attention's) contribution, before it is
    # added to the residual stream (causal tracing restores these outputs)
    mlp_paths: ClassVar[dict[str, str]] = {}
    attn_paths: ClassVar[dict[str, str]] = {}

    def __init__(self, model: PreTrainedModel):
        self.model = model

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def default_stack(self) -> str:
        return next(iter(self.stacks))

    def blocks(self, stack: str | None = None) -> nn.ModuleList:
        return self.model.get_submodule(self.stacks[self._stack(stack)])

    def num_layers(self, stack: str | None = None) -> int:
        return len(self.blocks(stack))

    def block_path(self, layer: int, stack: str | None = None) -> str:
        stack = self._stack(stack)
        return f"{self.stacks[stack]}.{self.resolve_layer(layer, stack)}"

    def block(self, layer: int, stack: str | None = None) -> nn.Module:
        return self.model.get_submodule(self.block_path(layer, stack))

    def kinds(self, stack: str | None = None) -> list[str]:
        """Weight kinds present in this model's blocks (e.g. T5 v1.1 has a gated MLP, T5 v1.0 does not)."""
        stack = self._stack(stack)
        first = self.block(0, stack)
        return [k for k, p in self.mlp[stack].items() if _has_module(first, p)]

    def resolve_layer(self, layer: int, stack: str | None = None) -> int:
        n = self.num_layers(stack)
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
            raise ConfigError(f"layer {layer!r} out of range for a model with {n} layers (use 0..{n - 1} or -1..-{n})")
        return layer % n

    def mlp_module(self, layer: int, stack: str | None = None) -> nn.Module:
        """The MLP of block ``layer``: its output is what the MLP adds to the residual stream (before any post-norm
        of the block, e.g. Gemma 3's, which is a function of it)."""
        stack = self._stack(stack)
        return self.block(layer, stack).get_submodule(self.mlp_paths[stack])

    def attn_module(self, layer: int, stack: str | None = None) -> nn.Module:
        """The self-attention of block ``layer``; its output (the first element when a tuple) is what attention adds
        to the residual stream."""
        stack = self._stack(stack)
        return self.block(layer, stack).get_submodule(self.attn_paths[stack])

    # --- weights ---------------------------------------------------------------------------------------------
    def weight_ref(self, layer: int, kind: str = "mlp_out", stack: str | None = None) -> WeightRef:
        stack = self._stack(stack)
        layer = self.resolve_layer(layer, stack)
        if kind not in self.kinds(stack):
            raise ConfigError(f"weight kind '{kind}' not in {type(self.model).__name__}; available: {self.kinds(stack)}")
        path = f"{self.block_path(layer, stack)}.{self.mlp[stack][kind]}"
        return WeightRef(stack, layer, kind, path, is_transposed(self.model.get_submodule(path)))

    def weight_refs(
        self, kinds: list[str] | None = None, layers: list[int] | None = None, stacks: list[str] | None = None
    ) -> list[WeightRef]:
        """Every editable MLP weight, optionally filtered by kind (kinds that this architecture lacks are passed
        over: one list serves several families), layer and stack; a filter that leaves nothing is an error."""
        out = []
        for stack in stacks or list(self.stacks):
            n = self.num_layers(stack)
            wanted = range(n) if layers is None else sorted({self.resolve_layer(x, stack) for x in layers})
            for layer in wanted:
                for kind in self.kinds(stack):
                    if kinds is None or kind in kinds:
                        out.append(self.weight_ref(layer, kind, stack))
        if not out:
            known = sorted({k for s in stacks or list(self.stacks) for k in self.kinds(s)})
            raise ConfigError(f"no weights to edit in {type(self.model).__name__} with kinds {kinds} and layers "
                              f"{layers} (its kinds: {known})")
        return out

    def module(self, ref: WeightRef) -> nn.Module:
        """The module that owns the weight; its input is the key ``u`` and its output gradient is ``δ``."""
        return self.model.get_submodule(ref.module)

    def parameter(self, ref: WeightRef) -> nn.Parameter:
        return self.module(ref).weight

    def get_weight(self, ref: WeightRef) -> torch.Tensor:
        """The weight as ``(d_out, d_in)`` (a view, not a copy)."""
        w = self.parameter(ref)
        return w.T if ref.transposed else w

    @staticmethod
    def to_stored(ref: WeightRef, delta: torch.Tensor) -> torch.Tensor:
        """Convert a ``(d_out, d_in)`` delta to the parameter's storage layout."""
        return delta.T if ref.transposed else delta

    # --- other parts -----------------------------------------------------------------------------------------
    def final_norm(self, stack: str | None = None) -> nn.Module:
        stack = stack or ("decoder" if "decoder" in self.final_norms else self.default_stack)
        return self.model.get_submodule(self.final_norms[stack])

    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    def embedding(self) -> nn.Embedding:
        return self.model.get_submodule(self.embedding_path)

    def _stack(self, stack: str | None) -> str:
        stack = stack or self.default_stack
        if stack not in self.stacks:
            raise ConfigError(f"stack '{stack}' not in {type(self.model).__name__}; available: {list(self.stacks)}")
        return stack


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: register an adapter under each HF model class name it lists."""
    for name in cls.model_classes:
        _REGISTRY[name] = cls
    return cls


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``'s class (or a base class), or UnsupportedArchitecture naming the supported ones."""
    for klass in type(model).__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__](model)
    raise UnsupportedArchitecture(
        f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported_architectures())}"
    )
