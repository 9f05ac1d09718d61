"""Where the project reads and writes: cache, configs, data. Environment variables override defaults."""

from __future__ import annotations

import os
from pathlib import Path

from mend.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Root of caches (converted models, statistics): $MEND_CACHE_DIR, else $XDG_CACHE_HOME/mend, else ~/.cache/mend."""
    env = os.environ.get("MEND_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mend"


def config_dir() -> Path:
    """The YAML config tree: $MEND_CONFIG_DIR, else the package's own ``mend/configs`` (package data, so that an
    installed wheel has the same per-model defaults; ``configs/`` at the repository root links to it)."""
    env = os.environ.get("MEND_CONFIG_DIR")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent / "configs"
    if not (path / "model").is_dir():
        where = "$MEND_CONFIG_DIR" if env else "the installed package"
        raise ConfigError(f"no config tree at {path} (from {where}): its model/ folder holds the per-model defaults")
    return path


def data_dir() -> Path:
    """The data root: $MEND_DATA_DIR, else ../shared/data relative to the repository."""
    env = os.environ.get("MEND_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def under_data_root(path: str | Path) -> Path:
    """A data file: ``path`` as given when it exists (or is absolute), else relative to :func:`data_dir`."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() else data_dir() / p
