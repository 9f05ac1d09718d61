"""Second-moment statistics C = E[k kᵀ] of MLP keys, cached on disk: the covariance term of ROME and MEMIT.

The key k of a weight is the input of its module (for ``mlp_out``, the MLP's hidden activation). C is uncentred
and averaged over every non-padding token position of ``n_tokens // seq_len`` chunks of a corpus. One streamed
pass collects all requested layers: a pre-hook on each module adds the batch's k kᵀ (a float32 matmul, or the
model's dtype when wider) into a running sum in the ``accumulate`` dtype (float64 by default), and the forward
pass stops once the highest requested module has run, so no upper block and no LM head is computed.

Results are cached per model fingerprint as safetensors (see :func:`stats_path`); the file's JSON metadata
records what was computed, and a file computed for another model is refused. Tensors are returned in the
``accumulate`` dtype (float64 by default).

    python -m locate_edit.stats model=smollm2-135m layers=[4,5,6] tokens=100000
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.corpus import CorpusSpec, corpus_tokens, resolve_corpus
from mend.adapters import get_adapter
from mend.config import ModelSection, build_config
from mend.errors import ConfigError, MendError
from mend.io import atomic_write
from mend.models import fingerprint, torch_dtype
from mend.moments import KeyMoments
from mend.paths import cache_dir

log = logging.getLogger(__name__)

METADATA_KEY = "mend_stats"
TENSOR_KEY = "second_moment"


# --- the streamed pass (mend.moments) -------------------------------------------------------------------------
@dataclass
class Moments:
    """Running sums of k kᵀ per layer and the number of token positions they cover."""

    sums: dict[int, torch.Tensor]
    count: int

    def means(self) -> dict[int, torch.Tensor]:
        if self.count == 0:
            raise MendError("no token positions to average over (empty corpus or all padding)")
        return {layer: s / self.count for layer, s in self.sums.items()}


def accumulate_moments(model: PreTrainedModel, input_ids: torch.Tensor, layers: Sequence[int],
                       attention_mask: torch.Tensor | None = None, kind: str = "mlp_out", stack: str | None = None,
                       batch_size: int = 8, accumulate: torch.dtype = torch.float64,
                       progress: bool = False) -> Moments:
    """Sums of k kᵀ over every position with ``attention_mask`` 1, for the ``kind`` module of each layer (resolved
    indices as keys), in one pass that stops after the highest layer's module."""
    adapter = get_adapter(model)
    resolved = sorted({adapter.resolve_layer(x, stack) for x in layers})
    refs = {layer: adapter.weight_ref(layer, kind, stack) for layer in resolved}
    acc = KeyMoments(adapter, refs, accumulate)
    sums = acc.collect(model, input_ids, acc.modules[max(refs)], attention_mask, stack, batch_size, progress)
    count = input_ids.numel() if attention_mask is None else int(attention_mask.sum())
    return Moments(sums, count)


# --- cache -----------------------------------------------------------------------------------------------------
class ForeignStatistics(MendError):
    """A statistics file computed for another model (its fingerprint differs): never used, never overwritten."""


@dataclass
class LayerStats:
    """One layer's statistic and where it came from."""

    layer: int
    C: torch.Tensor
    n_tokens: int  # token positions actually averaged over
    path: Path | None
    seconds: float  # of the pass that computed it (shared by all layers of that pass); 0 when read from cache
    cached: bool
    meta: dict[str, Any] = field(default_factory=dict)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stats_path(model: PreTrainedModel, layer: int, kind: str, stack: str, corpus_key: str, n_tokens: int,
               seq_len: int, accumulate: torch.dtype = torch.float64) -> Path:
    """``cache_dir()/stats/<fingerprint>/<stack>.L<layer>.<kind>--<corpus key>--<n_tokens>x<seq_len>.<dtype>
    .safetensors``."""
    name = f"{stack}.L{layer:03d}.{kind}--{corpus_key}--{n_tokens}x{seq_len}.{_dtype_name(accumulate)}.safetensors"
    return cache_dir() / "stats" / fingerprint(model) / name


