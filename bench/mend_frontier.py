"""The edit-success / locality frontier of MEND's untrained editor (one gradient step), plain and preconditioned.

At initialisation MEND's editor is one gradient step ``ΔW = −α ∇W`` (``hypernet.precondition=true``:
``−α ∇W P``, ``P = (C/τ + λI)⁻¹``). Training moves along and beyond this frontier, but where it starts says how
local an edit of that form can be: for each step size the edit success (whole target the argmax on the edit
prompt and its paraphrase) and locality agreement (argmax tokens on the locality prompt's answer unchanged) of
N flat CounterFact records, each edited alone; every weight's ΔW is scaled to ``s·‖W‖`` so that both forms are
swept over the same sizes. Prints a table and writes bench/results/mend_frontier.json.

    python bench/mend_frontier.py --n 48                       # plain and preconditioned, the default weights
    python bench/mend_frontier.py --n 48 --kinds mlp_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mend.adapters import get_adapter
from mend.data.registry import load_dataset
from mend.data.text import statistics_tokens
from mend.evaluation.metrics import harmonic_mean
from mend.learned.factors import edit_factors, edited_target_logits, target_tokens
from mend.learned.hypernet import Preconditioner
from mend.models import load_model
from mend.moments import input_moments
from mend.paths import data_dir
from mend.scoring import forward_target_logits, make_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=48, help="counterfact-val records")
    ap.add_argument("--layers", default="-3,-2,-1")
    ap.add_argument("--kinds", default="mlp_gate,mlp_up,mlp_out")
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--tokens", type=int, default=50_000, help="text tokens for C")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    adapter = get_adapter(model)
    refs = adapter.weight_refs(args.kinds.split(","), [int(x) for x in args.layers.split(",")])
    ids = statistics_tokens(model, tok, args.tokens)  # the text mend.train's preconditioner uses
    P = {}
    for label, C in input_moments(model, ids, refs, progress=True).items():
        p = Preconditioner(C.shape[0])
        p.fit(C, args.ridge)
        P[label] = p.P
    requests = load_dataset("counterfact", str(data_dir() / "counterfact/counterfact-val.json"), args.n).requests
    sizes = [1e-4 * 2 ** (i / 2) for i in range(20)]
    sums = {form: [[0.0, 0.0] for _ in sizes] for form in ("plain", "preconditioned")}
    for r in requests:
        factors, _ = edit_factors(model, adapter, refs, make_batch(tok, [r.text], [r.target_new], model), 1)
        (lp, lt), = r.neighborhood[:1]
        tb = make_batch(tok, [r.text, r.paraphrases[0], lp], [r.target_new, r.target_new, lt], model)
        rows, ids_ = target_tokens(tb)
        with torch.no_grad():
            pre = forward_target_logits(model, tb, packed=True).argmax(-1)
            for form in sums:
                unit = {}
                for ref in refs:
                    u, d = factors[ref.label]
                    g = d.T @ (u @ P[ref.label] if form == "preconditioned" else u)
                    unit[ref] = g / g.norm() * adapter.get_weight(ref).norm()  # (d_out, d_in), as MEND's ΔW
                for acc, s in zip(sums[form], sizes):
                    post = edited_target_logits(model, adapter, tb, {ref: -s * g for ref, g in unit.items()}).argmax(-1)
                    hit = post == ids_
                    acc[0] += sum(bool(hit[rows == i].all()) for i in (0, 1)) / 2
                    acc[1] += (post == pre)[rows == 2].float().mean().item()
    out = {"model": args.model, "n": len(requests), "kinds": args.kinds, "layers": args.layers, "ridge": args.ridge,
           "forms": {}}
    print(f"{'s = ‖ΔW‖/‖W‖':>14} | " + " | ".join(f"{f:>22}" for f in sums))
    for i, s in enumerate(sizes):
        cells = []
        for form, accs in sums.items():
            es, loc = (x / len(requests) for x in accs[i])
            out["forms"].setdefault(form, []).append({"s": s, "edit_success": es, "locality": loc})
            cells.append(f"ES {es:.3f}  loc {loc:.3f}")
        print(f"{s:>14.5f} | " + " | ".join(f"{c:>22}" for c in cells))
    for form, pts in out["forms"].items():
        best = max(harmonic_mean([p["edit_success"], p["locality"]]) for p in pts)
        out.setdefault("best_harmonic_mean", {})[form] = round(best, 3)
    print("best harmonic mean of edit success and locality:", out["best_harmonic_mean"])
    path = Path(__file__).parent / "results" / "mend_frontier.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
