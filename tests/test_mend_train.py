"""python -m mend.train on tiny models: fast_dev_run per architecture, the saved editor reloaded and used to edit,
resuming, checkpoints without pickle, and the MEND editor in mend.edit / mend.evaluate."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_params_identical, param_clones
from safetensors.torch import load_file
from tolerance import FORWARD, f32_tol

from mend.cli import run
from mend.editor import apply_edit, create_editor
from mend.errors import ConfigError, MendError
from mend.requests import make_request
from mend.scoring import score_targets

TINY_TRAIN = ["trainer.batch_size=2", "data.val_limit=4", "data.variants=1", "norm_warmup=2", "hypernet.rank=32",
              "trainer.progress=false", "eval.enabled=false", "trainer.threads=1"]
STACKS = {"tiny-t5": ["edit.stacks=[encoder,decoder]", "edit.layers=[-1]"]}
REQS = [make_request("{} is located in", "The tower", " Rome", " Paris"),
        make_request("{} plays the", "Bob", " piano", " drums")]


def train(out, *args: str) -> dict:
    from mend.train import main

    assert main([*TINY_TRAIN, f"out={out}", *args]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One fast_dev_run per architecture (shared by the tests below)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            torch.set_num_threads(1)
            cache[name] = (out, train(out, f"model={name}", "trainer.fast_dev_run=true", *STACKS.get(name, [])))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-t5"])
def test_fast_dev_run_then_the_saved_editor_edits(runs, tiny, name):
    out, metrics = runs(name)
    assert metrics["steps"] == 1 and (out / "editor.safetensors").exists() and (out / "config.yaml").exists()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["last_logged"].values())
    model, tok = tiny(name)
    editor = create_editor("mend", {"checkpoint": str(out)})
    before = param_clones(model)
    both = editor.edit(model, tok, REQS)
    assert_params_identical(model, before)
    stacks = {r.stack for r in both.deltas}
    assert stacks == ({"encoder", "decoder"} if name == "tiny-t5" else {"decoder"})
    singles = [editor.edit(model, tok, [r]) for r in REQS]
    n = both.diagnostics["tokens"]
    for ref, d in both.deltas.items():  # several requests in one edit: their ΔW summed
        assert d.abs().max() > 0
        # padded batch vs single rows: forward passes of other shapes (T5's padded encoder), then each ΔW a sum over
        # the n tokens of the hypernet's outer products: FORWARD·eps × sqrt(n) × their size (≥ |ΔW₁| + |ΔW₂|)
        d1, d2 = singles[0].deltas[ref], singles[1].deltas[ref]
        tol = f32_tol((d1.abs() + d2.abs()).max(), terms=n, safety=FORWARD)
        torch.testing.assert_close(d, d1 + d2, rtol=0, atol=tol)
    scaled = create_editor("mend", {"checkpoint": str(out), "scale": 1.5}).edit(model, tok, REQS)
    for ref, d in both.deltas.items():  # editor.scale multiplies every ΔW (recomputed: the same rounding bound)
        tol = f32_tol(1.5 * d.abs().max(), terms=n, safety=FORWARD)
        torch.testing.assert_close(scaled.deltas[ref], 1.5 * d, rtol=0, atol=tol)
    p0 = [s.logprob for s in score_targets(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])]
    handle = apply_edit(model, both)
    p1 = [s.logprob for s in score_targets(model, tok, [r.text for r in REQS], [r.target_new for r in REQS])]
    handle.restore()
    assert p1 != p0
    assert_params_identical(model, before)


def test_editor_refuses_another_model(runs, tiny):
    out, _ = runs("tiny-llama")
    model, tok = tiny("tiny-gptj")
    with pytest.raises(MendError, match="trained for tiny-llama"):
        create_editor("mend", {"checkpoint": str(out)}).edit(model, tok, REQS)
    with pytest.raises(ConfigError, match="editor.checkpoint"):
        create_editor("mend").edit(model, tok, REQS)


def test_resumed_run_continues_from_its_last_checkpoint(tmp_path):
    """2 steps, then the same command with max_steps=4 resumes (automatically, <out>/last exists) and ends
    where an uninterrupted 4-step run ends: same global step, same optimizer state, same weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["model=tiny-llama", "trainer.val_check_interval=2", "trainer.save_every_n_steps=1"]
    curve = "optim.schedule_steps=4"  # the default cosine's length: the stopped run is on the 4-step run's curve
    assert train(a, *args, curve, "trainer.max_steps=2")["steps"] == 2
    at2 = load_file(a / "editor.safetensors")
    state = json.loads((a / "last" / "state.json").read_text())
    assert state["global_step"] == 2 and not list(a.glob("**/*.ckpt"))
    assert train(a, *args, curve, "trainer.max_steps=4")["steps"] == 4
    assert train(b, *args, curve, "trainer.max_steps=4")["steps"] == 4
    resumed, straight = load_file(a / "editor.safetensors"), load_file(b / "editor.safetensors")
    assert any(not torch.equal(resumed[k], at2[k]) for k in at2)
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    with pytest.raises(ConfigError, match="other 'hypernet' settings"):
        train(a, *args, "trainer.max_steps=6", "hypernet.rank=8")
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tmp_path / "c", *args, "resume=true")


