"""Tiny random models and a byte-level tokenizer, built from configs in milliseconds (tests, smoke runs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 256..259, inside the tiny vocabulary
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 256, 257, 258, 259
VOCAB_SIZE = 264  # 256 bytes + 4 specials, rounded up
SEED = 1234
_IDS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token; no files, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return tok


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=256, n_embd=64, n_layer=4, n_head=4, **_IDS)
    return GPT2LMHeadModel(cfg)


def _gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(vocab_size=VOCAB_SIZE, n_positions=256, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, **_IDS)
    return GPTJForCausalLM(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **_IDS,
    )
    return LlamaForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        sliding_window=64, **_IDS,
    )
    return Gemma3ForCausalLM(cfg)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB_SIZE, d_model=64, d_ff=128, d_kv=16, num_layers=3, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=PAD_ID, **_IDS,
    )
    return T5ForConditionalGeneration(cfg)


TINY_BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny-gpt2": _gpt2,
    "tiny-gptj": _gptj,
    "tiny-llama": _llama,
    "tiny-gemma3": _gemma3,
    "tiny-t5": _t5,
}


def build_tiny(alias: str, seed: int = SEED) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random model of the named family with a fixed seed, its special token ids set inside the vocabulary."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TINY_BUILDERS[alias]()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    if model.config.is_encoder_decoder:
        model.config.decoder_start_token_id = PAD_ID
        model.generation_config.decoder_start_token_id = PAD_ID
    model.config.name_or_path = alias
    model.eval()
    return model, byte_tokenizer()
