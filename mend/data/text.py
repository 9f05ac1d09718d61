"""Plain text for perplexity drawdown (and, later, statistics): WikiText raw files, any text file, or text
sampled from the model itself when no file is available (the offline default)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.errors import MendError
from mend.paths import data_dir

WIKITEXT_TEST, WIKITEXT_VALID = "wikitext/wiki.test.raw", "wikitext/wiki.valid.raw"
WIKITEXT = (WIKITEXT_TEST, WIKITEXT_VALID)  # drawdown: the test file first


def read_text(path: str | Path) -> list[str]:
    """Paragraphs of a text file or of every .txt / .raw file in a folder; WikiText headings and blanks dropped."""
    path = Path(path)
    files = sorted([*path.glob("*.txt"), *path.glob("*.raw")]) if path.is_dir() else [path]
    if not files:
        raise MendError(f"no .txt or .raw files in '{path}'")
    out = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MendError(f"cannot read text file '{f}': {getattr(e, 'strerror', None) or e}") from e
        out.extend(ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("="))
    return out


def default_text_file() -> Path | None:
    for rel in WIKITEXT:
        p = data_dir() / rel
        if p.exists():
            return p
    return None


def chunk_tokens(tok: PreTrainedTokenizerBase, paragraphs: list[str], n_chunks: int, chunk_len: int) -> torch.Tensor:
    """(n, chunk_len) token ids: paragraphs joined, tokenized, cut into consecutive chunks."""
    ids: list[int] = []
    need = n_chunks * chunk_len
    for p in paragraphs:
        ids.extend(tok(p + "\n", add_special_tokens=False).input_ids)
        if len(ids) >= need:
            break
    n = min(n_chunks, len(ids) // chunk_len)
    if n == 0:
        raise MendError(f"the text has fewer than {chunk_len} tokens")
    return torch.tensor(ids[: n * chunk_len]).view(n, chunk_len)


def drawdown_tokens(model: PreTrainedModel, tok: PreTrainedTokenizerBase, source: str, n_chunks: int,
                    chunk_len: int, seed: int = 0) -> torch.Tensor | None:
    """Token chunks for perplexity drawdown: ``auto`` (WikiText from the data folder, else model samples),
    ``self`` (model samples), ``none``, or a path to text."""
    if source == "none" or n_chunks <= 0:
        return None
    if source == "auto":
        f = default_text_file()
        source = str(f) if f else "self"
    if source == "self":
        return sample_token_batch(model, tok, n_chunks, chunk_len, seed)
    return chunk_tokens(tok, read_text(source), n_chunks, chunk_len)


def statistics_tokens(model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_tokens: int,
                      text_path: str | Path | None = None, chunk_len: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, chunk_len) token chunks of ordinary text for input statistics (MEND's preconditioner): ``text_path``,
    else WikiText's validation file in the data root (not the drawdown text), else text sampled from the model."""
    valid = data_dir() / WIKITEXT_VALID
    source = str(text_path) if text_path else (str(valid) if valid.exists() else "self")
    ids = drawdown_tokens(model, tok, source, max(1, n_tokens // chunk_len), chunk_len, seed)
    if ids is None:
        raise MendError(f"no text for input statistics from '{source}'")
    return ids


SAMPLE_OPENINGS = ("The", "In", "A", "It", "This", "When", "On", "There", "After", "Many")
SAMPLER_VERSION = 2  # 2: samples start after the document-start token (see document_start_ids)
DOCUMENT_SEPARATOR = "<|endoftext|>"  # what GPT-2, GPT-J, SmolLM2 and Qwen2 put between pretraining documents


def document_start_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """The token(s) a model saw at the start of a pretraining document, to put before a sampling opening.

    Without them some models sample at position 0 as from the middle of nothing: SmolLM2 continues "The" with
    "-the-key-to-be-t", and after ``<|endoftext|>`` with "The average of a set of numbers is a common problem".
    Empty when the tokenizer adds a BOS token itself (Llama, Gemma) or has no such token (T5); otherwise the
    document separator when the vocabulary has one, else the BOS token."""
    probe = tok("The").input_ids
    if probe != tok("The", add_special_tokens=False).input_ids:
        return []  # the tokenizer adds its own start token, which the callers' tok() calls keep
    sep = tok.convert_tokens_to_ids(DOCUMENT_SEPARATOR) if DOCUMENT_SEPARATOR in tok.get_vocab() else None
    if sep is not None:
        return [sep]
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def sampling_prefix(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """What sampling from ``model`` starts with before an opening word: the document-start token(s) of a
    decoder-only model, nothing for an encoder-decoder one (its decoder has its own start token)."""
    return [] if model.config.is_encoder_decoder else document_start_ids(tok)


def opening_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """One token per neutral opening word (its first token), duplicates removed: single-token prompts never need
    padding, so any mix of them can share a batch."""
    ids: list[int] = []
    for word in SAMPLE_OPENINGS:
        first = tok(word, add_special_tokens=False).input_ids[:1]
        if first and first[0] not in ids:
            ids.append(first[0])
    if not ids:
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    return ids


@torch.no_grad()
def sample_token_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, n_seqs: int, seq_len: int,
                       seed: int = 0, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """(n_seqs, seq_len) token ids sampled from the model (temperature 1, top-k 50), ``batch_size`` rows at a time.

    Used for perplexity drawdown text and for statistics corpora of many thousand tokens. Each row starts from the
    document-start token (:func:`document_start_ids`) and a one-token opening (cycling over
    :data:`SAMPLE_OPENINGS`), neither part of the row, so no row is padded.
    Deterministic for a given seed and batch size; the caller's random state is left as it was.
    """
    if n_seqs <= 0 or seq_len <= 0 or batch_size <= 0:
        raise MendError(f"n_seqs, seq_len and batch_size must be positive, got {n_seqs}, {seq_len}, {batch_size}")
    from tqdm.auto import tqdm

    starts = opening_ids(tok)
    head = sampling_prefix(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    rows: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for lo in tqdm(range(0, n_seqs, batch_size), desc="sampling text", unit="batch", disable=not progress):
            n = min(batch_size, n_seqs - lo)
            prompt = torch.tensor([[*head, starts[(lo + i) % len(starts)]] for i in range(n)], device=model.device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=seq_len,
                                 min_new_tokens=seq_len, pad_token_id=pad)
            new = out[:, 1:] if model.config.is_encoder_decoder else out[:, prompt.shape[1]:]
            rows.append(new[:, :seq_len].cpu())
    return torch.cat(rows)
