"""Adapter contract: where the MLP weights are, their orientation, and that (u, δ) from hooks give the gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_TINY, DECODER_ONLY
from tolerance import f32_tol
from torch import nn
from transformers.pytorch_utils import Conv1D

from mend.adapters import MLP_KINDS, get_adapter, supported_architectures
from mend.adapters.base import is_transposed
from mend.errors import ConfigError, UnsupportedArchitecture
from mend.hooks import capture

EXPECTED_KINDS = {
    "tiny-gpt2": ["mlp_in", "mlp_out"],
    "tiny-gptj": ["mlp_in", "mlp_out"],
    "tiny-llama": ["mlp_gate", "mlp_up", "mlp_out"],
    "tiny-gemma3": ["mlp_gate", "mlp_up", "mlp_out"],
    "tiny-t5": ["mlp_in", "mlp_out"],  # T5 v1.0 (ReLU, not gated)
}


def _loss(model, enc_dec: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    vocab = 256
    if enc_dec:
        input_ids = torch.randint(0, vocab, (2, 7), generator=gen)
        labels = torch.randint(0, vocab, (2, 5), generator=gen)
        return model(input_ids=input_ids, labels=labels).loss
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    return model(input_ids=ids, labels=ids).loss  # next-token cross-entropy (shifted inside the model)


@pytest.mark.parametrize("name", ALL_TINY)
def test_outer_product_of_keys_and_output_grads_is_the_weight_gradient(tiny, name):
    model, _ = tiny(name)
    model.double()
    adapter = get_adapter(model)
    refs = adapter.weight_refs(layers=[0, -1])
    stacks = {r.stack for r in refs}
    assert stacks == ({"encoder", "decoder"} if name == "tiny-t5" else {"decoder"})
    assert {r.kind for r in refs} == set(EXPECTED_KINDS[name])
    assert len(refs) == len(stacks) * 2 * len(EXPECTED_KINDS[name])

    params = [adapter.parameter(r) for r in refs]
    for p in params:
        p.requires_grad_(True)
    with capture({r.param: adapter.module(r) for r in refs}, inputs=True, grads=True) as caps:
        loss = _loss(model, model.config.is_encoder_decoder)
        grads = torch.autograd.grad(loss, params)

    for ref, g in zip(refs, grads):
        cap = caps[ref.param]
        assert len(cap.inputs) == 1 and len(cap.grads) == 1, ref.label
        u, delta = cap.input, cap.grad
        assert u.shape[:-1] == delta.shape[:-1]
        outer = torch.einsum("...o,...i->oi", delta, u)  # Σ over batch and tokens of δ_t u_tᵀ
        expected = g.T if ref.transposed else g
        assert outer.shape == adapter.get_weight(ref).shape
        assert expected.abs().max() > 0, f"{ref.label}: zero gradient, the check would be vacuous"
        rel = (outer - expected).norm() / expected.norm()
        assert rel < 1e-5, f"{name} {ref.label}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ALL_TINY)
def test_orientation_follows_module_type_and_get_weight_is_d_out_by_d_in(tiny, name):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    refs = adapter.weight_refs()
    n_stacks = 2 if name == "tiny-t5" else 1
    assert len(refs) == n_stacks * adapter.num_layers() * len(EXPECTED_KINDS[name])
    for ref in refs:
        mod = adapter.module(ref)
        assert ref.param == f"{ref.module}.weight"
        assert ref.transposed is (name == "tiny-gpt2")
        assert isinstance(mod, Conv1D if name == "tiny-gpt2" else nn.Linear)
        d_out, d_in = (mod.nf, mod.nx) if isinstance(mod, Conv1D) else (mod.out_features, mod.in_features)
        w = adapter.get_weight(ref)
        assert tuple(w.shape) == (d_out, d_in)
        assert w.data_ptr() == adapter.parameter(ref).data_ptr()  # a view, not a copy
        # behaviourally: the module computes y = W x (+ b) with W = get_weight(ref)
        x = torch.randn(3, d_in, generator=torch.Generator().manual_seed(0))
        bias = mod.bias if getattr(mod, "bias", None) is not None else torch.zeros(d_out)
        # the module's kernel may sum the d_in products in another order (and add the bias inside)
        mag = (x.abs() @ w.abs().T + bias.abs()).max()
        torch.testing.assert_close(mod(x), x @ w.T + bias, rtol=0, atol=f32_tol(mag, terms=d_in))
        # to_stored maps the (d_out, d_in) convention back to the parameter's layout
        assert adapter.to_stored(ref, torch.empty(d_out, d_in)).shape == adapter.parameter(ref).shape


def test_gpt2_square_weights_are_still_oriented_by_type():
    """A square Conv1D must be reported transposed, a square Linear not: no shape guessing."""
    assert is_transposed(Conv1D(8, 8)) is True
    assert is_transposed(nn.Linear(8, 8)) is False
    with pytest.raises(UnsupportedArchitecture):
        is_transposed(nn.Conv2d(1, 1, 1))


def test_t5_decoder_mlp_lives_in_layer_2_and_encoder_in_layer_1(tiny):
    model, _ = tiny("tiny-t5")
    adapter = get_adapter(model)
    enc = adapter.weight_ref(1, "mlp_out", stack="encoder")
    dec = adapter.weight_ref(1, "mlp_out", stack="decoder")
    assert enc.module == "encoder.block.1.layer.1.DenseReluDense.wo"
    assert dec.module == "decoder.block.1.layer.2.DenseReluDense.wo"
    assert adapter.default_stack == "encoder"
    assert adapter.weight_refs(stacks=["decoder"], layers=[0]) == [
        adapter.weight_ref(0, k, "decoder") for k in EXPECTED_KINDS["tiny-t5"]
    ]


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16)
    return OPTForCausalLM(cfg)


def _tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                        num_attention_heads=2, max_position_embeddings=32)
    return GPTNeoXForCausalLM(cfg)


@pytest.mark.parametrize("build", [_tiny_opt, _tiny_neox])
def test_unsupported_architecture_names_the_supported_classes(build):
    model = build()
    with pytest.raises(UnsupportedArchitecture) as info:
        get_adapter(model)
    msg = str(info.value)
    assert type(model).__name__ in msg
    for cls in ("GPT2LMHeadModel", "GPTJForCausalLM", "LlamaForCausalLM", "Gemma3ForCausalLM",
                "T5ForConditionalGeneration"):
        assert cls in msg
        assert cls in supported_architectures()


@pytest.mark.parametrize("name", ALL_TINY)
def test_layer_indices(tiny, name):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    n = adapter.num_layers()
    kind = "mlp_out"
    assert adapter.weight_ref(-1, kind) == adapter.weight_ref(n - 1, kind)
    assert adapter.weight_ref(-n, kind).layer == 0
    for bad in (n, -n - 1, 100, True, 1.0, "0"):
        with pytest.raises(ConfigError):
            adapter.weight_ref(bad, kind)
    with pytest.raises(ConfigError, match="out of range"):
        adapter.weight_refs(layers=[0, n])
    # duplicates through negative indices collapse
    stacks = [adapter.default_stack]
    assert adapter.weight_refs(kinds=[kind], layers=[0, -n], stacks=stacks) == [adapter.weight_ref(0, kind)]


@pytest.mark.parametrize("name", DECODER_ONLY)
def test_bad_kind_and_stack_raise_config_error(tiny, name):
    model, _ = tiny(name)
    adapter = get_adapter(model)
    missing = next(k for k in MLP_KINDS if k not in EXPECTED_KINDS[name])
    with pytest.raises(ConfigError, match="available"):
        adapter.weight_ref(0, missing)
    with pytest.raises(ConfigError, match="available"):
        adapter.weight_ref(0, "attn_q")
    with pytest.raises(ConfigError, match="stack"):
        adapter.weight_ref(0, "mlp_out", stack="encoder")
