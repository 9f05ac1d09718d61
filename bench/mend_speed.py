"""Seconds per MEND edit beside one forward+backward of the model on the same edit prompt (target ratio ≤ 1.5).

A MEND edit is one forward pass, a backward pass down to the first edited layer, the hypernetwork on the
factors and one (d_out × N)(N × d_in) product per weight, so it should cost about one forward+backward. The
latency does not depend on what the editor learned: without --checkpoint an untrained editor of the default
architecture (configs/train/default.yaml) is timed. Prints a table and writes bench/results/mend_speed.json.

    python bench/mend_speed.py --n 20
    python bench/mend_speed.py --checkpoint checkpoints/mend-smollm2-135m-builtin
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from timing import fwd_bwd_seconds  # bench/timing.py (scripts run as python bench/NAME.py)

from mend.adapters import get_adapter
from mend.data.registry import load_dataset
from mend.data.text import statistics_tokens
from mend.learned.hypernet import HypernetConfig
from mend.learned.mend.editor import MendConfig, MendEditor, untrained_editor
from mend.models import load_model
from mend.paths import config_dir

PRECONDITION_TOKENS = 2048


def default_untrained_editor(model, tok, warm_requests) -> MendEditor:
    """The default architecture at initialisation, its input statistics filled from a few edits (P, when
    the config preconditions, from a little text)."""
    cfg = OmegaConf.load(config_dir() / "train" / "default.yaml")
    refs = get_adapter(model).weight_refs(list(cfg.edit.kinds), list(cfg.edit.layers))
    hcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HypernetConfig), cfg.hypernet))
    # as mend.train fits P, from fewer tokens (P's values do not change the cost)
    text = statistics_tokens(model, tok, PRECONDITION_TOKENS) if hcfg.precondition else None
    return untrained_editor(model, tok, refs, hcfg, warm_requests, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=None, help="a run directory of python -m mend.train")
    ap.add_argument("--n", type=int, default=20, help="edits to time (built-in test facts)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mend_speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    reqs = load_dataset("builtin", split="test", limit=args.n + 8).requests
    editor = (MendEditor(MendConfig(checkpoint=args.checkpoint)) if args.checkpoint
              else default_untrained_editor(model, tok, reqs[args.n:]))
    editor.prepare(model, tok)
    editor.edit(model, tok, reqs[:1])  # first call: allocations, lazy initialisation
    rows = []
    for r in reqs[: args.n]:
        t0 = time.perf_counter()
        editor.edit(model, tok, [r])
        edit_s = time.perf_counter() - t0
        fb = fwd_bwd_seconds(model, tok, [r.text], [r.target_new])
        rows.append({"edit_s": edit_s, "fwd_bwd_s": fb, "ratio": edit_s / fb})
    med = {k: statistics.median(r[k] for r in rows) for k in ("edit_s", "fwd_bwd_s", "ratio")}
    weights = ", ".join(w.label for w in editor.info.weights)
    print(f"MEND on {args.model} ({weights}; {'trained: ' + args.checkpoint if args.checkpoint else 'untrained'}), "
          f"{len(rows)} single edits, {torch.get_num_threads()} threads")
    print(f"{'':>8}{'edit (s)':>10}{'fwd+bwd (s)':>13}{'ratio':>8}")
    for q in ("min", "median", "max"):
        f = {"min": min, "median": statistics.median, "max": max}[q]
        print(f"{q:>8}{f(r['edit_s'] for r in rows):>10.3f}{f(r['fwd_bwd_s'] for r in rows):>13.3f}"
              f"{f(r['ratio'] for r in rows):>8.2f}")
    print(f"median ratio {med['ratio']:.2f} (target <= 1.5)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "checkpoint": args.checkpoint, "rows": rows,
                                          "median": med}, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
