"""One adapter per architecture family: only where things are; the logic lives in ModelAdapter."""

from __future__ import annotations

from mend.adapters.base import ModelAdapter, register_adapter


@register_adapter
class GPT2Adapter(ModelAdapter):
    """GPT-2: Conv1D weights stored [in, out]."""

    model_classes = ("GPT2LMHeadModel",)
    stacks = {"decoder": "transformer.h"}
    mlp = {"decoder": {"mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}}
    final_norms = {"decoder": "transformer.ln_f"}
    embedding_path = "transformer.wte"
    mlp_paths = {"decoder": "mlp"}
    attn_paths = {"decoder": "attn"}


@register_adapter
class GPTJAdapter(ModelAdapter):
    model_classes = ("GPTJForCausalLM",)
    stacks = {"decoder": "transformer.h"}
    mlp = {"decoder": {"mlp_in": "mlp.fc_in", "mlp_out": "mlp.fc_out"}}
    final_norms = {"decoder": "transformer.ln_f"}
    embedding_path = "transformer.wte"
    mlp_paths = {"decoder": "mlp"}
    attn_paths = {"decoder": "attn"}


@register_adapter
class LlamaAdapter(ModelAdapter):
    """Llama family with a gated MLP (Llama, SmolLM2, Mistral, Qwen2)."""

    model_classes = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    stacks = {"decoder": "model.layers"}
    mlp = {"decoder": {"mlp_gate": "mlp.gate_proj", "mlp_up": "mlp.up_proj", "mlp_out": "mlp.down_proj"}}
    final_norms = {"decoder": "model.norm"}
    embedding_path = "model.embed_tokens"
    mlp_paths = {"decoder": "mlp"}
    attn_paths = {"decoder": "self_attn"}


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    """Gemma 3 (text): Llama-like, with an extra norm after the MLP."""

    model_classes = ("Gemma3ForCausalLM",)
    post_mlp_norm = "post_feedforward_layernorm"


@register_adapter
class T5Adapter(ModelAdapter):
    """T5: encoder MLP in ``layer.1``, decoder MLP in ``layer.2`` (after cross-attention); gated in v1.1."""

    model_classes = ("T5ForConditionalGeneration",)
    _mlp = {
        "mlp_in": "DenseReluDense.wi",
        "mlp_gate": "DenseReluDense.wi_0",
        "mlp_up": "DenseReluDense.wi_1",
        "mlp_out": "DenseReluDense.wo",
    }
    stacks = {"encoder": "encoder.block", "decoder": "decoder.block"}
    mlp = {
        "encoder": {k: f"layer.1.{v}" for k, v in _mlp.items()},
        "decoder": {k: f"layer.2.{v}" for k, v in _mlp.items()},
    }
    final_norms = {"encoder": "encoder.final_layer_norm", "decoder": "decoder.final_layer_norm"}
    embedding_path = "shared"
    # the attention and MLP themselves, not their T5LayerSelfAttention / T5LayerFF wrappers that add the residual
    mlp_paths = {"encoder": "layer.1.DenseReluDense", "decoder": "layer.2.DenseReluDense"}
    attn_paths = {"encoder": "layer.0.SelfAttention", "decoder": "layer.0.SelfAttention"}
