"""Second-moment statistics (locate_edit.stats): exact against brute force, padding excluded, truncated passes,
one pass for many layers, the on-disk cache and its guards, the `self` corpus, and the command."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_ONLY
from tolerance import FORWARD, f32_tol

from locate_edit import stats
from locate_edit.stats import (
    ForeignStatistics,
    accumulate_moments,
    corpus_tokens,
    load_stats,
    resolve_corpus,
    save_stats,
    second_moment_stats,
    second_moments,
    stats_path,
)
from mend.adapters import get_adapter
from mend.adapters.partial import stop_after
from mend.errors import MendError
from mend.hooks import capture
from mend.models import fingerprint

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _module(model, layer, kind="mlp_out", stack=None):
    adapter = get_adapter(model)
    return adapter.module(adapter.weight_ref(layer, kind, stack))


def _full_forward(model, ids, mask=None, stack=None):
    """The whole model, no truncation (for T5 both stacks, the decoder reading the text shifted right)."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(ids),
                         decoder_attention_mask=mask)
        return model(input_ids=ids, attention_mask=mask)


def brute_force(model, ids, layer, mask=None, kind="mlp_out", stack=None):
    """E[k kᵀ] from every key captured in a full forward, padding rows dropped, in float64."""
    with capture({"k": _module(model, layer, kind, stack)}) as caps:
        _full_forward(model, ids, mask, stack)
    keys = caps["k"].input.reshape(-1, caps["k"].input.shape[-1]).double()
    if mask is not None:
        keys = keys[mask.reshape(-1).bool()]
    return keys.T @ keys / keys.shape[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- exactness -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DECODER_ONLY)
def test_matches_brute_force_in_float64(name, tiny, text_file):
    model, tok = tiny(name)
    model.double()
    C = second_moments(model, tok, [1], corpus=str(text_file), n_tokens=640, seq_len=64, batch_size=3,
                       cache=False, progress=False)[1]
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 640, 64)
    assert ids.shape == (10, 64)
    want = brute_force(model, ids, 1)
    assert C.dtype == torch.float64 and C.shape == want.shape
    assert _rel(C, want) < 1e-12
    torch.testing.assert_close(C, C.T)


def test_matches_brute_force_in_float32(tiny, text_file):
    model, tok = tiny("tiny-llama")
    got = second_moment_stats(model, tok, [2], corpus=str(text_file), n_tokens=1000, seq_len=50, cache=False,
                              progress=False)[2]
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 1000, 50)
    assert got.n_tokens == 1000 and got.C.dtype == torch.float64 and not got.cached and got.path is None
    # keys from passes of other batch shapes (≤ FORWARD·eps relative, twice in k kᵀ), then the float32 matmul of a
    # batch (8 chunks × 50 tokens) sums 400 products
    assert _rel(got.C, brute_force(model, ids, 2)) < f32_tol(2.0, safety=FORWARD) + f32_tol(1.0, terms=400)


def test_half_precision_model_accumulates_in_float64(tiny, text_file):
    model, tok = tiny("tiny-llama")
    model.to(torch.bfloat16)
    C = second_moments(model, tok, [1], corpus=str(text_file), n_tokens=256, seq_len=32, cache=False,
                       progress=False)[1]
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 256, 32)
    # the same bfloat16 keys (one batch, as brute force), multiplied in float32 (256 products per entry) and summed
    # in float64; a bfloat16 sum would be off by ~eps_bf16 = 7.8e-3
    assert C.dtype == torch.float64 and _rel(C, brute_force(model, ids, 1)) < f32_tol(1.0, terms=256)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_t5_stacks_match_brute_force(stack, tiny, text_file):
    model, tok = tiny("tiny-t5")
    model.double()
    C = second_moments(model, tok, [-1], corpus=str(text_file), n_tokens=256, seq_len=32, stack=stack,
                       cache=False, progress=False)[-1]
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 256, 32)
    assert _rel(C, brute_force(model, ids, 2, stack=stack)) < 1e-12


