"""Causal tracing (Meng et al. 2022, §2): which hidden states carry a fact from the subject to the prediction.

Three kinds of run per fact. *Clean*: the prompt as is; every hidden state is recorded and the model's own
prediction is the answer whose probability p* is measured. *Corrupted*: Gaussian noise of standard deviation ν is
added to the input embeddings of the subject's tokens (``samples`` draws; p* is the mean over them). *Restored*:
corrupted, except that one hidden state at one token is set back to its clean value — a block's output (the
residual stream), or the MLP / attention outputs of a window of ``window`` layers around a layer (clipped at the
ends of the layer range, as the reference code does). The indirect effect of that state is
p*(restored) − p*(corrupted).

Decoder-only models are traced over the whole prompt; T5 over its encoder at the encoder's tokens, the answer
being the decoder's first token. Restoring a token before the subject changes nothing (its states are clean in the
corrupted run too), so its effect is exactly 0 and not computed. The forward passes are in
:mod:`locate_edit.trace.engine`; the command is ``python -m locate_edit.trace`` (:mod:`locate_edit.trace.cli`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import ModelAdapter, get_adapter
from mend.errors import ConfigError, MendError
from mend.hooks import capture
from mend.requests import EditRequest
from mend.scoring import head_logits, split_head

log = logging.getLogger(__name__)

KINDS = ("residual", "mlp", "attn")


@dataclass(frozen=True)
class Fact:
    """A prompt to trace: its text, the subject's character span in it, and optionally the expected answer."""

    text: str
    span: tuple[int, int]
    expected: str | None = None  # the true object, when known (to keep only facts the model predicts)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def subject(self) -> str:
        return self.text[self.span[0]:self.span[1]]

    @classmethod
    def from_request(cls, req: EditRequest) -> Fact:
        """The request's prompt with its subject; the expected answer is its true target (CounterFact) or, without
        one, its target (ROME's known facts, whose target is the known attribute)."""
        return cls(req.text, req.subject_span, req.target_true or req.target_new, dict(req.meta))


@dataclass
class TraceSettings:
    samples: int = 1  # noise draws per fact (each costs a full trace: on CPU one draw over many facts is the
    #                   affordable default; per-fact heatmaps look cleaner with 3-10)
    window: int = 10  # layers restored together for the mlp and attn kinds
    kinds: tuple[str, ...] = KINDS
    batch_tokens: int = 2048  # tokens per forward pass (rows × sequence length)
    layer_group: int = 8  # decoder-only: restorations whose first changed block falls in the same group of this
    #                       many layers share a forward pass that starts at the group's first block (SmolLM2,
    #                       s / fact: 2 → 7.9, 4 → 6.1, 8 → 5.3)
    fast: bool = True  # decoder-only: prefix caches and partial passes (same numbers, several times faster)
    onednn: bool = True  # float32 on CPU: linear layers through oneDNN (mend.onednn; 2× MKL on AMD CPUs)

    def check(self) -> None:
        for name in ("samples", "window", "batch_tokens", "layer_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(self.kinds)}")


