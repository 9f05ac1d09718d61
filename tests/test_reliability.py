"""The fast parts of bench/reliability.py: a few hundred fuzz cases through the commands' entry points, exact undo
of mixed sequential edits (also when an editor raises halfway), no pickle, foreign files refused, and an
interrupted folder replacement recovered."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import reliability  # noqa: E402
import reliability_fuzz  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    old = os.environ.get("MEND_CACHE_DIR")
    ws = reliability_fuzz.make_workspace(root)  # sets MEND_CACHE_DIR to its own cache
    yield ws
    if old is None:
        os.environ.pop("MEND_CACHE_DIR", None)
    else:
        os.environ["MEND_CACHE_DIR"] = old


@pytest.mark.parametrize("family,n", [("requests", 60), ("overrides", 80), ("data", 40), ("run_dirs", 30),
                                      ("stats", 30)])
def test_generated_inputs_end_in_success_or_the_one_line_error(workspace, family, n):
    tally = reliability_fuzz.Tally()
    reliability_fuzz.FAMILIES[family](workspace, tally, n)
    assert tally.cases >= n // 2  # hypothesis may stop early on a small input space, never at a handful
    assert not tally.failures, tally.failures[:3]


def test_the_harness_tells_a_crash_from_the_one_line_error():
    class Module:
        USAGE = "usage"

        @staticmethod
        def main(argv):
            if argv == ["crash"]:
                raise IndexError("list index out of range")
            if argv == ["fail"]:
                from mend.errors import ConfigError

                raise ConfigError("bad value")
            return 0

    assert reliability_fuzz.call(Module, []) == (0, None)
    assert reliability_fuzz.call(Module, ["fail"]) == (2, None)
    code, problem = reliability_fuzz.call(Module, ["crash"])
    assert code is None and problem.startswith("IndexError")


@pytest.mark.parametrize("fail_at", [None, 21])
def test_mixed_sequential_edits_restore_bit_for_bit(monkeypatch, tmp_path, fail_at):
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    out = reliability.undo_test(40, fail_at=fail_at)
    assert out["mismatched"] == 0
    assert out["edits"] == (40 if fail_at is None else fail_at - 1)
    assert (out["raised"] is None) == (fail_at is None)


def test_no_pickle_in_the_code():
    assert reliability.pickle_uses() == []


def test_an_editor_and_statistics_made_for_another_model_are_refused(workspace):
    out = reliability.foreign_refusals(workspace)
    assert out["refused"], out
    assert "fingerprint" in out["editor"] and "GPT2LMHeadModel-" in out["statistics"]


def test_an_interrupted_folder_replacement_is_recovered(tmp_path, monkeypatch):
    from mend.io import recover_dir, write_dir_atomically

    last = tmp_path / "last"
    write_dir_atomically(last, lambda d: (d / "state.json").write_text("1"))
    real_rename, calls = os.rename, []

    def killed_after_the_first_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(last, lambda d: (d / "state.json").write_text("2"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not last.exists()
    assert recover_dir(last) and (last / "state.json").read_text() == "1"
    assert not recover_dir(last)


def test_a_final_path_that_reads_back_whole_is_told_from_a_partial_one(tmp_path):
    import torch
    from reliability_kill import readable
    from safetensors.torch import save_file

    whole = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(whole))
    cut = tmp_path / "b.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    bad_json = tmp_path / "c.json"
    bad_json.write_text('{"a": ')
    assert readable(whole) is None and readable(cut) and readable(bad_json)


BASE_EDIT = ["model=tiny-llama", "editor=ft", "editor.steps=1", "prompt={} is in", "subject=Paris", "target= Rome",
             "max_new_tokens=1"]
BASE_TRAIN = ["model=tiny-llama", "trainer.fast_dev_run=true", "trainer.progress=false", "eval.enabled=false",
              "trainer.batch_size=2", "data.val_limit=2", "hypernet.rank=8"]
FOUND = [  # inputs that once escaped as tracebacks (found by the fuzzing), each now the one-line error
    ("edit", [*BASE_EDIT, "editor=memit", "editor.layers=[]"]),
    ("edit", [*BASE_EDIT, "max_new_tokens=0"]),
    ("edit", [*BASE_EDIT, "model.dtype=0"]),
    ("edit", [*BASE_EDIT, "model.device=nowhere"]),
    ("edit", [*BASE_EDIT, "editor.name=[1,2]"]),
    ("edit", [*BASE_EDIT, "editor.lr=-1e30"]),
    ("edit", [*BASE_EDIT, "editor.lr=nan"]),
    ("edit", [*BASE_EDIT, "editor.kind=4"]),
    ("evaluate", ["model=tiny-llama", "editors=[ft]", "data=builtin", "data.limit=2", "drawdown.length=0"]),
    ("stats", ["model=tiny-llama", "layers=[1]", "corpus=a\x00b"]),
    ("train", [*BASE_TRAIN, "seed=1000000000000000000000000000000"]),
    ("train", [*BASE_TRAIN, "norm_warmup=1000000000000000000000000000000"]),
    ("train", [*BASE_TRAIN, "trainer.devices="]),
    ("train", [*BASE_TRAIN, "model.name=" + "x" * 5000]),
]


@pytest.mark.parametrize("command,argv", FOUND, ids=[f"{c}-{a[-1][:24]}" for c, a in FOUND])
def test_inputs_that_once_crashed_are_one_line_errors(tmp_path, monkeypatch, command, argv):
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    module = reliability_fuzz.commands()[command]
    out = [f"out={tmp_path / 'out'}"] if command in ("evaluate", "train") else []
    assert reliability_fuzz.call(module, [*argv, *out]) == (2, None)


def test_a_record_whose_case_id_is_not_a_key_is_skipped(tmp_path):
    from mend.data.counterfact import load_counterfact

    rec = reliability_fuzz.counterfact_record(0)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{**rec, "case_id": [1]}, {**rec, "case_id": 7}]))
    ds = load_counterfact(str(path))
    assert [r.meta["case_id"] for r in ds.requests] == [7] and "case_id" in ds.skipped[0][1]


def test_text_values_are_verbatim_even_when_they_look_like_interpolations():
    from mend.config import build_config
    from mend.edit import TEXT_KEYS, EditCommand

    for text in ("${x}", "costs ${price} \\${y}", "${oc.env:HOME}"):
        cfg = build_config(EditCommand, [f"target={text}", "prompt={} is"], text_keys=TEXT_KEYS)
        assert cfg.target == text
