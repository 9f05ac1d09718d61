"""The Evaluator on tiny models: exact restore in every mode (also after errors), the contract's metric keys,
sequential curves, request groups, and the wiring of drawdown / KL / references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_params_identical, param_clones
from tolerance import FORWARD, f32_tol

from mend.adapters import get_adapter
from mend.editor import Editor, EditResult, create_editor, edited
from mend.editors.ft import FTConfig, FTEditor
from mend.evaluation.evaluator import EvalSettings, Evaluator
from mend.requests import EditRequest

CONTRACT_KEYS = {"efficacy", "generalization", "locality", "score", "edit_success", "drawdown_ppl", "kl_locality",
                 "seconds_per_edit", "n"}
FT_SETTINGS = {"layers": [1], "lr": 0.05, "norm_constraint": 0.05, "steps": 5}
FACTS = [("The tower", " Rome", " Paris"), ("The bridge", " Tokyo", " London"), ("The museum", " Cairo", " Madrid")]


def cf_requests(n: int = 3) -> list[EditRequest]:
    return [
        EditRequest(
            prompt="{} is located in", subject=s, target_new=new, target_true=true,
            paraphrases=(f"Where is {s}? It is in", f"{s} stands in the city of"),
            neighborhood=(("The Louvre is located in", " Paris"), ("Big Ben is in", " London")),
            meta={"case_id": f"c{i}"},
        )
        for i, (s, new, true) in enumerate((FACTS * 3)[:n])
    ]


@pytest.fixture
def gpt2(tiny):
    return tiny("tiny-gpt2")


@pytest.fixture
def chunks():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 24), generator=g)


def ft():
    return create_editor("ft", FT_SETTINGS)


def _ref(model):
    adapter = get_adapter(model)
    return adapter, adapter.weight_refs(kinds=["mlp_out"], layers=[2])[0]


class ConstantEditor(Editor):
    """Adds ``value`` to one weight per call and records what it saw: the requests, that weight, resets."""

    name = "constant"
    Config = FTConfig

    def __init__(self, value: float = 0.01, fail_on: int | None = None):
        super().__init__()
        self.value, self.fail_on = value, fail_on
        self.events: list[tuple[str, list]] = []
        self.seen: list[torch.Tensor] = []

    def edit(self, model, tokenizer, requests):
        n = sum(1 for e in self.events if e[0] == "edit") + 1
        self.events.append(("edit", [r.meta.get("case_id") for r in requests]))
        if self.fail_on == n:
            raise RuntimeError(f"edit {n} fails")
        adapter, ref = _ref(model)
        self.seen.append(adapter.get_weight(ref).detach().clone())
        return EditResult({ref: torch.full_like(adapter.get_weight(ref), self.value)})

    def reset(self):
        self.events.append(("reset", []))


class FlakyFT(FTEditor):
    """The FT editor, except that its third edit raises."""

    name = "flaky-ft"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def edit(self, model, tokenizer, requests):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("third edit fails")
        return super().edit(model, tokenizer, requests)


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_modes_restore_exactly_and_report_contract_keys(gpt2, chunks, mode):
    model, tok = gpt2
    saved = param_clones(model)
    reqs = cf_requests(3)
    ev = Evaluator(model, tok, reqs, "counterfact", text_chunks=chunks,
                   settings=EvalSettings(mode=mode, curve_every=1), progress=False)
    pre = ev.pre()
    assert_params_identical(model, saved)
    res = ev.run(ft())
    assert_params_identical(model, saved)
    m = res.metrics
    assert CONTRACT_KEYS <= set(m)
    assert m["n"] == 3 and len(res.records) == 3
    assert sorted(r["id"] for r in res.records) == ["c0", "c1", "c2"]
    for key in ("efficacy", "generalization", "locality", "edit_success"):
        assert 0.0 <= m[key] <= 1.0, key
    assert isinstance(m["drawdown_ppl"], float) and m["drawdown_ppl"] > -1.0
    assert m["seconds_per_edit"] > 0
    assert m["kl_locality"] > 1e-4  # the edit changed the next-token distributions on the neighbours
    assert pre.metrics["kl_locality"] == 0.0
    assert m["drawdown_acc"] == pytest.approx(pre.metrics["loc_accuracy"] - m["loc_accuracy"])
    expected_score = 0.0 if min(m["efficacy"], m["generalization"], m["locality"]) == 0 else (
        3 / (1 / m["efficacy"] + 1 / m["generalization"] + 1 / m["locality"]))
    assert m["score"] == pytest.approx(expected_score)
    if mode == "sequential":
        assert [p["edits"] for p in res.curve] == [1, 2, 3]
        for key in ("efficacy", "locality", "score", "drawdown_ppl", "kl_locality"):
            assert res.curve[-1][key] == m[key], key
    else:
        assert res.curve == []
    # the evaluator can run again on the restored model and gets the same numbers (deterministic FT)
    again = ev.run(ft(), mode)
    assert_params_identical(model, saved)
    # a KL from passes that may round differently: log-probabilities move by ≤ 2δ, δ ≤ FORWARD·eps·|logits|
    with torch.no_grad():
        logit_size = float(model(input_ids=chunks).logits.abs().max())
    assert again.metrics["efficacy"] == m["efficacy"] and again.metrics["kl_locality"] == pytest.approx(
        m["kl_locality"], abs=f32_tol(4 * logit_size, safety=FORWARD))


def test_sequential_curve_every_n(gpt2):
    model, tok = gpt2
    ev = Evaluator(model, tok, cf_requests(5), "counterfact", settings=EvalSettings(mode="sequential", curve_every=2),
                   progress=False)
    res = ev.run(ConstantEditor(0.0))
    assert [p["edits"] for p in res.curve] == [2, 4, 5]
    assert res.metrics["drawdown_ppl"] is None  # no text given


def test_sequential_batches_edit_on_top_of_each_other_and_restore(gpt2):
    """batch_size=2 on 5 requests: three edits of 2, 2 and 1 requests, each from the previous weights; the curve
    after the edits that reach 2 and 4 requests; every weight restored bit for bit."""
    model, tok = gpt2
    adapter, ref = _ref(model)
    original = adapter.get_weight(ref).detach().clone()
    before = param_clones(model)
    ev = Evaluator(model, tok, cf_requests(5), "counterfact",
                   settings=EvalSettings(mode="sequential", curve_every=2, batch_size=2), progress=False)
    seq = ConstantEditor(0.01)
    res = ev.run(seq)
    assert [e for e in seq.events if e[0] == "edit"] == [("edit", ["c0", "c1"]), ("edit", ["c2", "c3"]),
                                                          ("edit", ["c4"])]
    assert torch.equal(seq.seen[0], original) and not torch.equal(seq.seen[1], original)
    assert [p["edits"] for p in res.curve] == [2, 4, 5] and res.metrics["n"] == 5
    assert_params_identical(model, before)


def test_what_each_mode_edits_from(gpt2):
    """single: every edit starts from the original weights; sequential: from the previous edits; batch: one call."""
    model, tok = gpt2
    adapter, ref = _ref(model)
    original = adapter.get_weight(ref).detach().clone()
    reqs = cf_requests(3)
    ev = Evaluator(model, tok, reqs, "counterfact", settings=EvalSettings(curve_every=1), progress=False)

    single = ConstantEditor(0.01)
    ev.run(single, "single")
    assert [torch.equal(w, original) for w in single.seen] == [True, True, True]
    assert [e for e in single.events if e[0] == "edit"] == [("edit", ["c0"]), ("edit", ["c1"]), ("edit", ["c2"])]
    # editor state is cleared before every single edit and after the run
    kinds = [e[0] for e in single.events]
    assert kinds[-1] == "reset" and all(kinds[k - 1] == "reset" for k, e in enumerate(kinds) if e == "edit")

    seq = ConstantEditor(0.01)
    ev.run(seq, "sequential")
    for k, w in enumerate(seq.seen):
        # k float32 additions of 0.01 against one addition of 0.01·k: each rounds by ≤ eps/2 · (|W| + 0.01 k)
        tol = f32_tol(original.abs().max() + 0.01 * k, terms=k + 2, safety=1, worst_case=True)
        torch.testing.assert_close(w, original + 0.01 * k, rtol=0, atol=tol)
    assert not torch.equal(seq.seen[2], seq.seen[1])
    # editor state is kept across sequential edits: reset only before and after the run
    kinds = [e[0] for e in seq.events]
    assert "".join(k[0] for k in kinds).strip("r") == "eee" and kinds[0] == kinds[-1] == "reset"
    assert [e[1] for e in seq.events if e[0] == "edit"] == [["c0"], ["c1"], ["c2"]]

    batch = ConstantEditor(0.01)
    ev.run(batch, "batch")
    assert [e for e in batch.events if e[0] == "edit"] == [("edit", ["c0", "c1", "c2"])]
    assert torch.equal(adapter.get_weight(ref), original)

    with pytest.raises(ValueError, match="mode"):
        ev.run(ConstantEditor(), "parallel")


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_restore_after_an_editor_error_mid_sequence(gpt2, chunks, mode):
    model, tok = gpt2
    saved = param_clones(model)
    ev = Evaluator(model, tok, cf_requests(4), "counterfact", text_chunks=chunks,
                   settings=EvalSettings(mode=mode, curve_every=1), progress=False)
    editor = FlakyFT(FTEditor.Config(**FT_SETTINGS))
    with pytest.raises(RuntimeError, match="third edit"):
        ev.run(editor)
    assert editor.calls == 3
    assert_params_identical(model, saved)
    # the same with deltas that certainly change the weights, and the editor reset afterwards
    const = ConstantEditor(0.5, fail_on=3)
    with pytest.raises(RuntimeError, match="edit 3 fails"):
        ev.run(const)
    assert const.events[-1] == ("reset", [])
    assert_params_identical(model, saved)


def test_restore_after_an_error_while_measuring(gpt2, chunks, monkeypatch):
    model, tok = gpt2
    saved = param_clones(model)
    ev = Evaluator(model, tok, cf_requests(3), "counterfact", text_chunks=chunks, progress=False)
    ev.pre()

    def boom():
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(ev, "_drawdown", boom)
    for mode in ("single", "batch", "sequential"):
        with pytest.raises(RuntimeError, match="measurement failed"):
            ev.run(ConstantEditor(0.5), mode)
        assert_params_identical(model, saved)


def test_pre_of_the_unedited_model(gpt2, chunks):
    model, tok = gpt2
    reqs = cf_requests(3)
    cf = Evaluator(model, tok, reqs, "counterfact", text_chunks=chunks, progress=False).pre()
    assert cf.metrics["kl_locality"] == 0.0
    assert cf.metrics["ppl"] > 1.0 and cf.metrics["drawdown_ppl"] is None
    assert [r["id"] for r in cf.records] == ["c0", "c1", "c2"]
    zs = Evaluator(model, tok, reqs, "zsre", progress=False).pre()
    assert zs.metrics["locality"] == 1.0 and zs.metrics["kl_locality"] == 0.0
    assert all(r["locality"] == 1.0 for r in zs.records)
    assert zs.metrics["ppl"] is None


def test_a_no_op_edit_changes_nothing(gpt2, chunks):
    """Zero deltas: zsRE locality stays 1, KL ~0, no perplexity or accuracy drawdown, same efficacy as before."""
    model, tok = gpt2
    ev = Evaluator(model, tok, cf_requests(3), "zsre", text_chunks=chunks, progress=False)
    pre = ev.pre().metrics
    for mode in ("single", "batch", "sequential"):
        m = ev.run(ConstantEditor(0.0), mode).metrics
        assert m["locality"] == 1.0, mode
        assert m["kl_locality"] == pytest.approx(0.0, abs=1e-4), mode  # references are kept in float16
        assert m["drawdown_ppl"] == 0.0 and m["drawdown_acc"] == 0.0, mode
        for key in ("efficacy", "generalization", "edit_success", "loc_accuracy"):
            assert m[key] == pytest.approx(pre[key]), (mode, key)


@torch.no_grad()
def _ppl(model, chunks) -> float:
    logits = model(input_ids=chunks).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1))
    return math.exp(nll.item())


@torch.no_grad()
def _next_logdist(model, tok, prompt: str) -> torch.Tensor:
    ids = torch.tensor([tok(prompt).input_ids])
    return torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)


def test_batch_drawdown_and_kl_match_a_manual_computation(gpt2, chunks):
    model, tok = gpt2
    reqs = cf_requests(3)
    ev = Evaluator(model, tok, reqs, "counterfact", text_chunks=chunks, settings=EvalSettings(mode="batch"),
                   progress=False)
    res = ev.run(ft())
    # the same edit by hand (FT is deterministic)
    result = ft().edit(model, tok, reqs)
    neighbours = [p for p, _ in reqs[0].neighborhood]
    pre_ppl, pre_dists = _ppl(model, chunks), [_next_logdist(model, tok, p) for p in neighbours]
    with edited(model, result):
        post_ppl, post_dists = _ppl(model, chunks), [_next_logdist(model, tok, p) for p in neighbours]
    # the evaluator's passes batch the text otherwise: logits move by δ ≤ FORWARD·eps·|logits|, each log-probability
    # by ≤ 2δ + a few eps × its size, so the mean NLL by as much and exp(NLL) by as much relative
    with torch.no_grad():
        logit_size = float(model(input_ids=chunks).logits.abs().max())
    rel = f32_tol(2 * logit_size + math.log(post_ppl), safety=FORWARD)
    assert ev.pre().metrics["ppl"] == pytest.approx(pre_ppl, rel=rel)
    # post / pre − 1 with both off by ≤ rel (relative)
    assert res.metrics["drawdown_ppl"] == pytest.approx((post_ppl - pre_ppl) / pre_ppl, abs=2 * rel * post_ppl / pre_ppl)
    kl = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(pre_dists, post_dists)) / len(neighbours)
    assert kl > 1e-3
    # every request has the same neighbours, so the mean over requests is the mean over these prompts
    assert res.metrics["kl_locality"] == pytest.approx(kl, rel=0.05, abs=2e-3)


def test_groups_are_edited_together_in_single_mode(gpt2):
    model, tok = gpt2
    reqs = cf_requests(5)
    groups = ["g1", None, "g1", "g2", "g2"]
    reqs = [EditRequest(**{**r.__dict__, "meta": {**r.meta, **({"group": g} if g else {})}})
            for r, g in zip(reqs, groups)]
    ev = Evaluator(model, tok, reqs, "counterfact", progress=False)
    assert ev.groups() == [[0, 2], [1], [3, 4]]
    rec = ConstantEditor(0.01)
    res = ev.run(rec, "single")
    assert [e[1] for e in rec.events if e[0] == "edit"] == [["c0", "c2"], ["c1"], ["c3", "c4"]]
    # each group starts from the original weights
    assert all(torch.equal(w, rec.seen[0]) for w in rec.seen)
    assert sorted(r["id"] for r in res.records) == ["c0", "c1", "c2", "c3", "c4"]
    assert res.metrics["n"] == 5
    batch = ConstantEditor(0.01)
    ev.run(batch, "batch")
    assert [e[1] for e in batch.events if e[0] == "edit"] == [["c0", "c1", "c2", "c3", "c4"]]
    # distinct groups with equal-looking ids are not merged; no group means one's own group
    ev2 = Evaluator(model, tok, cf_requests(3), "counterfact", progress=False)
    assert ev2.groups() == [[0], [1], [2]]


class RefusingEditor(Editor):
    """An editor whose guard refuses every update: no deltas, the reason in the diagnostics."""

    name = "refusing"
    Config = FTConfig

    def edit(self, model, tokenizer, requests):
        return EditResult({}, {"rejected": ["update of layer 1 rejected: ‖ΔW‖/‖W‖ = 9 > 1"]})


def test_refused_updates_are_counted_and_said(gpt2, chunks, caplog):
    """An edit the editor's guard refused is not silently scored as an edit: the run counts it and warns."""
    model, tok = gpt2
    ev = Evaluator(model, tok, cf_requests(2), "counterfact", chunks, EvalSettings(mode="batch"))
    run = ev.run(RefusingEditor())
    assert run.metrics["rejected_edits"] == 1
    assert "refusing, 2 request(s): update of layer 1 rejected" in caplog.text
    assert ev.run(ft()).metrics["rejected_edits"] == 0