def test_checkpoint_io_round_trip_and_refuses_objects(tmp_path):
    from mend.learned.checkpointing import SafetensorsCheckpointIO

    io = SafetensorsCheckpointIO()
    ckpt = {"state_dict": {"w": torch.arange(3.0)}, "optimizer_states": [{"state": {0: {"step": torch.tensor(2.0)}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0]}]}], "epoch": 0, "x": None}
    io.save_checkpoint(ckpt, tmp_path / "last")
    io.save_checkpoint(ckpt, tmp_path / "last")  # replaces the folder
    back = io.load_checkpoint(tmp_path / "last")
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer_states"][0]["state"][0]["step"], torch.tensor(2.0))
    assert torch.equal(back["state_dict"]["w"], torch.arange(3.0)) and back["x"] is None
    with pytest.raises(MendError, match="without pickle"):
        io.save_checkpoint({"bad": object()}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_mend_in_the_edit_and_evaluate_commands(runs, tmp_path, capsys):
    from mend import edit, evaluate

    out, _ = runs("tiny-gpt2")
    args = ["model=tiny-gpt2", "editor=mend", f"editor.checkpoint={out}", "prompt={} is located in",
            "subject=The tower", "target= Rome", f"json={tmp_path / 'e.json'}"]
    with pytest.raises(SystemExit) as exc:
        run(edit.main, edit.USAGE, args)
    assert exc.value.code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["editor"] == "mend"
    args = ["model=tiny-gpt2", "editors=[mend,ft]", f"editor.checkpoint={out}", "data=builtin", "data.limit=3",
            "drawdown.source=none", "progress=false", f"out={tmp_path / 'ev'}"]
    with pytest.raises(SystemExit) as exc:
        run(evaluate.main, evaluate.USAGE, args)
    assert exc.value.code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(res["editors"]) == {"mend", "ft"} and res["editors"]["mend"]["metrics"]["n"] == 3
    with pytest.raises(SystemExit) as exc:  # another model: one line, exit 2
        run(evaluate.main, evaluate.USAGE, [*args[1:], "model=tiny-llama"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "trained for tiny-gpt2" in err


def test_train_end_evaluation_is_reproduced_by_mend_evaluate(tmp_path, capsys):
    from mend import evaluate

    out = tmp_path / "run"
    metrics = train(out, "model=tiny-gpt2", "trainer.max_steps=2", "eval.enabled=true", "eval.limit=3",
                    "eval.drawdown=self", "eval.drawdown_samples=2")
    table = capsys.readouterr().out
    assert "| mend (untrained) |" in table and "| mend |" in table and "unedited" in table
    ev = metrics["evaluation"]
    assert ev["n"] == 3 and {"unedited", "untrained", "trained", "command"} <= set(ev)
    assert "drawdown.source=self" in ev["command"] and "drawdown.samples=2" in ev["command"]
    assert ev["trained"]["drawdown_ppl"] is not None
    argv = ev["command"].split()[3:] + ["progress=false"]
    with pytest.raises(SystemExit) as exc:
        run(evaluate.main, evaluate.USAGE, argv)
    assert exc.value.code == 0, capsys.readouterr().err
    again = json.loads((out / "eval-check" / "results.json").read_text())["editors"]["mend"]["metrics"]
    for k in ("efficacy", "generalization", "locality", "edit_success", "kl_locality", "drawdown_ppl"):
        assert again[k] == ev["trained"][k], k
    capsys.readouterr()
    train(out, "model=tiny-gpt2", "trainer.max_steps=2", "eval.enabled=true", "eval.limit=3", "eval.drawdown=self",
          "eval.drawdown_samples=2")
    shown = capsys.readouterr().out  # the same command again: nothing to do, the table is shown again
    assert "already holds this run" in shown and "| mend |" in shown


def test_bad_training_config_is_one_line(capsys):
    from mend.train import USAGE, main

    for bad, needle in (("trainer.max_steps=0", "must be positive"), ("resume=maybe", "resume must be"),
                        ("data=nope", "data.name must be"), ("hypernet.act=swish", "hypernet.act"),
                        ("optim.schedule=linear", "optim.schedule must be"),
                        ("eval.editor=best trainer.keep_best=false", "needs trainer.keep_best")):
        with pytest.raises(SystemExit) as exc:
            run(main, USAGE, ["model=tiny-gpt2", "trainer.progress=false", *bad.split()])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and err.count("\n") == 1, (bad, err)


def test_learning_rate_schedule_is_a_function_of_the_step():
    from mend.learned.module import OptimSection, lr_factor

    const, cos = OptimSection(schedule="constant"), OptimSection(schedule="cosine", min_lr_ratio=0.2)
    assert [lr_factor(s, 100, const) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 100, cos) == pytest.approx(1.0) and lr_factor(100, 100, cos) == pytest.approx(0.2)
    assert lr_factor(50, 100, cos) == pytest.approx(0.6) and lr_factor(150, 100, cos) == pytest.approx(0.2)
    warm = OptimSection(schedule="cosine", warmup_steps=10, min_lr_ratio=0.0)
    assert lr_factor(0, 110, warm) == pytest.approx(0.1) and lr_factor(9, 110, warm) == pytest.approx(1.0)
    assert lr_factor(60, 110, warm) == pytest.approx(0.5)


def test_cosine_schedule_and_the_best_editor_kept(tmp_path, tiny):
    """The rates follow the schedule; <out>/best is a run directory of its own holding the best validation's
    editor, and the best score is part of the resume state."""
    from mend.learned.module import OptimSection, lr_factor

    out = tmp_path / "run"
    metrics = train(out, "model=tiny-llama", "trainer.max_steps=4", "trainer.val_check_interval=2",
                    "optim.schedule=cosine", "optim.min_lr_ratio=0.5", "optim.lr=1e-3", "eval.enabled=true",
                    "eval.limit=2", "eval.drawdown=none", "eval.editor=best")
    want = 1e-3 * lr_factor(3, 4, OptimSection(schedule="cosine", min_lr_ratio=0.5))  # the 4th step's rate
    assert metrics["last_logged"]["train/lr"] == pytest.approx(want)
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["step"] in (2, 4) and 0 <= best["validation"]["val/score"] <= 1
    assert metrics["evaluation"]["editor"] == str(out / "best") and metrics["evaluation"]["editor_step"] == best["step"]
    assert f"editor.checkpoint={out / 'best'} " in metrics["evaluation"]["command"]
    es, loc = best["validation"]["val/edit_success"], best["validation"]["val/loc_agreement"]
    # scores in [0, 1] computed in float32 (a few roundings) against the same formula in Python floats
    assert best["validation"]["val/score"] == pytest.approx(2 * es * loc / (es + loc) if es + loc else 0.0,
                                                            abs=f32_tol(1.0))
    state = json.loads((out / "last" / "state.json").read_text())
    saved_best = [v["best"] for v in state["callbacks"].values() if isinstance(v, dict) and "best" in v]
    assert saved_best and saved_best[0] == pytest.approx(best["validation"]["val/score"], abs=f32_tol(1.0))
    model, tok = tiny("tiny-llama")
    assert create_editor("mend", {"checkpoint": str(out / "best")}).edit(model, tok, REQS[:1]).deltas
    assert train(tmp_path / "nobest", "model=tiny-llama", "trainer.max_steps=2", "trainer.val_check_interval=2",
                 "trainer.keep_best=false")["steps"] == 2
    assert not (tmp_path / "nobest" / "best").exists()
    # resumed with trainer.reset_best: the earlier best score is forgotten, the next validation's editor is kept
    from mend.learned.checkpointing import EditorCheckpoint

    cb = EditorCheckpoint(out, 2, lambda *a: None, lambda *a: None, reset_best=True)
    cb.load_state_dict({"best": 0.9})
    assert cb.best is None
    # ... and stopped at step 6 of a cosine over 8 steps (optim.schedule_steps)
    resumed = train(out, "model=tiny-llama", "trainer.max_steps=6", "trainer.val_check_interval=2",
                    "optim.schedule=cosine", "optim.min_lr_ratio=0.5", "optim.lr=1e-3", "eval.enabled=false",
                    "trainer.reset_best=true", "optim.schedule_steps=8")
    assert json.loads((out / "best" / "metrics.json").read_text())["step"] == 6
    want = 1e-3 * lr_factor(5, 8, OptimSection(schedule="cosine", min_lr_ratio=0.5))
    assert resumed["last_logged"]["train/lr"] == pytest.approx(want)


def test_text_locality_rows_come_from_the_text_file(tmp_path):
    """data.text_locality adds (prefix, continuation) rows of ordinary text to every sample's locality rows, read
    from the given file (never WikiText's test file, the evaluator's drawdown text); a missing file is one error."""
    from mend.learned.lit_data import SampleSource, TrainDataSection, collate, load_text_pairs, text_pairs

    words = [f"w{i}" for i in range(50)]
    assert text_pairs([" ".join(words), "too short"]) == [(" ".join(words[:32]), " " + " ".join(words[32:44]))]
    text = tmp_path / "text.txt"
    text.write_text("= Heading =\n" + "\n".join(" ".join(f"p{j}w{i}" for i in range(60)) for j in range(3)))
    pairs = load_text_pairs(TrainDataSection(name="counterfact", text_locality=2, text_path=str(text)))
    assert len(pairs) == 3 and pairs[1][0].startswith("p1w0 ") and pairs[1][1] == " " + " ".join(
        f"p1w{i}" for i in range(32, 44))
    src = SampleSource(REQS, n_loc=1, texts=pairs, n_text=2)
    sample = src[0]
    assert len(sample.loc_prompts) == 3 and sample.loc_prompts[0] not in {p for p, _ in pairs}
    assert set(zip(sample.loc_prompts[1:], sample.loc_targets[1:])) <= set(pairs)
    assert collate([sample, sample])["loc_kind"] == ["neighbour", "text", "text"] * 2
    assert src[5] == SampleSource(REQS, n_loc=1, texts=pairs, n_text=2)[5]  # a pure function of the position
    assert load_text_pairs(TrainDataSection(text_locality=0, text_path=str(tmp_path / "nope"))) == []
    with pytest.raises(MendError, match="data.text_path"):
        load_text_pairs(TrainDataSection(text_locality=1, text_path=str(tmp_path / "nope")))


def test_relation_locality_rows_are_other_records_of_the_same_relation():
    """data.relation_locality=N: N rows of other records with the edit's prompt template, with their true targets;
    none for a record alone with its template; the record's own neighbour row stays first."""
    from mend.learned.lit_data import SampleSource, collate

    reqs = [make_request("{} is located in", s, " Rome", t, neighborhood=[(f"Near {s} is", " x")])
            for s, t in (("The tower", " Paris"), ("Big Ben", " London"), ("The Colosseum", " Rome"))]
    reqs.append(make_request("{} plays the", "Bob", " piano", " drums", neighborhood=[("Ann plays the", " harp")]))
    src = SampleSource(reqs, n_loc=1, n_relation=2)
    for i in range(8):
        s = src[i]
        r = src.requests[src._record(i)]
        assert s.loc_prompts[0] == r.neighborhood[0][0] and s.loc_kinds[0] == "neighbour"
        rel = [(p, t) for p, t, k in zip(s.loc_prompts, s.loc_targets, s.loc_kinds) if k == "relation"]
        if r.subject == "Bob":
            assert rel == []
        else:
            others = {(q.text, q.target_true) for q in reqs[:3] if q is not r}
            assert len(rel) == 2 and set(rel) == others
    assert SampleSource(reqs, n_loc=1)[0].loc_kinds == ("neighbour",)
    assert collate([src[0]])["loc_kind"][0] == "neighbour"


def test_training_with_text_and_relation_locality_runs(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"p{j}w{i}" for i in range(50)) for j in range(4)))
    out = tmp_path / "run"
    metrics = train(out, "model=tiny-gpt2", "trainer.fast_dev_run=true", "data.text_locality=1",
                    f"data.text_path={text}", "data.relation_locality=2", "loss.c_text=0.5")
    assert metrics["steps"] == 1 and torch.isfinite(torch.tensor(metrics["last_logged"]["train/kl"]))


def test_preconditioned_training_saves_p_and_the_reloaded_editor_edits(tmp_path, tiny):
    """hypernet.precondition=true: P is fitted from text before step 0, saved with the editor, and used on reload."""
    from mend.learned.run_dir import load_editor

    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"p{j}w{i}" for i in range(60)) for j in range(20)))
    out = tmp_path / "run"
    train(out, "model=tiny-llama", "trainer.fast_dev_run=true", "hypernet.precondition=true",
          "hypernet.precondition_tokens=256", f"data.text_path={text}")
    hn, info = load_editor(out)
    assert info.hypernet.precondition and hn.preconditioned
    P = next(iter(hn.precond.values())).P
    # P = (symmetric)⁻¹ in float64, rounded to float32 entry by entry: Pᵢⱼ and Pⱼᵢ by ≤ eps/2 · |P| each
    assert not torch.equal(P, torch.eye(P.shape[0])) and torch.allclose(P, P.T, rtol=0,
                                                                         atol=f32_tol(P.abs().max(), safety=1))
    model, tok = tiny("tiny-llama")
    editor = create_editor("mend", {"checkpoint": str(out)})
    result = editor.edit(model, tok, REQS[:1])
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in result.deltas.values())
