"""The ``serac`` editor: the requests go into a memory; a forward patch on the base model's body classifies every
input against the memory and, for inputs in an edit's scope, recomputes their hidden states with the edit's fact
written before them (the counterfactual model is the base model conditioned on the edit in context). Inputs out of
every edit's scope get exactly the base model's outputs. The weights are never changed. In a cached generation
the first pass decides the scope, and each later token of an in-scope row is computed in context too."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.editor import Editor, EditResult, ForwardPatch
from mend.errors import ConfigError, MendError
from mend.learned.run_dir import check_model
from mend.learned.serac.scope import ScopeClassifier, pool, text_features
from mend.requests import EditRequest

CONTEXT = "{fact}.\n"  # how an edit is written before an input in its scope


@dataclass
class SeracConfig:
    checkpoint: str | None = None  # a run directory of python -m mend.train configs/train/serac.yaml
    threshold: float | None = field(default=None, metadata={"min": 0.0, "max": 1.0})  # None: the trained one


def fact_text(r: EditRequest) -> str:
    return CONTEXT.format(fact=f"{r.text}{r.target_new}")


class SeracEditor(Editor):
    name = "serac"
    Config = SeracConfig

    def __init__(self, config: SeracConfig | None = None, classifier: ScopeClassifier | None = None,
                 info: Any = None):
        super().__init__(config)
        self._classifier, self._info = classifier, info
        self._checked: int | None = None  # id of the model whose fingerprint matched
        self.reset()

    def reset(self) -> None:
        self._emb: torch.Tensor | None = None  # (N, dim) embeddings of the stored edits
        self._facts: list[list[int]] = []  # token ids of each stored edit's context

    def _load(self, model: PreTrainedModel) -> ScopeClassifier:
        if self._classifier is None:
            if not self.config.checkpoint:
                raise ConfigError("editor 'serac' needs editor.checkpoint=RUN_DIR (a run directory of python -m "
                                  "mend.train configs/train/serac.yaml)")
            from mend.learned.serac.run import load_serac

            self._classifier, self._info = load_serac(self.config.checkpoint)
        if self._info is not None and self._checked != id(model):
            check_model(self.name, self._info.model, self._info.fingerprint, self.config.checkpoint or "memory", model)
            self._checked = id(model)
        return self._classifier.to(model.device)

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self._load(model)

    def edit(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             requests: list[EditRequest]) -> EditResult:
        t0 = time.perf_counter()
        if getattr(model.config, "is_encoder_decoder", False):
            raise MendError("the serac editor supports decoder-only models (its counterfactual model reads the edit "
                            "in context)")
        classifier = self._load(model)
        with torch.no_grad():
            feats = text_features(model, tokenizer, [r.text for r in requests], classifier.cfg.layer)
            emb = classifier.embed(feats.to(model.device))
        self._emb = emb if self._emb is None else torch.cat([self._emb, emb])
        self._facts += [tokenizer(fact_text(r), add_special_tokens=False).input_ids for r in requests]
        threshold = classifier.cfg.threshold if self.config.threshold is None else self.config.threshold
        prefix = model.base_model_prefix
        if not isinstance(getattr(model, prefix, None), torch.nn.Module):
            raise MendError(f"{type(model).__name__} has no body module '{prefix}' to patch")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        wrap = _scoped_forward(classifier, self._emb.clone(), list(self._facts), threshold, pad)
        return EditResult({}, {"memory": len(self._facts)}, time.perf_counter() - t0,
                          patches={"serac": ForwardPatch(prefix, wrap)})


def _has_past(past: Any) -> bool:
    if past is None:
        return False
    get_len = getattr(past, "get_seq_length", None)
    return bool(get_len() > 0) if callable(get_len) else len(past) > 0


@dataclass
class _Scoped:
    """The in-scope rows of a cached generation: each row's fact and its tokens so far."""

    rows: list[int]
    facts: list[list[int]]
    tokens: list[torch.Tensor]


