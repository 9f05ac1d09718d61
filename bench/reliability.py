"""python bench/reliability.py: the project's reliability promises, measured on tiny models.

- fuzzing (bench/reliability_fuzz.py): generated requests, overrides, data files, run directories and statistics
  files through the commands' entry points; every case must end in success or the one-line error;
- exact undo: 1,000 sequential edits through the evaluator's sequential path, mixing ft, rome, memit and an
  untrained mend editor, then restore: parameters not bit-identical to the originals; the same when an editor
  raises halfway;
- kill -9 (bench/reliability_kill.py): partial files at final paths after kills during a model save, a
  statistics cache write and training checkpoints; reruns; resumed training against an uninterrupted run;
- untrusted files: no pickle in the code; an editor and a statistics file made for another model are refused
  with a one-line error naming both fingerprints.

Prints a table and writes bench/results/reliability.json. ``--quick`` runs a few of each (a smoke run).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
FUZZ_COUNTS = {"requests": 2500, "overrides": 3500, "data": 2000, "run_dirs": 1000, "stats": 1000}

from reliability_fuzz import MODEL, Workspace, fuzz, make_workspace, run_captured  # noqa: E402


# --- exact undo ------------------------------------------------------------------------------------------------
class Halfway(RuntimeError):
    """The failure the undo test injects."""


def mixed_editor(model: Any, tok: Any, fail_at: int | None = None) -> Any:
    """One Editor that hands each call to the next of ft, rome, memit and an untrained mend editor in turn."""
    from mend_speed import default_untrained_editor

    from mend.editor import Editor, create_editor
    from mend.requests import make_request

    fast = {"stats": {"corpus": "self", "tokens": 1024, "seq_len": 32}, "templates": {"spec": [[4, 2]]},
            "value": {"steps": 4}}
    warm = [make_request("{} is in", "The tower", " Rome"), make_request("{} plays", "Bob", " piano")]
    editors = [create_editor("ft", {"layers": [1], "steps": 2}), create_editor("rome", fast, {"layer": 1}),
               create_editor("memit", fast, {"layers": [1, 2]}), default_untrained_editor(model, tok, warm)]

    class Mixed(Editor):
        name = "mixed"
        Config = dict

        def __init__(self) -> None:
            super().__init__({})
            self.calls = 0

        def prepare(self, model: Any, tok: Any) -> None:
            for e in editors:
                e.prepare(model, tok)

        def reset(self) -> None:
            for e in editors:
                e.reset()

        def edit(self, model: Any, tok: Any, requests: list) -> Any:
            self.calls += 1
            if fail_at is not None and self.calls == fail_at:
                raise Halfway(f"editor raised at edit {self.calls}")
            return editors[self.calls % len(editors)].edit(model, tok, requests)

    return Mixed()


def undo_test(n_edits: int, fail_at: int | None = None) -> dict[str, Any]:
    """Sequential edits through the evaluator, then its restore: parameters that differ from the originals."""
    from mend.evaluation.evaluator import EvalSettings, Evaluator
    from mend.models import load_model
    from mend.requests import make_request

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    reqs = [make_request("{} is located in", f"Place {i}", f" City {i % 7}", " Paris") for i in range(n_edits)]
    ev = Evaluator(model, tok, reqs, "counterfact", None, EvalSettings(mode="sequential", curve_every=n_edits),
                   progress=False)
    editor = mixed_editor(model, tok, fail_at)
    t0, raised = time.perf_counter(), None
    try:
        ev.run(editor)
    except Halfway as e:
        raised = str(e)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), originals[n])]
    return {"edits": editor.calls - (raised is not None), "mismatched": len(changed), "raised": raised,
            "seconds": round(time.perf_counter() - t0, 1)}


# --- untrusted files -------------------------------------------------------------------------------------------
UNSAFE = re.compile(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)|pickle\.loads?\(|"
                    r"torch\.load\((?![^)]*weights_only=True)", re.M)


def pickle_uses() -> list[str]:
    """Lines of the project's Python code that can unpickle (pickle imports, torch.load without weights_only)."""
    out = []
    for folder in ("mend", "locate_edit", "bench", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for m in UNSAFE.finditer(text):
                out.append(f"{path.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}")
    return out


def foreign_refusals(ws: Workspace) -> dict[str, Any]:
    """An editor trained for tiny-gpt2 and a tiny-gpt2 statistics file, both offered to tiny-llama."""
    import shutil

    import locate_edit.stats
    import mend.edit

    def stderr_of(module: Any, argv: list[str]) -> tuple[int, str]:
        code, err = run_captured(module, argv)
        return code, err.strip()

    from mend.models import fingerprint, load_model

    fp = {name: fingerprint(load_model(name)[0]) for name in ("tiny-llama", "tiny-gpt2")}
    editor = stderr_of(mend.edit, [MODEL, "editor=mend", f"editor.checkpoint={ws.foreign_run}", "prompt={} is in",
                                   "subject=Paris", "target= Rome"])
    pristine = ws.stats_file.read_bytes()
    shutil.copyfile(ws.foreign_stats, ws.stats_file)
    stats = stderr_of(locate_edit.stats, [MODEL, "layers=[1]", "tokens=2000", "progress=false"])
    ws.stats_file.write_bytes(pristine)

    def refused(code_err: tuple[int, str]) -> bool:
        code, err = code_err
        return code == 2 and len(err.splitlines()) == 1 and all(f in err for f in fp.values())

    return {"editor": editor[1], "statistics": stats[1], "refused": refused(editor) and refused(stats)}


# --- report ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few cases of each part (smoke run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MEND_LOG_LEVEL", "ERROR")
    from mend.cli import quiet_libraries

    quiet_libraries()
    scale = 0.01 if args.quick else 1.0
    counts = {k: max(5, int(v * scale)) for k, v in FUZZ_COUNTS.items()}
    n_edits, kills = (40, 2) if args.quick else (1000, 20)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        tally = fuzz(counts, root)
        fuzz_s = time.perf_counter() - t0
        print(f"fuzzing: {tally.cases} cases, {len(tally.failures)} unhandled ({fuzz_s:.0f} s)", flush=True)
        undo = undo_test(n_edits)
        undo_fail = undo_test(n_edits, fail_at=n_edits // 2)
        print(f"undo: {undo}; raising halfway: {undo_fail}", flush=True)
        from reliability_kill import kill_test

        t0 = time.perf_counter()
        kill = kill_test(root / "kills", kills)
        kill_s = time.perf_counter() - t0
        print(f"kill -9: {kill.kills} kills, {kill.partial_files} partial files ({kill_s:.0f} s)", flush=True)
        os.environ["MEND_CACHE_DIR"] = str(root / "untrusted-cache")
        foreign = foreign_refusals(make_workspace(root / "untrusted"))
    pickles = pickle_uses()

    result = {
        "fuzz_cases": tally.cases, "fuzz_unhandled": len(tally.failures),
        "undo_edits": undo["edits"], "undo_mismatched_params": undo["mismatched"] + undo_fail["mismatched"],
        "kills": kill.kills, "partial_files": kill.partial_files,
        "resume_max_abs_diff": kill.resume_max_abs_diff, "foreign_files_refused": foreign["refused"],
        "details": {
            "fuzz_by_family": {k: {"cases": c, "unhandled": u, "ran_to_the_end": ok}
                               for k, (c, u, ok) in sorted(tally.by_family.items())},
            "fuzz_failures": tally.failures[:50], "fuzz_seconds": round(fuzz_s, 1),
            "undo": undo, "undo_raising_halfway": undo_fail,
            "kill_reruns_failed": kill.rerun_failures, "kill_leftover_temporaries": kill.leftovers,
            "kill_problems": kill.problems[:50], "kill_seconds": round(kill_s, 1),
            "foreign_messages": {"editor": foreign["editor"], "statistics": foreign["statistics"]},
            "pickle_uses": pickles, "torch": torch.__version__, "quick": args.quick,
        },
    }
    from mend.io import write_json

    write_json(args.out, result)
    rows = [("fuzz cases: unhandled, ran to the end", f"{tally.cases}: {len(tally.failures)}, "
             f"{sum(r[2] for r in tally.by_family.values())}"),
            *((f"  {k}", f"{c}: {u}, {ok}") for k, (c, u, ok) in sorted(tally.by_family.items())),
            ("undo: edits, params differing", f"{undo['edits']}, {undo['mismatched']}"),
            ("undo when an editor raises at edit "
             f"{n_edits // 2}: params differing", str(undo_fail["mismatched"])),
            ("kill -9: kills, partial files", f"{kill.kills}, {kill.partial_files}"),
            ("kill -9: reruns that failed", str(kill.rerun_failures)),
            ("resumed vs uninterrupted training, max |diff|", f"{kill.resume_max_abs_diff:.3g}"),
            ("foreign editor / statistics refused", str(foreign["refused"])),
            ("pickle uses in the code", str(len(pickles)))]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  result\n{'-' * width}  ------")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
