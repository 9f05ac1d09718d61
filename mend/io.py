"""Atomic file and folder writes (a temporary one in the same folder, then rename)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mend.errors import MendError

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``; nothing partial is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _w)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json_or_lines(path: str | os.PathLike, what: str = "data", error: type[MendError] = MendError) -> Any:
    """The JSON value of a file, or the list of its JSON lines; unreadable or malformed files raise ``error``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} file '{path}': {getattr(e, 'strerror', None) or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise error(f"'{path}' is neither JSON nor JSON lines: {e}") from e


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder beside ``path``, then swap it in by renames (never a half-written folder; a kill
    between the two renames leaves the old folder in ``.<name>.old.*/x``, where :func:`recover_dir` finds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.rename(path, old / "x")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def recover_dir(path: Path) -> bool:
    """Put back the folder a killed :func:`write_dir_atomically` had moved aside, when ``path`` is missing."""
    if path.exists():
        return False
    old = sorted(path.parent.glob(f".{path.name}.old.*/x"), key=lambda p: p.stat().st_mtime)
    if not old:
        return False
    os.rename(old[-1], path)
    log.warning("restored %s from an interrupted replacement", path)
    return True
