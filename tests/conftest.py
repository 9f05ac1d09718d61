"""Shared helpers: tiny random models only (no network, no real weights)."""

from __future__ import annotations

import pytest
import torch

from mend.models import load_model

DECODER_ONLY = ("tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3")
ALL_TINY = (*DECODER_ONLY, "tiny-t5")


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (and far faster than two on a busy machine); real-model tests
    keep the default."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    """Factory: a freshly built tiny model (eval mode, requires_grad False) and its byte tokenizer.

    A fresh model per call, because tests change dtypes, requires_grad flags and weights.
    """

    def make(name: str):
        torch.manual_seed(0)
        return load_model(name)

    return make


def param_clones(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_identical(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = dict(model.named_parameters())
    assert current.keys() == saved.keys()
    changed = [n for n, p in current.items() if not torch.equal(p.detach(), saved[n])]
    assert not changed, f"parameters not restored bit for bit: {changed[:5]}"


# --- statistics tests: opt in with `pytestmark = pytest.mark.usefixtures("isolated_cache")` ---
WORDS = ("the tower stands in a city by the river and many people visit it every year while others "
         "write about its long history of builders kings wars trade music and the quiet streets nearby").split()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets an empty cache and data folder (no WikiText: `auto` means `self`)."""
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEND_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def text_file(tmp_path):
    """About 6000 bytes of text (6000 tokens for the byte tokenizer of the tiny models)."""
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=gen)) for _ in range(100)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_command(main, usage: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command's ``main`` through :func:`mend.cli.run` as the shell would: (exit code, stdout, stderr)."""
    from mend.cli import run

    with pytest.raises(SystemExit) as exc:
        run(main, usage, argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err
