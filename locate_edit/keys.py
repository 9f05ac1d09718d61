"""Keys: context templates (generated once per model, cached), the subject's last token, and k* — the input of
an MLP output projection at the subject's last token, averaged over context templates (Meng et al. 2022, §3.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import ModelAdapter, WeightRef
from mend.adapters.partial import run_until
from mend.data.text import sampling_prefix
from mend.hooks import capture
from mend.io import write_json
from mend.models import fingerprint
from mend.paths import cache_dir
from mend.requests import EditRequest

log = logging.getLogger(__name__)
OPENINGS = ("The", "Therefore", "Because", "I", "You")


def context_templates(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: Sequence[Sequence[int]] = ((10, 5),),
    seed: int = 0, cache: bool = True,
) -> list[str]:
    """``["{}"]`` plus, for each ``(length, n)`` in ``spec``, n short texts sampled from the model (top-k 5) ending
    in ``". {}"``: the prefixes ROME averages keys and values over. Cached per model fingerprint.

    Sampling starts after the document-start token (:func:`mend.data.text.document_start_ids`), which is not part
    of the template: without it SmolLM2 writes prefixes like "The-the-best-fantasy-f." instead of text."""
    spec = [tuple(int(x) for x in s) for s in spec]
    head = sampling_prefix(model, tok)
    key = hashlib.sha256(json.dumps([fingerprint(model), spec, seed, head]).encode()).hexdigest()[:16]
    path = cache_dir() / "templates" / f"{key}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    out = ["{}"]
    gen = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for length, n in spec:
        for i in range(n):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = torch.tensor([head + tok(OPENINGS[i % len(OPENINGS)]).input_ids], device=model.device)
            with torch.no_grad():
                ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     max_new_tokens=length, pad_token_id=pad)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(" ".join(text.split()) + ". {}")
    if cache:
        write_json(path, out)
    return out


def fill(template: str, request: EditRequest) -> tuple[str, tuple[int, int]]:
    """The text of ``template`` around the request's prompt with the subject filled in, and the subject's span."""
    prompt = template.replace("{}", request.prompt)
    start = prompt.index("{}")
    return prompt.replace("{}", request.subject, 1), (start, start + len(request.subject))


def last_token_index(tok: PreTrainedTokenizerBase, text: str, span: tuple[int, int]) -> int:
    """Index of the token that holds the last character of ``span`` in ``tok(text)``."""
    enc = tok(text, return_offsets_mapping=True)
    end = span[1]
    best = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a == b:  # special tokens
            continue
        if a < end:
            best = i
    if best is None:
        raise ValueError(f"subject span {span} not found in the tokens of {text!r}")
    return best


def subject_rows(tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str],
                 ) -> tuple[list[str], list[int]]:
    """Every request in every template (request-major), with the index of the subject's last token in each."""
    texts, pos = [], []
    for r in requests:
        for t in templates:
            text, span = fill(t, r)
            texts.append(text)
            pos.append(last_token_index(tok, text, span))
    return texts, pos


@torch.no_grad()
def keys_at(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ModelAdapter, ref: WeightRef,
    texts: Sequence[str], positions: Sequence[int], batch_size: int = 32,
) -> torch.Tensor:
    """(n, d_in) inputs of ``ref``'s module at one token per text; the forward pass stops at that module."""
    return module_io_at(model, tok, adapter, adapter.module(ref), texts, positions, batch_size, output=False)


@torch.no_grad()
def module_io_at(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ModelAdapter, module: torch.nn.Module,
    texts: Sequence[str], positions: Sequence[int], batch_size: int = 32, output: bool = False,
) -> torch.Tensor:
    """(n, d) input (or output) of ``module`` at one token per text; the forward pass stops at that module."""
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok(list(texts[s : s + batch_size]), return_tensors="pt", padding=True, padding_side="right").to(model.device)
        kwargs = dict(enc)
        if adapter.is_encoder_decoder:
            kwargs["decoder_input_ids"] = torch.full((len(enc.input_ids), 1), model.config.decoder_start_token_id,
                                                     device=model.device)
        with capture({"m": module}, inputs=not output, outputs=output) as cap:
            run_until(model, module, **kwargs)
        k = cap["m"].output if output else cap["m"].input  # (B, T, d)
        rows = torch.arange(k.shape[0], device=k.device)
        out.append(k[rows, torch.as_tensor(positions[s : s + batch_size], device=k.device)])
    return torch.cat(out).float()


def request_keys(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ModelAdapter, ref: WeightRef,
    requests: Sequence[EditRequest], templates: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d_in) keys averaged over ``templates`` and (n, d_in) keys of each request's own prompt."""
    texts, pos = subject_rows(tok, requests, templates)
    k = keys_at(model, tok, adapter, ref, texts, pos).view(len(requests), len(templates), -1)
    own = [i for i, t in enumerate(templates) if t == "{}"]
    bare = k[:, own[0]] if own else request_keys(model, tok, adapter, ref, requests, ["{}"])[0]
    return k.mean(1), bare