def test_other_kinds_use_their_own_input(tiny, text_file):
    model, tok = tiny("tiny-llama")
    model.double()
    C = second_moments(model, tok, [0], corpus=str(text_file), n_tokens=256, seq_len=32, kind="mlp_up",
                       cache=False, progress=False)[0]
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 256, 32)
    assert C.shape == (64, 64) and _rel(C, brute_force(model, ids, 0, kind="mlp_up")) < 1e-12


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_padding_positions_are_excluded(name, tiny):
    model, _ = tiny(name)
    model.double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (5, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[3, 12:] = 0  # right padding
    mask[4, :3] = 0
    m = accumulate_moments(model, ids, [1], attention_mask=mask, batch_size=2)
    assert m.count == int(mask.sum()) == 100 - 7 - 8 - 3
    want = brute_force(model, ids, 1, mask)
    assert _rel(m.means()[1], want) < 1e-12
    everything = brute_force(model, ids, 1)  # padding rows included: measurably different
    assert _rel(everything, want) > 1e-3


def test_truncated_forward_gives_the_same_keys_and_skips_upper_layers(tiny):
    model, _ = tiny("tiny-llama")
    adapter = get_adapter(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    key, upper = _module(model, 1), adapter.block(2)
    with capture({"k": key}) as full:
        _full_forward(model, ids)
    with capture({"k": key, "up": upper, "head": adapter.lm_head()}) as cut, stop_after(key), torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(cut["k"].input, full["k"].input)
    assert not cut["up"].inputs and not cut["head"].inputs


def test_several_layers_in_one_pass_equal_separate_passes(tiny, text_file, monkeypatch):
    model, tok = tiny("tiny-gpt2")
    ids = corpus_tokens(resolve_corpus(str(text_file)), model, tok, 512, 32)
    calls = []
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    together = accumulate_moments(model, ids, [3, 0, 2], batch_size=4)
    assert len(calls) == 4  # 16 chunks / 4 per batch: one pass for all three layers
    for layer in (0, 2, 3):
        alone = accumulate_moments(model, ids, [layer], batch_size=4)
        assert torch.equal(together.sums[layer], alone.sums[layer])
    assert together.count == ids.numel()


def test_negative_and_repeated_layers_keep_the_callers_keys(tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    got = second_moments(model, tok, [-1, 3, 1], corpus=str(text_file), n_tokens=256, seq_len=32, progress=False)
    assert set(got) == {-1, 3, 1} and torch.equal(got[-1], got[3])


def test_float32_accumulation(tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    kw = dict(corpus=str(text_file), n_tokens=256, seq_len=32, cache=False, progress=False)
    c32 = second_moments(model, tok, [1], accumulate=torch.float32, **kw)[1]
    c64 = second_moments(model, tok, [1], **kw)[1]
    assert c32.dtype == torch.float32 and _rel(c32, c64) < f32_tol(1.0, terms=256)  # float32 sums of 256 products


# --- cache -----------------------------------------------------------------------------------------------------
def test_cache_hit_returns_identical_tensors_without_running_the_model(tiny, text_file, monkeypatch, tmp_path):
    model, tok = tiny("tiny-gpt2")
    kw = dict(corpus=str(text_file), n_tokens=300, seq_len=32, progress=False)
    first = second_moment_stats(model, tok, [0, 2], **kw)
    path = first[2].path
    assert path.exists() and path.is_relative_to(tmp_path / "cache" / "stats" / fingerprint(model))
    assert path.name.startswith("decoder.L002.mlp_out--file-corpus.txt-") and "300x32.float64" in path.name
    C, meta = load_stats(path, model)
    assert meta["fingerprint"] == fingerprint(model) and meta["model"] == "tiny-gpt2" and meta["layer"] == 2
    assert meta["n_tokens"] == 300 and meta["n_tokens_used"] == 288 and meta["seq_len"] == 32
    assert meta["dtype"] == "float64" and meta["kind"] == "mlp_out"

    def boom(*_a, **_k):
        raise AssertionError("the model ran on a cache hit")

    monkeypatch.setattr(model, "forward", boom)
    second = second_moment_stats(model, tok, [2, 0], **kw)
    assert all(second[x].cached and torch.equal(second[x].C, first[x].C) for x in (0, 2))
    assert second[2].n_tokens == 288 and torch.equal(C, first[2].C)
    with pytest.raises(AssertionError, match="cache hit"):
        second_moment_stats(model, tok, [2], force=True, **kw)


def test_cache_key_follows_the_request(tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    a = second_moment_stats(model, tok, [1], corpus=str(text_file), n_tokens=256, seq_len=32, progress=False)[1]
    b = second_moment_stats(model, tok, [1], corpus=str(text_file), n_tokens=256, seq_len=64, progress=False)[1]
    c = second_moment_stats(model, tok, [1], corpus=str(text_file), n_tokens=256, seq_len=32, kind="mlp_in",
                            progress=False)[1]
    assert len({a.path, b.path, c.path}) == 3 and not b.cached and not c.cached
    key = resolve_corpus(str(text_file)).key
    text_file.write_text(text_file.read_text() + "more text\n")
    assert resolve_corpus(str(text_file)).key != key  # an edited file is another corpus


def test_a_file_for_another_model_is_refused(tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    kw = dict(corpus=str(text_file), n_tokens=256, seq_len=32, progress=False)
    path = stats_path(model, 1, "mlp_out", "decoder", resolve_corpus(str(text_file)).key, 256, 32)
    save_stats(path, torch.eye(256, dtype=torch.float64),
               {"fingerprint": "GPT2LMHeadModel-0000000000000000", "model": "other-model"})
    with pytest.raises(ForeignStatistics, match="computed for model other-model .* not tiny-gpt2"):
        second_moments(model, tok, [1], **kw)
    assert isinstance(ForeignStatistics("x"), MendError)


def test_a_damaged_or_mismatched_file_is_recomputed(tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    kw = dict(corpus=str(text_file), n_tokens=256, seq_len=32, progress=False)
    good = second_moment_stats(model, tok, [1], **kw)[1]
    good.path.write_bytes(b"not a safetensors file")
    again = second_moment_stats(model, tok, [1], **kw)[1]
    assert not again.cached and torch.equal(again.C, good.C)
    save_stats(good.path, good.C, {**again.meta, "layer": 3})  # right model, wrong request
    assert not second_moment_stats(model, tok, [1], **kw)[1].cached


def test_no_cache_writes_nothing(tiny, text_file, tmp_path):
    model, tok = tiny("tiny-gpt2")
    second_moments(model, tok, [1], corpus=str(text_file), n_tokens=256, seq_len=32, cache=False, progress=False)
    assert not (tmp_path / "cache" / "stats").exists()


def test_condition_number():
    assert stats.condition_number(torch.diag(torch.tensor([4.0, 2.0, 1.0]))) == pytest.approx(4.0)
    assert stats.condition_number(torch.zeros(2, 2)) == float("inf")