def _in_context(forward: Callable[..., Any], facts: list[list[int]], tokens: list[torch.Tensor], last: list[int],
                pad: int) -> list[torch.Tensor]:
    """The base model's final hidden states of each ``tokens[j]`` read after ``facts[j]``: the last ``last[j]``
    positions of each row (one uncached pass over fact + tokens)."""
    ref = tokens[0]
    length = max(len(f) + len(t) for f, t in zip(facts, tokens, strict=True))
    ids = torch.full((len(facts), length), pad, dtype=ref.dtype, device=ref.device)
    am = torch.zeros_like(ids)
    for j, (f, t) in enumerate(zip(facts, tokens, strict=True)):
        row = torch.cat([torch.tensor(f, dtype=ids.dtype, device=ids.device), t])
        ids[j, : len(row)], am[j, : len(row)] = row, 1
    ctx = forward(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
    return [ctx[j, len(f) + len(t) - k : len(f) + len(t)] for j, (f, t, k) in enumerate(zip(facts, tokens, last,
                                                                                               strict=True))]


def _replaced(out: Any, rows: list[int], positions: list[torch.Tensor], states: list[torch.Tensor]) -> Any:
    """``out`` with the final hidden states of each row ``rows[j]`` at ``positions[j]`` (a mask) set to
    ``states[j]``."""
    hidden = out.last_hidden_state.clone()
    for i, m, h in zip(rows, positions, states, strict=True):
        hidden[i, m] = h.to(hidden.dtype)
    out.last_hidden_state = hidden
    return out


def _scoped_forward(classifier: ScopeClassifier, memory: torch.Tensor, facts: list[list[int]], threshold: float,
                    pad: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    layer = classifier.cfg.layer
    generations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache object -> _Scoped

    def later_step(forward: Callable[..., Any], kwargs: dict[str, Any], scoped: _Scoped) -> Any:
        """A cached generation's next tokens: the cache serves the rows out of scope; the rows in scope are run
        again in context with every token so far (no cache: their cache holds the prompt without the fact)."""
        out = forward(**kwargs)
        new = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        keep = [mask[i, -new.shape[1]:].bool() if mask is not None else torch.ones_like(new[i], dtype=torch.bool)
                for i in scoped.rows]
        scoped.tokens = [torch.cat([t, new[i][k]]) for t, i, k in zip(scoped.tokens, scoped.rows, keep, strict=True)]
        states = _in_context(forward, scoped.facts, scoped.tokens, [int(k.sum()) for k in keep], pad)
        return _replaced(out, scoped.rows, keep, states)

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and "input_ids" not in kwargs:  # GPT-2's head passes input_ids by position
                args, kwargs = (), {**kwargs, "input_ids": args[0]}
            input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers ≥ 5.x: cache
            if args or input_ids is None or kwargs.get("inputs_embeds") is not None or kwargs.get("return_dict") is False:
                return forward(*args, **kwargs)  # positional arguments, embeddings, tuples: the base model
            if _has_past(past):  # a cached generation's later steps
                scoped = generations.get(past)
                return forward(**kwargs) if scoped is None else later_step(forward, kwargs, scoped)
            wanted = kwargs.get("output_hidden_states")
            out = forward(**{**kwargs, "output_hidden_states": True})
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            with torch.no_grad():
                idx, prob = classifier.retrieve(classifier.embed(pool(out.hidden_states[layer], mask)), memory)
            if not wanted:  # the output the caller asked for (ModelOutput keeps a key set to None)
                out = type(out)(**{k: v for k, v in out.items() if k != "hidden_states"})
            rows = (prob > threshold).nonzero().flatten().tolist()
            if not rows:
                return out
            scoped = _Scoped(rows, [facts[int(idx[i])] for i in rows], [input_ids[i][mask[i].bool()] for i in rows])
            states = _in_context(forward, scoped.facts, scoped.tokens, [len(t) for t in scoped.tokens], pad)
            out = _replaced(out, rows, [mask[i].bool() for i in rows], states)
            # generation goes on from this cache (the one passed in, or the one the body made): keep the rows in
            # scope for its next steps. Beam search reorders the cache, not these rows: greedy and sampling only
            for cache in {id(c): c for c in (past, getattr(out, "past_key_values", None)) if c is not None}.values():
                generations[cache] = scoped
            return out

        return patched

    return wrap
