"""Data sets by name (``data=counterfact`` ...), read from ``data.path`` or the data root ($MEND_DATA_DIR)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mend.data.records import EditDataset
from mend.errors import MendError
from mend.paths import data_dir

# name -> (loader module:function, default file under the data root or None)
DATASETS: dict[str, tuple[str, str | None]] = {
    "counterfact": ("mend.data.counterfact:load_counterfact", "counterfact/counterfact_rome.json"),
    "zsre": ("mend.data.zsre:load_zsre", "zsre/zsre_mend_eval_portability_gpt4.json"),
    "knowedit": ("mend.data.zsre:load_zsre", "knowedit/ZsRE/ZsRE-test-all.json"),
    "mquake": ("mend.data.mquake:load_mquake", "mquake/AKEW-MQuAKE-CF-354.json"),
    "known": ("mend.data.knowns:load_knowns", "knowns/known_1000.json"),
    "builtin": ("mend.data.builtin_dataset:load_builtin", None),
}


def _loader(name: str) -> Callable[..., EditDataset]:
    import importlib

    module, fn = DATASETS[name][0].split(":")
    return getattr(importlib.import_module(module), fn)


def load_dataset(
    name: str, path: str | None = None, limit: int | None = None, on_error: str = "skip",
    split: str = "test", seed: int = 0,
) -> EditDataset:
    """Load a named data set; ``path`` overrides its default file under the data root."""
    if name not in DATASETS:
        raise MendError(f"unknown data set '{name}'; available: {', '.join(sorted(DATASETS))}")
    if limit is not None and limit <= 0:
        raise MendError(f"data.limit must be positive, got {limit}")
    if name == "builtin":
        return _loader(name)(split=split, limit=limit, seed=seed, path=path)
    if path is None:
        path = str(data_dir() / DATASETS[name][1])
        if not Path(path).exists():
            raise MendError(f"no data.path given and '{path}' does not exist: set data.path= or MEND_DATA_DIR")
    elif not Path(path).exists():
        raise MendError(f"data file not found: {path}")
    ds = _loader(name)(path, limit=limit, on_error=on_error)
    if not ds.requests:
        raise MendError(f"'{path}' gave no usable records ({len(ds.skipped)} skipped)")
    return ds
