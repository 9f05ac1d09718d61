"""Statistics: the corpora (`self`, `auto`, files, `hf:`), argument errors, and `python -m locate_edit.stats`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_command

from locate_edit.stats import USAGE, corpus_tokens, load_stats, main, resolve_corpus, second_moments
from mend.errors import MendError
from mend.models import fingerprint

pytestmark = pytest.mark.usefixtures("isolated_cache")


# --- corpora ---------------------------------------------------------------------------------------------------
def test_self_corpus_is_sampled_once(tiny, monkeypatch, tmp_path):
    model, tok = tiny("tiny-gpt2")
    spec = resolve_corpus("auto")  # the data folder is empty
    assert spec.kind == "self"
    ids = corpus_tokens(spec, model, tok, 200, 16, progress=False)
    assert ids.shape == (12, 16)
    assert list((tmp_path / "cache" / "corpora" / fingerprint(model)).glob("*.safetensors"))

    def boom(*_a, **_k):
        raise AssertionError("sampled twice")

    monkeypatch.setattr(model, "generate", boom)
    assert torch.equal(corpus_tokens(spec, model, tok, 200, 16, progress=False), ids)
    C = second_moments(model, tok, [0], corpus="self", n_tokens=200, seq_len=16, progress=False)[0]
    assert torch.isfinite(C).all()


def test_auto_prefers_wikitext(tmp_path):
    wiki = tmp_path / "data" / "wikitext"
    wiki.mkdir(parents=True)
    (wiki / "wiki.test.raw").write_text(" = Heading = \n\n Some text .\n")
    spec = resolve_corpus("auto")
    assert spec.kind == "file" and spec.key.startswith("file-wiki.test.raw-")


def test_sample_token_batch_is_deterministic_and_leaves_the_rng_alone(tiny):
    from mend.data.text import sample_token_batch

    model, tok = tiny("tiny-llama")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = sample_token_batch(model, tok, 5, 8, seed=3, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sample_token_batch(model, tok, 5, 8, seed=3, batch_size=2)
    assert a.shape == (5, 8) and torch.equal(a, b)
    assert not torch.equal(a, sample_token_batch(model, tok, 5, 8, seed=4, batch_size=2))


def test_document_start_ids_follow_the_tokenizer():
    from tokenizers import processors

    from mend.data.text import DOCUMENT_SEPARATOR, document_start_ids
    from mend.tiny import BOS_ID, byte_tokenizer

    tok = byte_tokenizer()
    assert document_start_ids(tok) == [BOS_ID]  # no document separator, and tok() does not add the BOS itself
    tok.add_special_tokens({"additional_special_tokens": [DOCUMENT_SEPARATOR]})
    assert document_start_ids(tok) == [tok.convert_tokens_to_ids(DOCUMENT_SEPARATOR)]
    adds_bos = byte_tokenizer()
    adds_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    assert adds_bos("The").input_ids[0] == BOS_ID and document_start_ids(adds_bos) == []


def test_samples_and_templates_start_after_the_document_start(tiny, monkeypatch):
    from locate_edit.keys import context_templates
    from mend.data.text import sample_token_batch
    from mend.tiny import BOS_ID

    model, tok = tiny("tiny-gpt2")
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][:, 0].tolist())
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    rows = sample_token_batch(model, tok, 3, 5, seed=0)
    templates = context_templates(model, tok, [[4, 2]], seed=0, cache=False)
    assert rows.shape == (3, 5) and seen == [[BOS_ID] * 3, [BOS_ID], [BOS_ID]]
    assert len(templates) == 3 and all(t.endswith(". {}") and "<s>" not in t for t in templates[1:])


def test_hf_corpus_offline_is_a_clear_error(tiny, monkeypatch):
    import datasets

    def offline(*_a, **_k):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    model, tok = tiny("tiny-gpt2")
    assert resolve_corpus("hf:wikitext:wikitext-2-raw-v1:train").key == "hf-wikitext-wikitext-2-raw-v1-train"
    with pytest.raises(MendError, match="cannot load dataset 'hf:wikitext:wikitext-2-raw-v1' .*offline"):
        second_moments(model, tok, [0], corpus="hf:wikitext:wikitext-2-raw-v1", n_tokens=64, seq_len=32)


def test_hf_corpus_reads_the_text_column(tiny, monkeypatch):
    import datasets

    rows = [{"id": i, "text": "" if i % 3 == 0 else f"row {i} of some dataset text"} for i in range(40)]
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (asked.append((a, k)), rows)[1])
    model, tok = tiny("tiny-gpt2")
    spec = resolve_corpus("hf:some/data:cfg")
    ids = corpus_tokens(spec, model, tok, 256, 32)
    assert asked[0][0] == ("some/data", "cfg") and asked[0][1]["split"] == "train" and asked[0][1]["streaming"]
    assert ids.shape == (8, 32) and tok.decode(ids[0]).startswith("row 1 of some")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(layers=[]), "no layers"),
    (dict(layers=[9]), "out of range"),
    (dict(n_tokens=0), "n_tokens must be a positive"),
    (dict(n_tokens=10), "at least seq_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(kind="mlp_gate"), "weight kind 'mlp_gate'"),
    (dict(stack="encoder"), "stack 'encoder'"),
    (dict(corpus="/no/such/file.txt"), "not auto, self"),
    (dict(corpus="hf:"), "hf:NAME"),
    (dict(accumulate=torch.int64), "floating-point"),
])
def test_bad_arguments_raise_mend_errors(kwargs, needle, tiny, text_file):
    model, tok = tiny("tiny-gpt2")
    args = dict(layers=[0], corpus=str(text_file), n_tokens=64, seq_len=32, progress=False) | kwargs
    with pytest.raises(MendError, match=needle):
        second_moments(model, tok, **args)


# --- the command -----------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    return run_command(main, USAGE, argv, capsys)


def test_command_writes_cache_files_then_reads_them(text_file, tmp_path, capsys):
    argv = ["model=tiny-gpt2", "layers=[0,-1]", f"corpus={text_file}", "tokens=512", "seq_len=64", "progress=false"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    files = sorted((tmp_path / "cache" / "stats").rglob("*.safetensors"))
    assert len(files) == 2 and all(str(f) in out for f in files)
    lines = out.strip().splitlines()
    assert lines[0].startswith("model tiny-gpt2") and "layer" in lines[1] and len(lines) == 4
    assert all(" 512 " in ln and "written" in ln for ln in lines[2:])
    meta = json.loads(json.dumps(load_stats(files[0])[1]))
    assert meta["corpus"].startswith("file-corpus.txt-")
    code, out, _ = _cli(argv, capsys)
    assert code == 0 and out.count(" read ") == 2
    code, out, _ = _cli([*argv, "force=true"], capsys)
    assert code == 0 and out.count("written") == 2


def test_command_help(capsys):
    code, out, _ = _cli(["--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m locate_edit.stats") and "corpus=SRC" in out


@pytest.mark.parametrize("arg,needle", [
    ("model=no-such-model", "unknown model"),
    ("layers=[99]", "out of range"),
    ("tokens=0", "positive"),
    ("tokens=abc", "tokens"),
    ("kind=bogus", "weight kind 'bogus'"),
    ("corpus=/no/such/dir", "not auto, self"),
    ("accumulate=int64", "floating-point"),
    ("accumulate=banana", "torch dtype name"),
    ("nonsense=1", "nonsense"),
])
def test_command_bad_input_is_one_line_exit_2(arg, needle, text_file, capsys):
    argv = ["model=tiny-gpt2", "layers=[0]", f"corpus={text_file}", "tokens=256", "seq_len=32", "progress=false"]
    key = arg.split("=")[0]
    code, out, err = _cli([a for a in argv if not a.startswith(f"{key}=")] + [arg], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_module_entry_point_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "locate_edit.stats", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "usage: python -m locate_edit.stats" in out.stdout
