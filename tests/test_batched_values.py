"""Batched v*: the rows of many requests share each step's forward and backward, and a request that meets its
stop leaves the batch; each request's δ must be the one it gets optimised alone (its loss is its own), up to the
rounding of passes of other shapes."""

from __future__ import annotations

import pytest
import torch
from tolerance import FORWARD, f32_tol

from locate_edit import values
from mend.adapters import get_adapter
from mend.errors import ConfigError
from mend.requests import make_request

REQS = [
    make_request("{} is in", "The tower", " Rome", " Paris"),
    make_request("{} plays the", "Bob", " piano", " drums"),
    make_request("The favourite food of {} is", "Alice Smith", " rice", " bread"),
    make_request("{}, a famous bridge, spans the", "The Golden Gate", " Thames", " bay"),
    make_request("{} speaks", "Marie", " German", " French"),
]
TEMPLATES = ["{}", "Once upon a time. {}", "It rained all day long in the old town. {}"]
STEPS = 8
# the loss is the NLL alone; or the reference loss (KL and weight decay), the bare prompt's NLL in the stop and
# the shrink after it; or δ optimised as a rank-one update writes it (ROME's realized values)
VARIANTS = {
    "nll": {"stop_on": "nll", "weight_decay": 0.0, "kl_factor": 0.0},
    "loss-prompt-shrink": {"stop_on": "loss", "kl_factor": 0.0625, "weight_decay": 1e-5, "shrink_steps": 3},
    "realized": {"stop_on": "nll", "weight_decay": 0.0, "kl_factor": 0.0, "realized": True},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))


def _realized(model) -> values.Realized:
    adapter = get_adapter(model)
    d_out, d_in = adapter.get_weight(adapter.weight_ref(1, "mlp_out")).shape
    g = torch.Generator().manual_seed(0)
    return values.Realized(0.05 * torch.randn(len(REQS), d_in, generator=g),
                           0.01 * torch.randn(len(REQS), d_out, generator=g))


def _threshold(model, tok, realized=None, **settings) -> float:
    """A stop one request meets halfway through its optimisation while another never does: requests then leave
    the batch at different steps."""
    start = [_run(model, tok, [i], realized, steps=1, **settings).final_loss[0] for i in range(len(REQS))]
    end = [_run(model, tok, [i], realized, early_stop_loss=0.0, **settings).final_loss[0] for i in range(len(REQS))]
    for i in sorted(range(len(REQS)), key=lambda j: end[j]):
        mid = (start[i] + end[i]) / 2
        if max(end) > mid:
            return mid
    raise AssertionError(f"no request's loss falls below another's final loss: {start} -> {end}")


def _run(model, tok, which, realized=None, **settings):
    """v* at tiny models' layer 1 for the requests ``which`` (indices into REQS)."""
    adapter = get_adapter(model)
    ref = adapter.weight_ref(1, "mlp_out")
    s = values.ValueSettings(**{"lr": 0.5, "steps": STEPS, **settings})
    part = None if realized is None else realized[torch.tensor(which)]
    return values.optimize_values(model, tok, adapter, [REQS[i] for i in which], TEMPLATES, adapter.module(ref),
                                  ref.layer, s, part)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize(("variant", "prefix_cache"), [("nll", True), ("nll", False), ("loss-prompt-shrink", True),
                                                       ("realized", True)])
def test_batched_values_equal_one_request_at_a_time(tiny, name, variant, prefix_cache):
    model, tok = tiny(name)
    settings = {k: v for k, v in VARIANTS[variant].items() if k != "realized"} | {"prefix_cache": prefix_cache}
    realized = _realized(model) if VARIANTS[variant].get("realized") else None
    threshold = _threshold(model, tok, realized, **settings)
    if variant == "loss-prompt-shrink":
        settings["prompt_nll"] = threshold  # the bare prompt must meet it too
    alone = [_run(model, tok, [i], realized, early_stop_loss=threshold, **settings) for i in range(len(REQS))]
    steps = [v.steps[0] for v in alone]
    assert any(1 < k < STEPS for k in steps) and STEPS in steps, f"requests should leave the batch early: {steps}"
    for rows in (1000, 8):  # one group of all five; groups of 1, 2 and 2 requests (8 rows // 4 rows per request)
        batched = _run(model, tok, list(range(len(REQS))), realized, early_stop_loss=threshold, rows_per_step=rows,
                       **settings)
        assert batched.steps == steps
        for i, v in enumerate(alone):
            # up to 8 Adam steps (and 3 shrink passes), each on a gradient summed over 4 rows from passes of other
            # shapes; Adam's step is ~lr per coordinate whatever the gradient's size, so rounding adds up over the
            # steps (as in test_partial's cached-prefix comparison)
            tol = f32_tol(v.delta.abs().max(), terms=(STEPS + 3) * 4, safety=FORWARD, worst_case=True)
            assert torch.allclose(batched.delta[i], v.delta[0], rtol=0, atol=tol), (rows, i)
            assert torch.allclose(batched.init[i], v.init[0], rtol=0, atol=f32_tol(v.init.abs().max(), safety=FORWARD))
            assert batched.final_loss[i] == pytest.approx(v.final_loss[0], abs=f32_tol(threshold + 1, safety=FORWARD))


def test_a_request_that_met_its_stop_is_not_moved_again(tiny):
    """A request that meets its stop at step k keeps the δ it met it with, bit for bit, while the others go on
    (Adam's momentum would move it: its δ is restored after each step)."""
    model, tok = tiny("tiny-llama")
    plain = VARIANTS["nll"]
    threshold = _threshold(model, tok, **plain)
    everyone = list(range(len(REQS)))
    full = _run(model, tok, everyone, early_stop_loss=threshold, **plain)
    early = [i for i, k in enumerate(full.steps) if 1 < k < STEPS]
    assert early and any(k == STEPS for k in full.steps)
    i = early[0]
    cut = _run(model, tok, everyone, early_stop_loss=threshold, **(plain | {"steps": full.steps[i]}))
    assert torch.equal(full.delta[i], cut.delta[i])
    assert full.delta[i].abs().max() > 0


def test_rows_per_step_must_be_positive(tiny):
    model, tok = tiny("tiny-llama")
    with pytest.raises(ConfigError, match="rows_per_step"):
        _run(model, tok, [0], rows_per_step=0)
