"""Time loading the default model: the first load (GGUF conversion when the cache is empty) and a second load.

Each load runs in a fresh Python process, so nothing is cached in memory; imports are timed separately.
Prints a table and writes bench/results/load_time.json.

    python bench/load_time.py                # a fresh temporary cache: first load converts, second reads it
    python bench/load_time.py --user-cache   # the user's cache as it is
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, time
t0 = time.perf_counter()
from mend.models import load_model
from mend.cli import quiet_libraries
quiet_libraries()
t1 = time.perf_counter()
model, tok = load_model({model!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""


def timed_load(model: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(model=model)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--user-cache", action="store_true", help="use the user's cache instead of a fresh one")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_time.json"))
    args = ap.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.user_cache:
            env["MEND_CACHE_DIR"] = tmp
        first = timed_load(args.model, env)
        second = timed_load(args.model, env)
    print(f"model {args.model} ({'user cache' if args.user_cache else 'fresh cache'})")
    print(f"{'load':<8}{'load (s)':>10}{'imports (s)':>13}")
    print(f"{'first':<8}{first['load_s']:>10.2f}{first['import_s']:>13.2f}")
    print(f"{'second':<8}{second['load_s']:>10.2f}{second['import_s']:>13.2f}")
    print(f"second load under 2 s: {'yes' if second['load_s'] < 2 else 'NO'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "fresh_cache": not args.user_cache,
                                          "first": first, "second": second}, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
