"""Hook context managers: what they record or patch, and that every hook is gone afterwards."""

from __future__ import annotations

import pytest
import torch
from tolerance import f32_tol
from torch import nn

from mend.adapters import get_adapter
from mend.hooks import add_to_output, capture, replace_output


class TupleOut(nn.Module):
    """Returns (hidden, extra) like many transformer blocks."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x), "extra"


def _no_hooks(*modules: nn.Module) -> bool:
    return all(not m._forward_hooks for m in modules)


@pytest.fixture
def lin():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_capture_records_inputs_outputs_and_grads(lin):
    x = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(2, 5, 3)
    with capture({"l": lin}, inputs=True, outputs=True, grads=True) as caps:
        y = lin(x)
        (y * w).sum().backward()
    cap = caps["l"]
    assert torch.equal(cap.input, x.detach()) and not cap.input.requires_grad
    assert torch.equal(cap.output, y.detach())
    assert torch.equal(cap.grad, w)  # d/dy of Σ y·w
    # the (u, δ) outer product is the weight gradient: both sum the 10 positions' products, maybe in other orders
    mag = torch.einsum("bto,bti->oi", cap.grad.abs(), cap.input.abs()).max()
    torch.testing.assert_close(torch.einsum("bto,bti->oi", cap.grad, cap.input), lin.weight.grad, rtol=0,
                               atol=f32_tol(mag, terms=10))
    assert _no_hooks(lin)


def test_capture_keeps_every_call_and_respects_flags(lin):
    xs = [torch.randn(3, 4) for _ in range(3)]
    with capture({"l": lin}) as caps:  # defaults: inputs only
        for x in xs:
            lin(x)
    assert len(caps["l"].inputs) == 3 and not caps["l"].outputs and not caps["l"].grads
    assert all(torch.equal(a, b) for a, b in zip(caps["l"].inputs, xs))
    assert torch.equal(caps["l"].input, xs[-1])
    with capture({"l": lin}, inputs=False, outputs=True) as caps:
        lin(xs[0])
    assert not caps["l"].inputs and len(caps["l"].outputs) == 1
    assert _no_hooks(lin)


def test_capture_without_detach_keeps_the_graph(lin):
    x = torch.randn(2, 4, requires_grad=True)
    with capture({"l": lin}, outputs=True, detach=False) as caps:
        lin(x)
    assert caps["l"].output.requires_grad and caps["l"].input is x


def test_capture_no_grad_when_output_does_not_require_grad(lin):
    lin.requires_grad_(False)
    with capture({"l": lin}, grads=True) as caps:
        lin(torch.randn(2, 4))
    assert caps["l"].grads == []


def test_capture_on_a_tuple_output_module():
    mod = TupleOut()
    x = torch.randn(2, 4)
    with capture({"m": mod}, outputs=True) as caps:
        out = mod(x)
    assert torch.equal(caps["m"].output, out[0])


def test_hooks_removed_on_exit_and_on_exception(lin):
    other = TupleOut()
    with capture({"a": lin, "b": other}, grads=True):
        assert len(lin._forward_hooks) == 1 and len(other._forward_hooks) == 1
    assert _no_hooks(lin, other)

    with pytest.raises(ValueError):
        with capture({"a": lin, "b": other}):
            raise ValueError
    assert _no_hooks(lin, other)

    with pytest.raises(ValueError):
        with add_to_output(lin, torch.ones(3), [0]):
            assert len(lin._forward_hooks) == 1
            raise ValueError
    assert _no_hooks(lin)

    with pytest.raises(ValueError):
        with replace_output(lin, torch.zeros(1, 3)):
            assert len(lin._forward_hooks) == 1
            raise ValueError
    assert _no_hooks(lin)


def test_add_to_output_only_at_the_given_positions(lin):
    x = torch.randn(2, 5, 4)
    base = lin(x)
    v = torch.tensor([1.0, -2.0, 3.0])
    with add_to_output(lin, v, [1, 3]):
        out = lin(x)
    expected = base.clone()
    expected[0, 1] += v
    expected[1, 3] += v
    assert torch.equal(out, expected)
    assert torch.equal(lin(x), base)  # gone afterwards

    # one position for every row, and a per-row (batch, d) vector
    vs = torch.randn(2, 3)
    with add_to_output(lin, vs, 2):
        out = lin(x)
    expected = base.clone()
    expected[:, 2] += vs
    assert torch.equal(out, expected)


def test_add_to_output_passes_the_rest_of_a_tuple_through():
    torch.manual_seed(0)
    mod = TupleOut()
    x = torch.randn(2, 3, 4)
    base, _ = mod(x)
    with add_to_output(mod, torch.ones(4), torch.tensor([0, 2])):
        out, extra = mod(x)
    assert extra == "extra"
    diff = out - base
    # (y + 1) − y rounds twice, each by ≤ eps/2 · (|y| + 1)
    tol = f32_tol(base.abs().max() + 1, safety=1)
    assert torch.allclose(diff[0, 0], torch.ones(4), rtol=0, atol=tol)
    assert torch.allclose(diff[1, 2], torch.ones(4), rtol=0, atol=tol)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = mask[1, 2] = False
    assert torch.equal(diff[mask], torch.zeros_like(diff[mask]))


def test_add_to_output_in_a_causal_model_changes_only_later_positions(tiny):
    model, _ = tiny("tiny-gpt2")
    block = get_adapter(model).block(1)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    base = model(ids).logits
    with add_to_output(block, torch.randn(64, generator=torch.Generator().manual_seed(1)), [4]):
        out = model(ids).logits
    assert torch.equal(out[0, :4], base[0, :4])
    assert not torch.allclose(out[0, 4:], base[0, 4:])
    assert torch.equal(model(ids).logits, base)


def test_replace_output_whole_and_at_positions():
    mod = TupleOut()
    x = torch.randn(2, 3, 4)
    base, _ = mod(x)
    new = torch.randn(2, 3, 4)
    with replace_output(mod, new):
        out, extra = mod(x)
    assert torch.equal(out, new) and extra == "extra"

    positions = torch.tensor([[0, 1], [1, 2]])
    rows = torch.randn(2, 4)
    with replace_output(mod, rows, positions):
        out, _ = mod(x)
    expected = base.clone()
    expected[0, 1] = rows[0]
    expected[1, 2] = rows[1]
    assert torch.equal(out, expected)
    assert torch.equal(mod(x)[0], base)
    assert _no_hooks(mod)
