"""mend: a model-editing framework (learned MEND editors, closed-form editors, one evaluator).

The Python API (README, "Python"): ``load_model``, ``EditRequest``, ``create_editor``, ``apply_edit``, ``edited``,
``evaluate``, ``EditResult`` (``save`` / ``load`` / ``to_peft``). Imported on first use, so that ``import mend``
and the commands start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "mend.models",
    "EditRequest": "mend.requests",
    "make_request": "mend.requests",
    "create_editor": "mend.api",
    "apply_edit": "mend.editor",
    "edited": "mend.editor",
    "EditResult": "mend.editor",
    "Editor": "mend.editor",
    "available_editors": "mend.editor",
}
__all__ = [*_API, "evaluate", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":  # the command module, callable as the function (mend/evaluate.py)
        return importlib.import_module("mend.evaluate")
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mend' has no attribute {name!r}")
