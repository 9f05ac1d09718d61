"""Batched v*: the rows of many requests share each step's forward and backward, and a request that meets its
stop leaves the batch; each request's δ must be the one it gets optimised alone (its loss is its own)."""

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


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))


def _run(model, tok, requests, **settings):
    adapter = get_adapter(model)
    ref = adapter.weight_ref(1, "mlp_out")
    s = values.ValueSettings(**{"lr": 0.5, "steps": 8, "stop_on": "nll", **settings})
    return values.optimize_values(model, tok, adapter, requests, TEMPLATES, adapter.module(ref), ref.layer, s)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_values_equal_one_request_at_a_time(tiny, name, prefix_cache):
    model, tok = tiny(name)
    plain = {"prefix_cache": prefix_cache, "weight_decay": 0.0, "kl_factor": 0.0}  # the loss is the NLL
    # a stop at the median of the requests' losses after 8 steps: some stop early, at their own step, the others
    # run all 8, so the batch loses requests along the way
    never = [_run(model, tok, [r], early_stop_loss=0.0, **plain).final_loss[0] for r in REQS]
    threshold = sorted(never)[len(never) // 2]
    alone = [_run(model, tok, [r], early_stop_loss=threshold, **plain) for r in REQS]
    steps = [v.steps[0] for v in alone]
    assert len(set(steps)) > 1, f"the requests should stop at different steps, got {steps}"
    for rows in (1000, 8):  # one group of every request; groups of two requests (8 rows // 4 rows per request)
        batched = _run(model, tok, REQS, early_stop_loss=threshold, rows_per_step=rows, **plain)
        assert batched.steps == steps
        for i, v in enumerate(alone):
            # up to 8 Adam steps, each on a gradient summed over 4 rows from passes of other shapes; Adam's step is
            # ~lr per coordinate whatever the gradient's size, so rounding adds up over the steps (as in
            # test_partial's cached-prefix comparison)
            tol = f32_tol(v.delta.abs().max(), terms=8 * 4, safety=FORWARD, worst_case=True)
            assert torch.allclose(batched.delta[i], v.delta[0], rtol=0, atol=tol), (rows, i)
            assert torch.allclose(batched.init[i], v.init[0], rtol=0, atol=f32_tol(v.init.abs().max(), safety=FORWARD))
            assert batched.final_loss[i] == pytest.approx(v.final_loss[0], abs=f32_tol(max(never), safety=FORWARD))


def test_a_request_that_met_its_stop_is_not_moved_again(tiny):
    """With a stop every request meets at once, nothing moves; the δ a request met its stop with is returned."""
    model, tok = tiny("tiny-llama")
    got = _run(model, tok, REQS, early_stop_loss=1e9)
    assert got.steps == [1] * len(REQS)
    assert torch.equal(got.delta, torch.zeros_like(got.delta))


def test_rows_per_step_must_be_positive(tiny):
    model, tok = tiny("tiny-llama")
    with pytest.raises(ConfigError, match="rows_per_step"):
        _run(model, tok, REQS, rows_per_step=0)