@dataclass
class FactTrace:
    """The causal trace of one fact: indirect effects per kind, shape (tokens, layers)."""

    text: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]  # token indices [first, last + 1) of the subject
    answer: str  # the clean model's prediction (one token)
    answer_id: int
    expected: str | None
    p_clean: float
    p_corrupted: float
    effects: dict[str, torch.Tensor]  # kind -> (T, L) p*(restored) − p*(corrupted)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "subject": self.subject, "tokens": self.tokens,
                "subject_range": list(self.subject_range), "answer": self.answer, "answer_id": self.answer_id,
                "expected": self.expected, "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
                "effects": {k: v.tolist() for k, v in self.effects.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FactTrace:
        return cls(d["text"], d["subject"], list(d["tokens"]), tuple(d["subject_range"]), d["answer"],
                   int(d["answer_id"]), d.get("expected"), float(d["p_clean"]), float(d["p_corrupted"]),
                   {k: torch.tensor(v, dtype=torch.float32) for k, v in d["effects"].items()})


State = tuple[str, int, int]  # (kind, layer, token): one hidden state to restore


class Tracer:
    """Model plumbing shared by the engines: which stack is traced, its modules, and next-token probabilities."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase):
        self.model, self.tok = model, tok
        self.adapter: ModelAdapter = get_adapter(model)
        self.enc_dec = self.adapter.is_encoder_decoder
        self.stack = "encoder" if self.enc_dec else self.adapter.default_stack
        self.n_layers = self.adapter.num_layers(self.stack)
        self.tuple_lens: dict[int, int] = {}  # layer -> block_output_len, probed once (partial passes)

    def module(self, kind: str, layer: int) -> nn.Module:
        if kind == "residual":
            return self.adapter.block(layer, self.stack)
        if kind == "mlp":
            return self.adapter.mlp_module(layer, self.stack)
        return self.adapter.attn_module(layer, self.stack)

    def window(self, kind: str, layer: int, window: int) -> range:
        """Layers restored for a restoration of ``kind`` at ``layer``: one block output, or a clipped window."""
        if kind == "residual":
            return range(layer, layer + 1)
        return range(max(0, layer - window // 2), min(self.n_layers, layer - (-window // 2)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) input embeddings of (B, T) ids, as the model's embedding module makes them (scaled for Gemma)."""
        return self.adapter.embedding()(ids.to(self.model.device))

    def next_token_probs(self, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """(B, V) float32 probabilities of the next token after the prompt (decoder-only: at its last position; T5:
        the decoder's first token) from (B, T, d) input embeddings."""
        if self.enc_dec:
            start = torch.full((embeds.shape[0], 1), self.model.config.decoder_start_token_id,
                               device=embeds.device)
            logits = self.model(inputs_embeds=embeds, decoder_input_ids=start, use_cache=False).logits[:, 0]
        else:
            base, _ = split_head(self.model)
            hidden = base(inputs_embeds=embeds, **{"use_cache": False, **kwargs}).last_hidden_state[:, -1]
            logits = head_logits(self.model, hidden)
        return torch.softmax(logits.float(), dim=-1)


@dataclass
class Prepared:
    """A fact tokenised for the traced stack."""

    ids: torch.Tensor  # (T,)
    subject: tuple[int, int]  # token range [s0, s1)
    tokens: list[str]


def prepare(tok: PreTrainedTokenizerBase, fact: Fact) -> Prepared:
    """Token ids of the fact's text and the tokens whose characters overlap the subject."""
    enc = tok(fact.text, return_offsets_mapping=True)
    start, end = fact.span
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < b and a < end and b > start]
    if not inside:
        raise MendError(f"subject {fact.subject!r} not found among the tokens of {fact.text!r}")
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return Prepared(ids, (inside[0], inside[-1] + 1), [tok.decode([int(i)]) for i in ids])


@dataclass
class FactRun:
    """What the engines need about one fact: inputs, answer, clean states and the noisy embeddings."""

    prep: Prepared
    answer: int
    p_clean: float
    clean: dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> (T, d) clean output of that module
    noisy: torch.Tensor  # (S, T, d) input embeddings with noise on the subject's tokens


@torch.inference_mode()
def fact_run(tr: Tracer, fact: Fact, noise_std: float, samples: int, seed: int, kinds: Sequence[str] = KINDS,
             answer: int | None = None) -> FactRun:
    """The clean run (every module output of ``kinds`` recorded; the answer is the model's prediction unless
    given) and ``samples`` noisy copies of the input embeddings (noise drawn from a generator seeded by ``seed``)."""
    prep = prepare(tr.tok, fact)
    emb = tr.embed(prep.ids[None])  # (1, T, d)
    mods = {(k, layer): tr.module(k, layer) for k in kinds for layer in range(tr.n_layers)}
    with capture({f"{k}.{layer}": m for (k, layer), m in mods.items()}, inputs=False, outputs=True) as cap:
        probs = tr.next_token_probs(emb)[0]
    clean = {(k, layer): cap[f"{k}.{layer}"].output[0] for k, layer in mods}
    answer = int(probs.argmax()) if answer is None else answer
    s0, s1 = prep.subject
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, s1 - s0, emb.shape[-1]), generator=gen) * noise_std  # (S, n_subj, d)
    noisy = emb.repeat(samples, 1, 1)
    noisy[:, s0:s1] += noise.to(device=emb.device, dtype=emb.dtype)
    return FactRun(prep, answer, float(probs[answer]), clean, noisy)


def trace_fact(model: PreTrainedModel, tok: PreTrainedTokenizerBase, fact: Fact, noise_std: float,
               settings: TraceSettings | None = None, seed: int = 0, answer: int | None = None,
               tracer: Tracer | None = None) -> FactTrace:
    """The causal trace of one fact: for every kind, token from the subject's first on, and layer, the indirect
    effect of restoring that state."""
    from locate_edit.trace.engine import corrupted_probs, restored_probs

    s = settings or TraceSettings()
    s.check()
    tr = tracer or Tracer(model, tok)
    run = fact_run(tr, fact, noise_std, s.samples, seed, s.kinds, answer)
    T, L = len(run.prep.ids), tr.n_layers
    p_corr = corrupted_probs(tr, run).mean().item()
    todo = [(k, layer, t) for k in s.kinds for t in range(run.prep.subject[0], T) for layer in range(L)]
    p = restored_probs(tr, run, todo, s)  # (len(todo),)
    effects = {k: torch.zeros(T, L) for k in s.kinds}
    for (k, layer, t), v in zip(todo, p.tolist()):
        effects[k][t, layer] = v - p_corr
    return FactTrace(fact.text, fact.subject, run.prep.tokens, run.prep.subject, tr.tok.decode([run.answer]),
                     run.answer, fact.expected, run.p_clean, p_corr, effects)


@torch.inference_mode()
def embedding_std(model: PreTrainedModel, tok: PreTrainedTokenizerBase, facts: Sequence[Fact]) -> float:
    """Standard deviation of the input embeddings over every subject token of ``facts``: the unit of the noise
    (the paper uses 3 × this)."""
    tr = Tracer(model, tok)
    rows = []
    for f in facts:
        prep = prepare(tok, f)
        rows.append(tr.embed(prep.ids[None])[0, prep.subject[0]:prep.subject[1]].float())
    if not rows:
        raise MendError("no facts to measure the embedding scale on")
    return float(torch.cat(rows).std())

