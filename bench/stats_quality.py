"""How ROME's edit quality depends on the number of tokens behind its statistics C = E[k kᵀ].

For each token count, C is computed (and cached) over the same corpus, then:
- the update direction C⁻¹k* of each request is compared with the one from the largest count (cosine), and
- ROME is run through the evaluator on ``--records`` CounterFact records (single mode): efficacy,
  generalization, locality beside the unedited model's.
Prints one table and writes bench/results/stats_quality.json. The default token count of the editors
(``stats.tokens``, ``locate_edit.common.StatsSettings``) is the smallest whose scores match the largest count's.

    python bench/stats_quality.py --tokens 10000 30000 100000 280000 --records 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from locate_edit.keys import context_templates, request_keys
from locate_edit.stats import second_moments
from mend.adapters import get_adapter
from mend.cli import quiet_libraries
from mend.config import editor_layers
from mend.data.registry import load_dataset
from mend.editor import create_editor
from mend.evaluation.evaluator import EvalSettings, Evaluator
from mend.models import load_model

METRICS = ("efficacy", "generalization", "locality")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000, 30_000, 100_000, 280_000])
    ap.add_argument("--records", type=int, default=20, help="CounterFact records edited per token count (0: skip)")
    ap.add_argument("--corpus", default="auto")
    ap.add_argument("--layer", type=int, default=None, help="ROME's layer (default: the model's config)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stats_quality.json"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    quiet_libraries()
    model, tok = load_model(args.model)
    adapter = get_adapter(model)
    base = editor_layers("rome", args.model, model.config.model_type,
                         {} if args.layer is None else {"layer": args.layer})
    reqs = load_dataset("counterfact", limit=max(args.records, 20)).requests
    probe = create_editor("rome", *base)
    ref = adapter.weight_ref(probe.config.layer, probe.config.kind)
    templates = context_templates(model, tok, probe.config.templates.spec, probe.config.templates.seed)
    keys = request_keys(model, tok, adapter, ref, reqs[:20], templates)[0].double()  # (20, d_in)
    counts = sorted(args.tokens)
    t0 = {}
    Cs = {}
    for n in counts:
        start = time.perf_counter()
        Cs[n] = second_moments(model, tok, [ref.layer], corpus=args.corpus, n_tokens=n, kind=ref.kind)[ref.layer]
        t0[n] = time.perf_counter() - start
    ref_dirs = torch.linalg.solve(Cs[counts[-1]], keys.T)  # (d_in, 20)
    ev = None
    if args.records:
        ev = Evaluator(model, tok, reqs[: args.records], "counterfact", None, EvalSettings(mode="single"), progress=False)
        pre = ev.pre().metrics
    rows = []
    for n in counts:
        dirs = torch.linalg.solve(Cs[n], keys.T)
        cos = torch.nn.functional.cosine_similarity(dirs, ref_dirs, dim=0)
        row = {"tokens": n, "stats_seconds": t0[n], "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        if ev is not None:
            editor = create_editor("rome", *base, {"stats": {"tokens": n, "corpus": args.corpus}})
            editor.prepare(model, tok)
            m = ev.run(editor).metrics
            row.update({k: m[k] for k in METRICS})
        rows.append(row)
    head = f"{'tokens':>8}{'cos C⁻¹k':>10}{'min':>7}" + "".join(f"{k[:12]:>14}" for k in METRICS if ev)
    print(f"ROME on {args.model}, layer {ref.layer}; direction cosine against {counts[-1]} tokens")
    print(head)
    for r in rows:
        line = f"{r['tokens']:>8}{r['cos_mean']:>10.3f}{r['cos_min']:>7.3f}"
        line += "".join(f"{r[k]:>14.3f}" for k in METRICS if k in r)
        print(line)
    if ev is not None:
        print(f"{'unedited':>8}{'':>17}" + "".join(f"{pre[k]:>14.3f}" for k in METRICS))
    out = {"model": args.model, "layer": ref.layer, "records": args.records, "rows": rows,
           "pre": {k: pre[k] for k in METRICS} if ev is not None else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
