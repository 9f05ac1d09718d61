"""Edits in one batch, N = 10, 100, 1,000 (10,000 where the time allows): learned (MALMEN, MEND summed) beside
closed-form (MEMIT, AlphaEdit) editors on the same held-out CounterFact records, as in MEMIT's scaling figure.

Each N runs ``python -m mend.evaluate mode=batch data.limit=N`` in-process (one model load) on
``counterfact/counterfact-edit.json`` (never trained or validated on). Closed-form editors optimise v* per
request (seconds per edit), so each editor has a largest N (``--max-n memit=100``). Prints a table, writes
``bench/results/scaling.json`` and draws ``bench/results/scaling.png``.

    python bench/scaling.py --malmen checkpoints/malmen-smollm2-135m-counterfact \\
        --mend checkpoints/mend-smollm2-135m-builtin --sizes 10,100,1000 --max-n memit=100,alphaedit=100
    python bench/scaling.py --sequential 100 --sizes 1000 --editors malmen,mend --malmen RUN --mend RUN
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mend.api import create_editor
from mend.config import build_config
from mend.evaluate import EvaluateCommand, evaluate_editors, load_eval_dataset
from mend.io import write_json
from mend.models import load_model
from mend.paths import under_data_root

METRICS = ("efficacy", "generalization", "locality", "neighborhood", "edit_success", "drawdown_ppl", "seconds_per_edit",
           "rejected_edits")
DATA = "counterfact/counterfact-edit.json"


def parse_max(spec: str) -> dict[str, int]:
    out = {}
    for part in filter(None, spec.split(",")):
        name, n = part.split("=")
        out[name.strip()] = int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editors", default="malmen,mend,memit,alphaedit")
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--max-n", default="memit=100,alphaedit=100", help="largest N per editor (name=N,...)")
    ap.add_argument("--malmen", help="run directory of python -m mend.train configs/train/malmen.yaml")
    ap.add_argument("--mend", help="run directory of python -m mend.train (make train)")
    ap.add_argument("--sequential", type=int, default=0,
                    help="instead of one batch: edits of this many requests, one on top of the other")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DATA, help="CounterFact file; relative: under the data root ($MEND_DATA_DIR)")
    ap.add_argument("--out", default="bench/results/scaling")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.editors.split(",") if n]
    checkpoints = {"malmen": args.malmen, "mend": args.mend}
    for n in names:
        if n in checkpoints and not checkpoints[n]:
            raise SystemExit(f"--{n} RUN_DIR is needed for editor {n} (or leave it out of --editors)")
    sizes = [int(s) for s in args.sizes.split(",")]
    max_n = parse_max(args.max_n)
    out = Path(args.out)
    model, tok = load_model(args.model)
    mode = ["mode=sequential", f"batch_size={args.sequential}", "curve_every=1000000"] if args.sequential else ["mode=batch"]
    rows: list[dict] = []
    for n in sizes:
        cfg = build_config(EvaluateCommand, [f"model={args.model}", "data=counterfact",
                                             f"data.path={under_data_root(args.data)}",
                                             f"data.limit={n}", *mode, f"out={out}/n{n}", "progress=true"],
                           text_keys=("out", "data.path"))
        ds = load_eval_dataset(cfg)
        run = [e for e in names if n <= max_n.get(e, n)]
        editors = [(e, create_editor(e, model, **({"checkpoint": checkpoints[e]} if e in checkpoints else {})))
                   for e in run]
        t0 = time.perf_counter()
        res = evaluate_editors(cfg, model, tok, editors, ds)
        for label in ["unedited", *run]:
            m = res["pre"] if label == "unedited" else res["editors"][label]["metrics"]
            rows.append({"n": len(ds.requests), "editor": label, **{k: m.get(k) for k in METRICS}})
            print(_line(rows[-1]), flush=True)
        print(f"N={n}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json(out.with_suffix(".json"), {"model": args.model, "data": args.data, "sequential": args.sequential,
                                              "rows": rows})
    _table(rows)
    _plot(rows, out.with_suffix(".png"), args.sequential)
    print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.png')}")


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _line(r: dict) -> str:
    return f"N={r['n']:>5} {r['editor']:<10} " + " ".join(f"{k} {_fmt(r[k])}" for k in METRICS)


def _table(rows: list[dict]) -> None:
    print("| N | editor | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for r in rows:
        print(f"| {r['n']} | {r['editor']} | " + " | ".join(_fmt(r[k]) for k in METRICS) + " |")


def _plot(rows: list[dict], path: Path, sequential: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("efficacy", "generalization", "locality", "seconds_per_edit")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    colors = {e: f"C{i}" for i, e in enumerate(dict.fromkeys(r["editor"] for r in rows))}  # one per editor
    for ax, k in zip(axes, panels):
        for e, color in colors.items():
            pts = [(r["n"], r[k]) for r in rows if r["editor"] == e and r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=e, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("edits" + (f" (sequential, {sequential} per batch)" if sequential else " in one batch"))
        ax.set_title(k)
        if k == "seconds_per_edit":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