def save_stats(path: Path, C: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write one statistic atomically, with ``meta`` as JSON in the safetensors metadata."""
    from safetensors.torch import save_file

    blob = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file({TENSOR_KEY: C.detach().contiguous().cpu()}, tmp, metadata=blob))


def load_stats(path: str | Path, model: PreTrainedModel | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """A statistic and its metadata; with ``model``, refuse (MendError) a file computed for another model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            C = f.get_tensor(TENSOR_KEY)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:  # damage shows as several types
        raise MendError(f"cannot read statistics file {path}: {e}") from e
    if not isinstance(meta, dict):
        raise MendError(f"cannot read statistics file {path}: its metadata is not a JSON object")
    if model is not None and meta.get("fingerprint") != fingerprint(model):
        raise ForeignStatistics(f"statistics in {path} were computed for model {meta.get('model')} "
                        f"({meta.get('fingerprint')}), not {model.config.name_or_path} ({fingerprint(model)})")
    return C, meta


def _request_meta(model: PreTrainedModel, layer: int, kind: str, stack: str, spec: CorpusSpec, n_tokens: int,
                  seq_len: int, accumulate: torch.dtype) -> dict[str, Any]:
    return {"fingerprint": fingerprint(model), "model": str(model.config.name_or_path), "layer": layer,
            "kind": kind, "stack": stack, "corpus": spec.key, "corpus_source": spec.source or spec.kind,
            "n_tokens": n_tokens, "seq_len": seq_len, "dtype": _dtype_name(accumulate)}


_CHECKED = ("layer", "kind", "stack", "corpus", "n_tokens", "seq_len", "dtype")


def _try_cache(path: Path, model: PreTrainedModel, want: dict[str, Any], d_in: int) -> LayerStats | None:
    """The cached statistic at ``path`` if it answers the request (a ``(d_in, d_in)`` matrix of the requested
    dtype); None (recompute) if absent, unreadable, damaged or for another request. A file for another model
    raises."""
    if not path.exists():
        return None
    try:
        C, meta = load_stats(path, model)
    except ForeignStatistics:
        raise
    except MendError as e:
        log.warning("%s; recomputing", e)
        return None
    used = meta.get("n_tokens_used")
    if (any(meta.get(k) != want[k] for k in _CHECKED) or tuple(C.shape) != (d_in, d_in)
            or _dtype_name(C.dtype) != want["dtype"] or isinstance(used, bool) or not isinstance(used, int)):
        log.warning("statistics file %s does not match the request; recomputing", path)
        return None
    return LayerStats(want["layer"], C, int(meta["n_tokens_used"]), path, 0.0, True, meta)


# --- public entry point ----------------------------------------------------------------------------------------
def _check_args(layers: Sequence[int], n_tokens: int, seq_len: int, batch_size: int, accumulate: torch.dtype) -> None:
    if not layers:
        raise ConfigError("no layers given (e.g. layers=[5])")
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("n_tokens", n_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if n_tokens < seq_len:
        raise ConfigError(f"n_tokens ({n_tokens}) must be at least seq_len ({seq_len}): the corpus is cut into "
                          f"n_tokens // seq_len chunks")
    if not isinstance(accumulate, torch.dtype) or not accumulate.is_floating_point:
        raise ConfigError(f"accumulate must be a floating-point torch dtype, got {accumulate!r}")


def second_moment_stats(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layers: Sequence[int],
                        corpus: str = "auto", n_tokens: int = 100_000, seq_len: int = 128, batch_size: int = 8,
                        kind: str = "mlp_out", stack: str | None = None,
                        accumulate: torch.dtype = torch.float64, cache: bool = True, force: bool = False,
                        progress: bool = True) -> dict[int, LayerStats]:
    """:func:`second_moments` with provenance: per requested layer (keys as given), the statistic, the number of
    tokens it covers, its cache file and the seconds its pass took. ``force`` recomputes and overwrites."""
    _check_args(layers, n_tokens, seq_len, batch_size, accumulate)
    adapter = get_adapter(model)
    resolved = {x: adapter.resolve_layer(x, stack) for x in layers}
    stack = adapter.weight_ref(resolved[layers[0]], kind, stack).stack  # validates stack and kind before any work
    spec = resolve_corpus(corpus)
    want = {layer: _request_meta(model, layer, kind, stack, spec, n_tokens, seq_len, accumulate)
            for layer in sorted(set(resolved.values()))}
    paths = {layer: stats_path(model, layer, kind, stack, spec.key, n_tokens, seq_len, accumulate) for layer in want}
    found: dict[int, LayerStats] = {}
    if cache and not force:
        for layer in want:
            d_in = adapter.get_weight(adapter.weight_ref(layer, kind, stack)).shape[1]
            hit = _try_cache(paths[layer], model, want[layer], d_in)
            if hit is not None:
                found[layer] = hit
    missing = [layer for layer in want if layer not in found]
    if missing:
        found.update(_compute(model, tok, missing, spec, n_tokens, seq_len, batch_size, kind, stack, accumulate,
                              progress, {x: (paths[x] if cache else None) for x in missing}, want))
    return {x: found[layer] for x, layer in resolved.items()}


def _compute(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layers: list[int], spec: CorpusSpec,
             n_tokens: int, seq_len: int, batch_size: int, kind: str, stack: str, accumulate: torch.dtype,
             progress: bool, paths: dict[int, Path | None], want: dict[int, dict[str, Any]]) -> dict[int, LayerStats]:
    """Read the corpus, run one pass for ``layers``, save each result when it has a path."""
    ids = corpus_tokens(spec, model, tok, n_tokens, seq_len, progress)
    log.info("computing E[k kᵀ] for %s layers %s over %d tokens of %s", kind, layers, ids.numel(), spec.key)
    t0 = time.perf_counter()
    moments = accumulate_moments(model, ids, layers, None, kind, stack, batch_size, accumulate, progress)
    means = moments.means()
    seconds = time.perf_counter() - t0
    out = {}
    for layer in layers:
        meta = {**want[layer], "n_tokens_used": moments.count, "seconds": round(seconds, 3)}
        if paths[layer] is not None:
            save_stats(paths[layer], means[layer], meta)
        out[layer] = LayerStats(layer, means[layer], moments.count, paths[layer], seconds, False, meta)
    return out


def second_moments(model: PreTrainedModel, tok: PreTrainedTokenizerBase, layers: list[int], corpus: str = "auto",
                   n_tokens: int = 100_000, seq_len: int = 128, batch_size: int = 8, kind: str = "mlp_out",
                   stack: str | None = None, accumulate: torch.dtype = torch.float64, cache: bool = True,
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """Per layer (keys as given), the uncentred C = E[k kᵀ] of the ``kind`` module's input, shape (d_in, d_in),
    in the ``accumulate`` dtype (float64 by default), over every token of ``n_tokens // seq_len`` chunks of
    ``corpus`` (``auto``, ``self``, a text file or folder, ``hf:NAME[:CONFIG[:SPLIT]]``).

    Cached requests are read from disk without running the model; all uncached layers share one pass.
    """
    got = second_moment_stats(model, tok, layers, corpus, n_tokens, seq_len, batch_size, kind, stack, accumulate,
                              cache, False, progress)
    return {x: s.C for x, s in got.items()}


def condition_number(C: torch.Tensor) -> float:
    """λmax / λmin of a symmetric PSD matrix (inf when singular): how hard C is to invert."""
    eig = torch.linalg.eigvalsh(C.double())
    return float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf


# --- command ---------------------------------------------------------------------------------------------------
USAGE = """
usage: python -m locate_edit.stats [config.yaml] [key=value ...]

Compute (or read from the cache) C = E[k kᵀ] of MLP keys for ROME / MEMIT and print where each is cached.

  model=NAME        alias, local path or Hugging Face id [smollm2-135m]; model.dtype=, model.device=,
                    model.device_map=auto
  layers=[a,b,...]  block indices (negative counts from the top); all computed in one pass (required)
  kind=KIND         the module whose input is the key: mlp_out, mlp_in, mlp_gate, mlp_up [mlp_out]
  stack=NAME        encoder or decoder for T5 [the model's first stack]
  corpus=SRC        auto (WikiText in the data folder, else self), self (text sampled from the model, cached),
                    a text file or folder, or hf:NAME[:CONFIG[:SPLIT]] (needs the network) [auto]
  tokens=N          tokens averaged over: N // seq_len chunks [100000]
  seq_len=N         chunk length [128]
  batch_size=N      chunks per forward pass [8]
  accumulate=DTYPE  dtype of the running sums and of the result: float64 or float32 [float64]
  force=true        recompute and overwrite cached statistics
  progress=false    no progress bar
"""


@dataclass
class StatsCommand:
    model: ModelSection = field(default_factory=ModelSection)
    layers: list[int] = field(default_factory=list)
    kind: str = "mlp_out"
    stack: str | None = None
    corpus: str = "auto"
    tokens: int = 100_000
    seq_len: int = 128
    batch_size: int = 8
    accumulate: str = "float64"
    force: bool = False
    progress: bool = True


def main(argv: list[str]) -> int:
    cfg = build_config(StatsCommand, argv, text_keys=("corpus",))
    _check_args(list(cfg.layers), cfg.tokens, cfg.seq_len, cfg.batch_size, torch_dtype(cfg.accumulate, "accumulate"))
    from mend.models import load_model

    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    got = second_moment_stats(model, tok, list(cfg.layers), cfg.corpus, cfg.tokens, cfg.seq_len, cfg.batch_size,
                              cfg.kind, cfg.stack, torch_dtype(cfg.accumulate, "accumulate"), True, cfg.force,
                              cfg.progress)
    first = next(iter(got.values()))
    print(f"model {cfg.model.name} ({fingerprint(model)}), kind {cfg.kind}, corpus {first.meta.get('corpus')}")
    print(f"{'layer':>5} {'d_in':>6} {'tokens':>9} {'seconds':>8} {'trace':>10} {'cond':>10}  cache")
    for x, s in got.items():
        state = "read" if s.cached else "written"
        print(f"{x:>5} {s.C.shape[0]:>6} {s.n_tokens:>9} {s.seconds:>8.2f} {float(s.C.trace()):>10.4g} "
              f"{condition_number(s.C):>10.3g}  {state} {s.path}")
    return 0


if __name__ == "__main__":
    from mend.cli import run

    run(main, USAGE)
