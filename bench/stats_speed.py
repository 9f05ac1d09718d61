"""Time the second-moment statistics pass against a plain forward pass truncated at the same module.

Both passes read the same token chunks with the same batching and stop after the layer's ``kind`` module (no
upper blocks, no LM head), under torch.inference_mode; the statistics pass adds the pre-hook that accumulates
k kᵀ in float64. The overhead of the statistics is their ratio (target: at most 1.3). Reading and tokenizing the
corpus is timed once, apart. The two passes alternate batch by batch (in turn first), so that other work on a
shared machine slows both alike. Prints a table and writes bench/results/stats_speed.json.

    python bench/stats_speed.py                     # smollm2-135m, layer 5, 100k tokens of WikiText
    python bench/stats_speed.py --tokens 20000      # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from locate_edit.stats import accumulate_moments, corpus_tokens, resolve_corpus
from mend.adapters import get_adapter
from mend.cli import quiet_libraries
from mend.models import load_model
from mend.moments import forward_batches

PER = 100_000  # seconds are reported per this many tokens


def timed(fn: Callable[..., object], *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--kind", default="mlp_out")
    ap.add_argument("--corpus", default="auto")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_speed.json"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    model, tok = load_model(args.model)
    adapter = get_adapter(model)
    ref = adapter.weight_ref(args.layer, args.kind)
    module = adapter.module(ref)
    spec = resolve_corpus(args.corpus)
    t0 = time.perf_counter()
    ids = corpus_tokens(spec, model, tok, args.tokens, args.seq_len, progress=False)
    corpus_s = time.perf_counter() - t0
    n_tok = ids.numel()

    def plain(chunk: torch.Tensor) -> None:
        forward_batches(model, chunk, module, batch_size=args.batch_size)

    def stats(chunk: torch.Tensor) -> None:
        accumulate_moments(model, chunk, [args.layer], kind=args.kind, batch_size=args.batch_size).means()

    warm = ids[: args.batch_size]  # first-call costs (allocations, kernel selection) out of the timings
    plain(warm)
    stats(warm)
    totals = {"plain": 0.0, "stats": 0.0}
    ratios = []
    for i, lo in enumerate(range(0, ids.shape[0], args.batch_size)):
        chunk = ids[lo:lo + args.batch_size]
        order = [("plain", plain), ("stats", stats)]
        took = {name: timed(fn, chunk) for name, fn in (order if i % 2 == 0 else order[::-1])}
        for name, t in took.items():
            totals[name] += t
        ratios.append(took["stats"] / took["plain"])
    per = {k: v * PER / n_tok for k, v in totals.items()}
    ratio = totals["stats"] / totals["plain"]
    median = statistics.median(ratios)

    d_in = adapter.get_weight(ref).shape[1]
    print(f"model {args.model}, layer {args.layer} {args.kind} (d_in {d_in}), corpus {spec.key}")
    print(f"{n_tok} tokens in {ids.shape[0]} chunks of {args.seq_len}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; the two passes alternate batch by batch")
    print(f"{'pass (stops after the module)':<34}{'seconds':>9}{'s / 100k tokens':>17}")
    print(f"{'plain forward':<34}{totals['plain']:>9.2f}{per['plain']:>17.2f}")
    print(f"{'statistics (k kᵀ, float64 sums)':<34}{totals['stats']:>9.2f}{per['stats']:>17.2f}")
    print(f"{'ratio statistics / plain':<34}{ratio:>9.3f}   target <= 1.3: {'yes' if ratio <= 1.3 else 'NO'}")
    print(f"{'median ratio of a batch':<34}{median:>9.3f}")
    print(f"reading + tokenizing the corpus (once, apart): {corpus_s:.2f} s")
    result = {
        "model": args.model, "layer": args.layer, "kind": args.kind, "d_in": d_in, "corpus": spec.key,
        "tokens": n_tok, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "seconds": totals, "s_per_100k_tokens": per, "ratio": ratio, "median_batch_ratio": median,
        "target_ratio": 1.3,
        "corpus_s": corpus_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
