"""The forward passes of causal tracing, batched: every restoration of a fact is a row (times the noise draws) of a
few batches, and hooks put the clean values back at each row's own (layer, token).

Two engines give the same numbers (tests check them against each other and against single restorations):

- ``probs_with_states``: any model, any set of states per row; every row runs the whole model on the noisy
  embeddings.
- the prefix engine (decoder-only): a restoration at token t first changes block f (its layer, or the first layer
  of its window). Nothing before position t changes (causal attention) and nothing below block f, so its row runs
  only positions t… from block f up: the keys and values of positions < t come from the corrupted run's cache
  and the input of block f from the corrupted run's recorded block inputs. Rows of the same token whose f falls in
  the same group of ``layer_group`` layers share one pass starting at the group's lowest f. On SmolLM2 (30 layers,
  10-token prompts) that is ~40% of the plain engine's multiply-adds; measured 1.3× faster (many smaller passes).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch

from locate_edit.trace.core import FactRun, State, Tracer, TraceSettings
from mend.adapters.partial import (
    block_output_len,
    cache_kv,
    kv_cache,
    prefix_cache_applies,
    start_at_layer,
    supports_partial,
)
from mend.hooks import replace_output
from mend.scoring import split_head

log = logging.getLogger(__name__)


@torch.inference_mode()
def corrupted_probs(tr: Tracer, run: FactRun) -> torch.Tensor:
    """(S,) probability of the answer in each noisy copy, nothing restored."""
    return tr.next_token_probs(run.noisy)[:, run.answer].cpu()


def restored_probs(tr: Tracer, run: FactRun, todo: Sequence[tuple[str, int, int]], s: TraceSettings,
                   ) -> torch.Tensor:
    """(len(todo),) probability of the answer, mean over noise draws, for each restoration (kind, layer, token)
    with its window."""
    sets = [[(k, j, t) for j in tr.window(k, layer, s.window)] for k, layer, t in todo]
    if s.fast and prefix_engine_applies(tr, len(run.prep.ids)):
        return _prefix_probs(tr, run, sets, s)
    return probs_with_states(tr, run, sets, s.batch_tokens)


def prefix_engine_applies(tr: Tracer, seq_len: int) -> bool:
    """Decoder-only models whose blocks can be skipped, on prompts within any sliding attention window."""
    return prefix_cache_applies(tr.model, seq_len) and supports_partial(tr.adapter)


@contextlib.contextmanager
def _patched(tr: Tracer, run: FactRun, patches: dict[tuple[str, int], list[tuple[int, int]]],
             offset: int = 0) -> Iterator[None]:
    """Hooks that set module (kind, layer)'s output at each (row, token) of ``patches`` to its clean value;
    ``offset`` is the position of the batch's first token in the prompt."""
    dev = run.noisy.device
    with contextlib.ExitStack() as stack:
        for (k, j), items in patches.items():
            pos = torch.tensor(items, dtype=torch.long, device=dev)  # (N, 2): row, token in the prompt
            values = run.clean[(k, j)][pos[:, 1]]  # (N, d)
            pos[:, 1] -= offset
            stack.enter_context(replace_output(tr.module(k, j), values, pos))
        yield


@torch.inference_mode()
def probs_with_states(tr: Tracer, run: FactRun, sets: Sequence[Sequence[State]], batch_tokens: int = 2048,
                      ) -> torch.Tensor:
    """(len(sets),) probability of the answer, mean over noise draws, with each set's states restored (whole
    passes; any model)."""
    S, T = run.noisy.shape[:2]
    rows = [(i, smp) for i in range(len(sets)) for smp in range(S)]
    per = max(1, batch_tokens // T)
    out = torch.empty(len(rows))
    for lo in range(0, len(rows), per):
        chunk = rows[lo:lo + per]
        patches: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
        for b, (i, _) in enumerate(chunk):
            for k, j, t in sets[i]:
                patches[(k, j)].append((b, t))
        emb = run.noisy[[smp for _, smp in chunk]]  # (B, T, d)
        with _patched(tr, run, patches):
            out[lo:lo + len(chunk)] = tr.next_token_probs(emb)[:, run.answer].cpu()
    return out.view(len(sets), S).mean(1)


@torch.inference_mode()
def _corrupted_internals(tr: Tracer, run: FactRun) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The corrupted run's (S, L, T, d) block inputs and per-layer (keys, values), each (S, heads, T, d_head)."""
    blocks = tr.adapter.blocks(tr.stack)
    seen: dict[int, torch.Tensor] = {}

    def recorder(j: int):
        def pre_hook(_mod, args, kwargs):
            seen[j] = args[0] if args else kwargs["hidden_states"]

        return pre_hook

    handles = [blocks[j].register_forward_pre_hook(recorder(j), with_kwargs=True) for j in range(tr.n_layers)]
    try:
        base, _ = split_head(tr.model)
        cache = base(inputs_embeds=run.noisy, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    kv = cache_kv(cache)
    return torch.stack([seen[j] for j in range(tr.n_layers)], 1), kv


@torch.inference_mode()
def _prefix_probs(tr: Tracer, run: FactRun, sets: Sequence[Sequence[State]], s: TraceSettings) -> torch.Tensor:
    """:func:`probs_with_states` for single-token sets on a decoder-only model, computing only what changes."""
    S, T = run.noisy.shape[:2]
    block_in, kv = _corrupted_internals(tr, run)
    first = [min(j for _, j, _ in st) for st in sets]  # first block each restoration changes
    token = [st[0][2] for st in sets]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in range(len(sets)):
        groups[(token[i], first[i] // s.layer_group)].append(i)
    out = torch.empty(len(sets), S)
    dev = run.noisy.device
    for (t, _), members in groups.items():
        start = min(first[i] for i in members)
        rows = [(i, smp) for i in members for smp in range(S)]
        per = max(1, s.batch_tokens // (T - t))
        for lo in range(0, len(rows), per):
            chunk = rows[lo:lo + per]
            idx = torch.tensor([smp for _, smp in chunk], device=dev)
            hidden = block_in[idx, start, t:]  # (B, T - t, d): the corrupted input of block `start`
            past = kv_cache([(k[idx, :, :t], v[idx, :, :t]) for k, v in kv]) if t else None
            patches: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
            for b, (i, _) in enumerate(chunk):
                for k, j, tt in sets[i]:
                    patches[(k, j)].append((b, tt))
            with start_at_layer(tr.adapter, start, hidden, _tuple_len(tr, start)), _patched(tr, run, patches, t):
                p = tr.next_token_probs(torch.zeros_like(hidden), past_key_values=past, use_cache=True)
            out[[i for i, _ in chunk], [smp for _, smp in chunk]] = p[:, run.answer].cpu()
    return out.mean(1)


def _tuple_len(tr: Tracer, layer: int) -> int:
    """Whether block ``layer`` returns a tuple (and how long), probed once per tracer and layer."""
    if layer not in tr.tuple_lens:
        tr.tuple_lens[layer] = block_output_len(tr.adapter, layer, tr.stack)
    return tr.tuple_lens[layer]
