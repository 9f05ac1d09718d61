"""Corpora for statistics: WikiText or any text file / folder, a `datasets` dataset (online), or text sampled from
the model itself (cached per model fingerprint), resolved from one string (``auto``, ``self``, a path, ``hf:NAME``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.data.text import SAMPLER_VERSION
from mend.errors import ConfigError, MendError
from mend.io import atomic_write
from mend.models import fingerprint
from mend.paths import cache_dir

log = logging.getLogger(__name__)

SAMPLE_BATCH = 32  # rows generated at once for the `self` corpus
SAMPLE_SEED = 0


@dataclass(frozen=True)
class CorpusSpec:
    """A resolved corpus choice: what to read (``kind`` self / file / hf) and the key that names it in caches."""

    kind: str  # "self", "file" or "hf"
    source: str  # a path for "file", "NAME[:CONFIG[:SPLIT]]" for "hf", "" for "self"
    key: str  # file-name safe, distinguishes different texts


def _sanitise(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "x"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _text_files(path: Path) -> list[Path]:
    return sorted([*path.glob("*.txt"), *path.glob("*.raw")]) if path.is_dir() else [path]


def _self_name(seed: int) -> str:
    """The `self` corpus's name in cache keys: a new sampler version means new text, so new files."""
    return f"self-v{SAMPLER_VERSION}-seed{seed}"


def resolve_corpus(corpus: str) -> CorpusSpec:
    """Turn ``auto`` / ``self`` / a path / ``hf:NAME[:CONFIG[:SPLIT]]`` into a :class:`CorpusSpec` (cheap: reads
    no text). ``auto`` is WikiText from the data folder when present, else ``self``; a file's key holds a hash of
    its absolute path and size, so an edited or different file never hits another's cache."""
    from mend.data.text import default_text_file

    if not isinstance(corpus, str) or not corpus.strip():
        raise ConfigError("corpus is empty: use auto, self, a text file or folder, or hf:NAME[:CONFIG[:SPLIT]]")
    if corpus == "auto":
        found = default_text_file()
        return resolve_corpus(str(found)) if found else resolve_corpus("self")
    if corpus == "self":
        return CorpusSpec("self", "", _self_name(SAMPLE_SEED))
    if corpus.startswith("hf:"):
        parts = corpus[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise ConfigError(f"corpus '{corpus}' must look like hf:NAME[:CONFIG[:SPLIT]]")
        return CorpusSpec("hf", corpus[3:], "hf-" + _sanitise("-".join(parts), 64))
    path = Path(corpus).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"corpus '{corpus}' is not auto, self, hf:NAME or an existing text file or folder")
    size = sum(f.stat().st_size for f in _text_files(path))
    prefix = "dir" if path.is_dir() else "file"
    return CorpusSpec("file", str(path), f"{prefix}-{_sanitise(path.name, 32)}-{_short_hash(f'{path}:{size}')}")


def _hf_paragraphs(source: str) -> Iterator[str]:
    """Rows of a `datasets` dataset's text column, streamed (only as many are read as the chunks need)."""
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        first = next(iter(ds))
    except Exception as e:  # offline, unknown name, bad config: datasets raises many types
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MendError(f"cannot load dataset 'hf:{source}' (offline? use corpus=auto, self or a text file): "
                        f"{msg}") from e
    column = "text" if "text" in first else next((k for k, v in first.items() if isinstance(v, str)), None)
    if column is None:
        raise MendError(f"dataset 'hf:{source}' has no text column (columns: {', '.join(first)})")
    for row in ds:
        if row[column] and row[column].strip():
            yield row[column].strip()


def self_corpus(model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_seqs: int, seq_len: int,
                seed: int = SAMPLE_SEED, progress: bool = True) -> torch.Tensor:
    """(n_seqs, seq_len) token ids sampled from the model, generated once per model fingerprint and kept under
    ``cache_dir()/corpora/<fingerprint>/`` (sampling is far slower than a statistics pass)."""
    from safetensors.torch import load_file, save_file

    from mend.data.text import sample_token_batch

    path = cache_dir() / "corpora" / fingerprint(model) / f"{_self_name(seed)}-{n_seqs}x{seq_len}.safetensors"
    if path.exists():
        return load_file(path)["input_ids"]
    log.info("sampling %d x %d tokens from the model for the `self` corpus (once; cached at %s)", n_seqs, seq_len, path)
    ids = sample_token_batch(model, tok, n_seqs, seq_len, seed=seed, batch_size=SAMPLE_BATCH, progress=progress)
    meta = {"fingerprint": fingerprint(model), "model": str(model.config.name_or_path), "seed": str(seed)}
    atomic_write(path, lambda tmp: save_file({"input_ids": ids.contiguous()}, tmp, metadata=meta))
    return ids


def corpus_tokens(spec: CorpusSpec, model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_tokens: int,
                  seq_len: int, progress: bool = True) -> torch.Tensor:
    """(n, seq_len) token ids, n = ``n_tokens // seq_len`` or fewer when the text is short (logged)."""
    from mend.data.text import chunk_tokens, read_text

    n_chunks = n_tokens // seq_len
    if spec.kind == "self":
        ids = self_corpus(model, tok, n_chunks, seq_len, progress=progress)
    else:
        paragraphs: Any = _hf_paragraphs(spec.source) if spec.kind == "hf" else read_text(spec.source)
        ids = chunk_tokens(tok, paragraphs, n_chunks, seq_len)  # chunk_tokens only iterates; a generator is fine
    if ids.shape[0] < n_chunks:
        log.warning("corpus %s holds only %d tokens of the %d asked for; using all of them",
                    spec.key, ids.numel(), n_chunks * seq_len)
    return ids
