"""Each editor's defaults beside its ``reference`` preset (the reference code's settings, configs/preset/), on the
same records, in one process (one model load, same machine state): efficacy, generalization, locality,
drawdown_ppl and seconds per edit, and the defaults' speed-up over the reference.

Tune on one part of the data and look at the other once: ``--data counterfact/counterfact-val.json`` is the
tuning part, ``counterfact/counterfact-edit.json`` (never trained, validated or tuned on) the untouched one.

    python bench/presets.py --editors rome,r-rome --limit 50 --mode single
    python bench/presets.py --editors memit,alphaedit --limit 100 --mode batch
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mend.api import create_editor
from mend.config import build_config
from mend.evaluate import EvaluateCommand, evaluate_editors, load_eval_dataset
from mend.io import write_json
from mend.models import load_model
from mend.paths import under_data_root

METRICS = ("efficacy", "generalization", "locality", "neighborhood", "edit_success", "drawdown_ppl", "seconds_per_edit",
           "rejected_edits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editors", default="rome,r-rome")
    ap.add_argument("--preset", default="reference")
    ap.add_argument("--data", default="counterfact/counterfact-val.json",
                    help="CounterFact file; relative: under the data root ($MEND_DATA_DIR)")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--mode", default="single", choices=("single", "batch", "sequential"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="bench/results/presets")
    args = ap.parse_args()
    out = Path(args.out)
    model, tok = load_model(args.model)
    cfg = build_config(EvaluateCommand, [f"model={args.model}", "data=counterfact",
                                         f"data.path={under_data_root(args.data)}", f"data.limit={args.limit}",
                                         f"mode={args.mode}", f"out={out}", "progress=true"],
                       text_keys=("out", "data.path"))
    ds = load_eval_dataset(cfg)
    editors = []
    for name in filter(None, args.editors.split(",")):
        editors += [(name, create_editor(name, model)),
                    (f"{name}:{args.preset}", create_editor(name, model, preset=args.preset))]
    t0 = time.perf_counter()
    res = evaluate_editors(cfg, model, tok, editors, ds)
    rows = [{"editor": "unedited", **{k: res["pre"].get(k) for k in METRICS}}]
    rows += [{"editor": label, **{k: res["editors"][label]["metrics"].get(k) for k in METRICS}} for label, _ in editors]
    print(f"{len(ds.requests)} records of {args.data}, mode={args.mode}: {time.perf_counter() - t0:.0f} s")
    print("| editor | " + " | ".join(METRICS) + " | speed-up |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for r in rows:
        base = next((x for x in rows if x["editor"] == f"{r['editor']}:{args.preset}"), None)
        speed = (f"{base['seconds_per_edit'] / r['seconds_per_edit']:.1f}×"
                 if base and base.get("seconds_per_edit") and r.get("seconds_per_edit") else "")
        print(f"| {r['editor']} | " + " | ".join(_fmt(r[k]) for k in METRICS) + f" | {speed} |")
    write_json(out.with_suffix(".json"), {"model": args.model, "data": args.data, "limit": args.limit,
                                          "mode": args.mode, "preset": args.preset, "rows": rows})
    print(f"written: {out.with_suffix('.json')}")


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
