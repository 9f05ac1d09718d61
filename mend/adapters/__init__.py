"""Architecture adapters, registered by Hugging Face model class."""

from mend.adapters import families as _families  # noqa: F401  (registers the adapters)
from mend.adapters.base import (
    MLP_KINDS,
    ModelAdapter,
    WeightRef,
    get_adapter,
    register_adapter,
    supported_architectures,
)

__all__ = ["MLP_KINDS", "ModelAdapter", "WeightRef", "get_adapter", "register_adapter", "supported_architectures"]
