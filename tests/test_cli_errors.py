"""Bad input to the commands: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mend.cli import run
from mend.edit import USAGE, main

GOOD = ["model=tiny-gpt2", "prompt={} is located in", "subject=The tower", "target= Rome"]


def _run_edit(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        run(main, USAGE, argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _replace(argv: list[str], key: str, value: str | None) -> list[str]:
    out = [a for a in argv if not a.startswith(f"{key}=")]
    return out if value is None else [*out, f"{key}={value}"]


@pytest.fixture
def unsupported_model_dir(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from mend.tiny import byte_tokenizer

    cfg = GPTNeoXConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    byte_tokenizer().save_pretrained(tmp_path / "neox")
    return tmp_path / "neox"


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("prompt", "The tower is located in", "placeholder"),  # no {} (the subject is in it)
        ("prompt", "Paris is located in", "does not occur"),  # no {}, subject absent
        ("prompt", "{} and {} are in", "exactly one"),
        ("subject", "", "subject is empty"),
        ("target", "", "target_new is empty"),
        ("model", "no-such-model", "unknown model"),
        ("editor", "no-such-editor", "unknown editor"),
        ("requests", "/no/such/file.json", "cannot read request file"),
        ("seed", "abc", "seed"),
        ("editor.bogus", "1", "bogus"),
        ("editor.layers", "[99]", "out of range"),
        ("nonsense_key", "1", "nonsense_key"),
    ],
)
def test_bad_input_is_one_line_exit_2(key, value, needle, capsys):
    argv = _replace(GOOD, key, value)
    if key == "requests":
        argv = [a for a in argv if not a.startswith(("prompt=", "subject=", "target="))] + [f"requests={value}"]
    code, _, err = _run_edit(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unsupported_architecture(unsupported_model_dir, capsys):
    code, _, err = _run_edit(_replace(GOOD, "model", str(unsupported_model_dir)), capsys)
    assert code == 2 and "unsupported architecture GPTNeoXForCausalLM" in err and "LlamaForCausalLM" in err


def test_bad_record_in_request_file(tmp_path, capsys):
    path = tmp_path / "reqs.json"
    path.write_text(json.dumps([{"prompt": "{} is in", "subject": "A", "target_new": " B"},
                                {"prompt": "{} is in", "subject": "A", "target_new": 3}]))
    code, _, err = _run_edit(["model=tiny-gpt2", f"requests={path}"], capsys)
    assert code == 2 and "record 1" in err and "target_new must be a string" in err


def test_help_exits_zero(capsys):
    code, out, _ = _run_edit(["--help"], capsys)
    assert code == 0 and "usage: python -m mend.edit" in out


def test_subprocess_error_has_no_traceback():
    """The real entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "mend.edit", "model=no-such-model", "prompt={} x",
                           "subject=a", "target=b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown model")


def test_edit_writes_json_and_saves(tmp_path, capsys):
    out_json, save = tmp_path / "out.json", tmp_path / "model"
    argv = [*GOOD, "editor.layers=[1]", "editor.norm_constraint=0.05", "editor.lr=0.05",
            f"json={out_json}", f"save={save}"]
    code, out, err = _run_edit(argv, capsys)
    assert code == 0, err
    rep = json.loads(out_json.read_text())
    (r,) = rep["requests"]
    assert rep["model"] == "tiny-gpt2" and rep["editor"] == "ft" and rep["seconds"] > 0
    assert r["target_new"] == " Rome" and r["target_true"] is not None
    assert r["p_new_after"] > r["p_new_before"]
    assert set(r) >= {"p_new_before", "p_new_after", "p_true_before", "p_true_after",
                      "generation_before", "generation_after"}
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(save)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
