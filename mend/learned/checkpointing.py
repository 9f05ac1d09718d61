"""Checkpoints without pickle: Lightning's resume state as safetensors + JSON, and the editor after every save.

- :class:`SafetensorsCheckpointIO` (a Lightning CheckpointIO plugin) stores a checkpoint as a folder:
  ``tensors.safetensors`` (every tensor: hypernetwork, running statistics, optimizer state) and ``state.json``
  (everything else: loop progress, step counters, hyper-parameters of the optimizer). A value that is neither a
  tensor nor plain JSON data is refused, so nothing executable can ever be stored or loaded.
- :class:`EditorCheckpoint` (a callback) saves ``<out>/last`` for resuming every ``every_n_steps`` optimizer steps
  and at the end of training, and writes the editor itself (``editor.safetensors`` + ``config.yaml``) each time;
  with ``write_best`` it also keeps, after every validation, the editor with the highest ``val/score`` so far
  (a run directory of its own, ``<out>/best``; the best score travels in the resume state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors.torch import load_file, save_file

from mend.errors import MendError
from mend.io import write_dir_atomically

log = logging.getLogger(__name__)
TENSORS, STATE = "tensors.safetensors", "state.json"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of ``obj``; tensors go to ``tensors`` and leave a reference behind."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    raise MendError(f"checkpoint value at {where or 'top level'} has type {type(obj).__name__}, "
                    "which is neither a tensor nor plain data; it cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as ``<path>/tensors.safetensors`` + ``<path>/state.json``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        state = _encode(checkpoint, tensors, "")

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "mend-lightning-checkpoint"})
            (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")

        write_dir_atomically(Path(path), write)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not (path / STATE).exists() or not (path / TENSORS).exists():
            raise MendError(f"'{path}' is not a resume checkpoint (it needs {STATE} and {TENSORS})")
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        tensors = load_file(str(path / TENSORS), device=str(device))
        return _decode(json.loads((path / STATE).read_text(encoding="utf-8")), tensors)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and bytes): equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EditorCheckpoint(pl.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end: ``<out>/last`` (resume) and the editor files."""

    def __init__(self, out: Path, every_n_steps: int, write_editor: Callable[[pl.LightningModule, int], None],
                 write_best: Callable[[pl.LightningModule, int, dict[str, float]], None] | None = None,
                 monitor: str = "val/score", reset_best: bool = False):
        self.out, self.every, self.write_editor = Path(out), every_n_steps, write_editor
        self.write_best, self.monitor, self.reset_best = write_best, monitor, reset_best
        self.best: float | None = None
        self._saved_step = -1
        self.digests: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The resumed run's best score, unless ``reset_best`` (a resume with other loss or data settings, whose
        validations are not comparable): then the next validation's editor replaces ``<out>/best``."""
        self.best = None if self.reset_best else state.get("best")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if self.write_best is None or value is None or trainer.sanity_checking:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best = value
            if trainer.is_global_zero:
                metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
                self.write_best(pl_module, trainer.global_step, metrics)
            log.info("best %s %.4f at step %d", self.monitor, value, trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run has its checkpoint already

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > self._saved_step and step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer, pl_module)
        elif trainer.is_global_zero:
            self.write_editor(pl_module, trainer.global_step)
        self.digests = self._gather_digests(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the editor files first: a resume state never exists without the run's config.yaml beside it
        if trainer.is_global_zero:
            self.write_editor(pl_module, trainer.global_step)
        trainer.save_checkpoint(self.out / "last")  # every rank calls it; rank 0 writes
        self._saved_step = trainer.global_step
        log.info("checkpoint at step %d", trainer.global_step)

    @staticmethod
    def _gather_digests(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """The editor's digest on every rank (DDP keeps them equal; this records that it did)."""
        digest = state_digest(pl_module.hypernet)
        if trainer.world_size == 1:
            return [digest]
        raw = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=pl_module.device)
        gathered = trainer.strategy.all_gather(raw)  # (world, 32)
        return [bytes(row.tolist()).hex() for row in gathered.cpu()]
