"""kill -9 at random moments: during ``mend.edit save=DIR``, the statistics cache write and a training checkpoint.

Each run is a real subprocess of the command. Its safetensors writes are slowed down (written in chunks, a pause
between them: ``python bench/reliability_kill.py child MODULE ARGS...``), so that a kill lands inside a write
often, not only between them; the project's own code is unchanged. After each kill, every file at a *final*
path (the saved model, the cached statistics, the run directory's editor, resume state and metrics) must read
back whole; then the same command, run again without a kill, must work (using or rebuilding what it finds), and a
killed training run, resumed, must end with the same editor as a run that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNKS, PAUSE_S = 16, 0.02  # a slowed safetensors write takes >= 0.3 s
EVENTS_ENV = "RELIABILITY_EVENTS"


# --- the child: a command with slow safetensors writes ------------------------------------------------------
def _slow_writes() -> None:
    import safetensors.torch as st

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        data = st.save(tensors, metadata=metadata)
        events = os.environ.get(EVENTS_ENV)
        if events:
            with open(events, "a") as f:
                f.write(f"{time.time()}\n")
        step = max(1, len(data) // CHUNKS)
        with open(filename, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(PAUSE_S)

    st.save_file = save_file


def child(module: str, argv: list[str]) -> None:
    _slow_writes()  # before the project (and transformers) import save_file
    import importlib

    from mend.cli import run

    mod = importlib.import_module(module)
    run(mod.main, mod.USAGE, argv)


# --- the parent ------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    module: str
    argv: list[str]
    final_files: Any  # (workdir) -> list of final paths to check
    rerun_ok: Any  # (workdir, stdout) -> problem or None


@dataclass
class KillReport:
    kills: int = 0
    partial_files: int = 0
    rerun_failures: int = 0
    leftovers: int = 0  # temporary files left beside final paths (not final paths themselves)
    problems: list[str] = field(default_factory=list)
    resume_max_abs_diff: float | None = None


def _env(work: Path, events: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, MEND_CACHE_DIR=str(work / "cache"), MEND_LOG_LEVEL="ERROR", OMP_NUM_THREADS="1")
    if events is not None:
        env[EVENTS_ENV] = str(events)
    return env


def _command(s: Scenario, work: Path) -> list[str]:
    argv = [a.replace("{work}", str(work)) for a in s.argv]
    return [sys.executable, str(Path(__file__).resolve()), "child", s.module, *argv]


def _run(s: Scenario, work: Path, kill_after: float | None, events: Path | None = None) -> tuple[int, str, str]:
    proc = subprocess.Popen(_command(s, work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(work, events), start_new_session=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def readable(path: Path) -> str | None:
    """None when the file at a final path reads back whole, else what is wrong with it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            path.read_bytes()
    except Exception as e:  # noqa: BLE001  (any failure to read back is a partial file)
        return f"{path}: {type(e).__name__}: {str(e)[:200]}"
    return None


def _timeline(s: Scenario, work: Path) -> tuple[float, float]:
    """Seconds from start to the first safetensors write, and to the end, of an uninterrupted run."""
    events = work / "events.txt"
    t0 = time.time()
    code, _, err = _run(s, work, None, events)
    if code != 0:
        raise RuntimeError(f"{s.name}: the uninterrupted run failed: {err[-1000:]}")
    end = time.time() - t0
    first = min(float(x) for x in events.read_text().split()) - t0
    return first, end


def kill_runs(s: Scenario, root: Path, kills: int, rng: random.Random, report: KillReport) -> None:
    first, end = _timeline(s, root / f"{s.name}-calibration")
    for k in range(kills):
        work = root / f"{s.name}-{k}"
        # from a little before the first write to the end: most kills land in or between writes
        _run(s, work, rng.uniform(max(0.0, first - 0.5), end))
        report.kills += 1
        for path in s.final_files(work):
            problem = readable(path)
            if problem:
                report.partial_files += 1
                report.problems.append(f"{s.name} kill {k}: partial {problem}")
        report.leftovers += sum(1 for p in work.rglob(".*") if p.name.endswith((".tmp",)) or ".old." in p.name)
        code, out, err = _run(s, work, None)
        problem = s.rerun_ok(work, out) if code == 0 else f"exit {code}: {err.strip().splitlines()[-1:]}"
        if problem:
            report.rerun_failures += 1
            report.problems.append(f"{s.name} kill {k}: rerun {problem}")


# --- the three scenarios ---------------------------------------------------------------------------------------
EDIT = ["model=tiny-llama", "editor=ft", "editor.steps=2", "prompt={} is located in", "subject=The tower",
        "target= Rome", "max_new_tokens=1", "save={work}/edited"]
STATS = ["model=tiny-llama", "layers=[0,1,2,3]", "tokens=2048", "seq_len=64", "progress=false", "corpus=self"]
TRAIN = ["model=tiny-llama", "trainer.max_steps=6", "trainer.save_every_n_steps=1", "trainer.val_check_interval=3",
         "optim.schedule_steps=6", "eval.enabled=false", "trainer.progress=false", "trainer.batch_size=2",
         "data.val_limit=2", "data.variants=1", "norm_warmup=2", "hypernet.rank=8", "trainer.threads=1",
         "out={work}/run"]


def _files(*patterns: str):
    def find(work: Path) -> list[Path]:
        return [p for pat in patterns for p in work.glob(pat) if p.is_file() and not p.name.startswith(".")]

    return find


def _edit_rerun_ok(work: Path, out: str) -> str | None:
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(work / "edited")
    except Exception as e:  # noqa: BLE001
        return f"saved model does not load: {e}"
    return None


def _stats_rerun_ok(work: Path, out: str) -> str | None:
    rows = [ln for ln in out.splitlines() if " read " in ln or " written " in ln]
    return None if len(rows) == 4 else f"expected 4 statistics read or written, got: {out[-500:]}"


def scenarios() -> list[Scenario]:
    return [
        Scenario("edit-save", "mend.edit", EDIT, _files("edited/*"), _edit_rerun_ok),
        Scenario("stats-cache", "locate_edit.stats", STATS, _files("cache/**/*.safetensors", "cache/**/*.json"),
                 _stats_rerun_ok),
        Scenario("train-checkpoint", "mend.train", TRAIN,
                 _files("run/*.safetensors", "run/*.yaml", "run/*.json", "run/last/*", "run/best/*"),
                 lambda work, out: None),
    ]


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def kill_test(root: Path, kills_each: int = 20, seed: int = 0) -> KillReport:
    rng = random.Random(seed)
    report = KillReport()
    for s in scenarios():
        kill_runs(s, root, kills_each, rng, report)
    # each killed training run, resumed by its rerun, against the calibration run that was never killed
    straight = root / "train-checkpoint-calibration" / "run" / "editor.safetensors"
    report.resume_max_abs_diff = max(max_abs_diff(root / f"train-checkpoint-{k}" / "run" / "editor.safetensors",
                                                  straight) for k in range(kills_each))
    return report


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    child(sys.argv[2], sys.argv[3:])
