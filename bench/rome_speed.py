"""Seconds per ROME edit beside one forward+backward of the model on the same prompt batch (target ratio ≤ 8),
and MEMIT's batch time beside the sum of its v* optimisation times. Statistics are computed (and cached) first and
not timed. Prints a table and writes bench/results/rome_speed.json.

    python bench/rome_speed.py --n 5 --batch 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import fwd_bwd_seconds  # bench/timing.py (scripts run as python bench/NAME.py)

from locate_edit.keys import context_templates, fill
from mend.api import create_editor
from mend.data.registry import load_dataset
from mend.models import load_model


def rome_fwd_bwd_seconds(model, tok, req, templates, kl_prompt: str) -> float:
    """One forward+backward of the whole model on the rows ROME optimises over (templates + the KL prompt)."""
    prompts = [fill(t, req)[0] for t in templates] + [kl_prompt.replace("{}", req.subject)]
    return fwd_bwd_seconds(model, tok, prompts, [req.target_new] * len(prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=5, help="ROME edits to time")
    ap.add_argument("--batch", type=int, default=10, help="MEMIT batch size (0: skip)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rome_speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    reqs = load_dataset("counterfact", limit=max(args.n, args.batch)).requests
    rome = create_editor("rome", model)
    rome.edit(model, tok, reqs[:1])  # statistics and templates: computed once, cached
    templates = context_templates(model, tok, rome.config.templates.spec, rome.config.templates.seed)
    rows = []
    for r in reqs[: args.n]:
        t0 = time.perf_counter()
        res = rome.edit(model, tok, [r])
        edit_s = time.perf_counter() - t0
        fb = rome_fwd_bwd_seconds(model, tok, r, templates, rome.config.value.kl_prompt)
        rows.append({"edit_s": edit_s, "fwd_bwd_s": fb, "ratio": edit_s / fb, "v_steps": res.diagnostics["steps"][0]})
    print(f"ROME on {args.model}, layer {rome.config.layer}, {len(templates)} templates")
    print(f"{'edit':>5}{'edit (s)':>10}{'fwd+bwd (s)':>13}{'ratio':>8}{'v* steps':>10}")
    for i, r in enumerate(rows):
        print(f"{i:>5}{r['edit_s']:>10.2f}{r['fwd_bwd_s']:>13.3f}{r['ratio']:>8.1f}{r['v_steps']:>10}")
    med = {k: statistics.median(r[k] for r in rows) for k in ("edit_s", "fwd_bwd_s", "ratio")}
    print(f"{'median':>5}{med['edit_s']:>10.2f}{med['fwd_bwd_s']:>13.3f}{med['ratio']:>8.1f}   (target ratio <= 8)")
    out = {"model": args.model, "rome": rows, "rome_median": med}
    if args.batch:
        memit = create_editor("memit", model)
        memit.edit(model, tok, reqs[:1])
        t0 = time.perf_counter()
        res = memit.edit(model, tok, reqs[: args.batch])
        total = time.perf_counter() - t0
        v = res.diagnostics["v_seconds"]
        print(f"MEMIT batch of {args.batch}: {total:.1f} s in all, of which v* {v:.1f} s ({v / total:.0%}); "
              f"per edit {total / args.batch:.2f} s")
        out["memit"] = {"batch": args.batch, "total_s": total, "v_seconds": v}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
