"""One evaluator for every editor: measure the unedited model, edit (single / batch / sequential), measure, restore.

It never looks at the editor's name: every editor satisfies the same contract (``edit`` returns deltas).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics.aggregation import MeanMetric
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.editor import AppliedEdit, Editor, apply_edit
from mend.evaluation.measure import Reference, measure, text_nll
from mend.evaluation.metrics import fluency, harmonic_mean, perplexity, relative_increase
from mend.requests import EditRequest

log = logging.getLogger(__name__)
MODES = ("single", "batch", "sequential")
RECORD_KEYS = ("efficacy", "generalization", "locality", "neighborhood", "edit_success", "loc_accuracy", "kl_locality",
               "portability")


@dataclass
class EvalSettings:
    mode: str = "single"
    score_batch_size: int = 16  # prompts per forward pass when scoring
    curve_every: int = 0  # sequential mode: measure every N edits (0: about ten points)
    generation: bool = False  # free generations for the fluency metric
    generation_tokens: int = 50
    seed: int = 0
    drawdown_samples: int = 20  # single mode: perplexity after this many edits spread over the run (0: all)
    batch_size: int = 1  # sequential mode: requests per edit (each edit applied on top of the earlier ones)


@dataclass
class EditorRun:
    metrics: dict[str, float | None]
    records: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)


class Evaluator:
    """Holds the model, the requests, the perplexity text and the unedited model's references."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        style: str,
        text_chunks: torch.Tensor | None = None,
        settings: EvalSettings | None = None,
        progress: bool = True,
    ):
        self.model, self.tok, self.requests, self.style = model, tok, list(requests), style
        self.text_chunks = text_chunks
        self.s = settings or EvalSettings()
        self.progress = progress
        self._pre: EditorRun | None = None
        self._refs: list[Reference] = []
        self._rejected = 0
        self._pre_ppl: float | None = None

    # --- measurements ----------------------------------------------------------------------------------------
    def _ppl(self) -> float | None:
        if self.text_chunks is None or not len(self.text_chunks):
            return None
        return perplexity(*text_nll(self.model, self.text_chunks, self.s.score_batch_size))

    def _fluency(self, reqs: Sequence[EditRequest]) -> list[float | None]:
        if not self.s.generation:
            return [None] * len(reqs)
        out = []
        for r in reqs:
            texts = [self._generate(p) for p in r.generation_prompts]
            out.append(fluency(texts))
        return out

    @torch.no_grad()
    def _generate(self, prompt: str) -> str:
        enc = self.tok(prompt, return_tensors="pt").to(self.model.device)
        torch.manual_seed(self.s.seed)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        out = self.model.generate(**enc, max_new_tokens=self.s.generation_tokens, do_sample=True, top_k=5,
                                  pad_token_id=pad)
        start = 0 if self.model.config.is_encoder_decoder else enc.input_ids.shape[1]
        return prompt + self.tok.decode(out[0, start:], skip_special_tokens=True)

    def _measure(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        """Records for requests ``idx``, against the unedited references once pre() has run."""
        return self._measure_with_refs(idx)[0]

    def _measure_with_refs(self, idx: Sequence[int]) -> tuple[list[dict[str, Any]], list[Reference]]:
        reqs = [self.requests[i] for i in idx]
        refs = [self._refs[i] for i in idx] if self._refs else None
        recs, new_refs = measure(self.model, self.tok, reqs, self.style, refs, self.s.score_batch_size)
        for i, rec, flu in zip(idx, recs, self._fluency(reqs)):
            rec["id"] = self.requests[i].meta.get("case_id", i)
            rec["fluency"] = flu
        return recs, new_refs

    def pre(self) -> EditorRun:
        """The unedited model's metrics (computed once; also keeps the references for KL and zsRE locality)."""
        if self._pre is None:
            recs, self._refs = self._measure_with_refs(range(len(self.requests)))
            self._pre_ppl = self._ppl()
            self._pre = EditorRun(self._aggregate(recs, None), recs)
            self._pre.metrics["ppl"] = self._pre_ppl
        return self._pre

    def _aggregate(self, recs: list[dict[str, Any]], drawdown: float | None, seconds: float | None = None,
                   ) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key in (*RECORD_KEYS, "fluency"):
            m = MeanMetric().set_dtype(torch.float64)
            for r in recs:
                if r.get(key) is not None:
                    m.update(float(r[key]))
            out[key] = float(m.compute()) if m.update_count else None
        out["score"] = harmonic_mean([out["efficacy"], out["generalization"], out["locality"]])
        if self._pre is not None and out["loc_accuracy"] is not None:
            pre_acc = _mean_of(self._pre.records, "loc_accuracy", [r["id"] for r in recs])
            out["drawdown_acc"] = None if pre_acc is None else pre_acc - out["loc_accuracy"]
        out["drawdown_ppl"] = drawdown
        if seconds is not None:
            out["seconds_per_edit"] = seconds
        out["n"] = len(recs)
        return out

    def _drawdown(self) -> float | None:
        post = self._ppl()
        return None if post is None or self._pre_ppl is None else relative_increase(post, self._pre_ppl)

    # --- modes -----------------------------------------------------------------------------------------------
    def run(self, editor: Editor, mode: str | None = None) -> EditorRun:
        mode = mode or self.s.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.pre()
        editor.prepare(self.model, self.tok)  # statistics and other caches: not part of seconds_per_edit
        editor.reset()
        self._rejected = 0
        try:
            out = {"single": self._single, "batch": self._batch, "sequential": self._sequential}[mode](editor)
        finally:
            editor.reset()
        out.metrics["rejected_edits"] = self._rejected  # updates the editor's guard refused (their requests unedited)
        return out

    def _edit(self, editor: Editor, idx: Sequence[int]) -> tuple[AppliedEdit, float]:
        t0 = time.perf_counter()
        result = editor.edit(self.model, self.tok, [self.requests[i] for i in idx])
        seconds = time.perf_counter() - t0
        for reason in result.diagnostics.get("rejected") or []:  # said, not silently scored as an edit
            self._rejected += 1
            log.warning("%s, %d request(s): %s", editor.name, len(idx), reason)
        return apply_edit(self.model, result), seconds

    def _bar(self, n: int, desc: str) -> tqdm:
        return tqdm(total=n, desc=desc, disable=not self.progress, leave=False)

    def groups(self) -> list[list[int]]:
        """Requests edited together in single mode: those sharing ``meta["group"]`` (e.g. an MQuAKE case)."""
        out: dict[Any, list[int]] = {}
        for i, r in enumerate(self.requests):
            out.setdefault(r.meta.get("group", ("__own__", i)), []).append(i)
        return list(out.values())

    def _single(self, editor: Editor) -> EditorRun:
        recs, seconds, drawdowns = [], 0.0, []
        groups = self.groups()
        k = self.s.drawdown_samples
        stride = max(1, len(groups) // k) if k > 0 else 1  # perplexity is the costliest measurement
        with self._bar(len(groups), f"{editor.name} single") as bar:
            for g, idx in enumerate(groups):
                handle, dt = self._edit(editor, idx)
                try:
                    seconds += dt
                    recs.extend(self._measure(idx))
                    if g % stride == 0:
                        drawdowns.append(self._drawdown())
                finally:
                    handle.restore()
                editor.reset()
                bar.update()
        dd = [d for d in drawdowns if d is not None]
        return EditorRun(self._aggregate(recs, sum(dd) / len(dd) if dd else None, seconds / len(self.requests)), recs)

    def _batch(self, editor: Editor) -> EditorRun:
        idx = list(range(len(self.requests)))
        handle, seconds = self._edit(editor, idx)
        try:
            recs = self._measure(idx)
            dd = self._drawdown()
        finally:
            handle.restore()
        return EditorRun(self._aggregate(recs, dd, seconds / len(idx)), recs)

    def _sequential(self, editor: Editor) -> EditorRun:
        """Edits of ``batch_size`` requests each, one on top of the other; the curve is measured (over the
        requests edited so far) after the first edit that reaches each multiple of ``curve_every`` requests."""
        n, size = len(self.requests), self.s.batch_size
        every = self.s.curve_every or max(1, n // 10)
        handles: list[AppliedEdit] = []
        seconds, curve = 0.0, []
        try:
            with self._bar(n, f"{editor.name} sequential") as bar:
                for start in range(0, n, size):
                    idx = list(range(start, min(start + size, n)))
                    handle, dt = self._edit(editor, idx)
                    handles.append(handle)
                    seconds += dt
                    bar.update(len(idx))
                    done = idx[-1] + 1
                    if done < n and done // every > start // every:
                        curve.append(self._point(done, seconds))
            recs = self._measure(list(range(n)))
            metrics = self._aggregate(recs, self._drawdown(), seconds / n)
            curve.append({"edits": n, **{k: metrics[k] for k in _CURVE_KEYS}})
        finally:
            for h in reversed(handles):  # each handle holds the weights as they were before its edit
                h.restore()
        return EditorRun(metrics, recs, curve)

    def _point(self, k: int, seconds: float) -> dict[str, Any]:
        m = self._aggregate(self._measure(list(range(k))), self._drawdown(), seconds / k)
        return {"edits": k, **{key: m[key] for key in _CURVE_KEYS}}


_CURVE_KEYS = ("efficacy", "generalization", "locality", "score", "drawdown_ppl", "kl_locality")


def _mean_of(recs: list[dict[str, Any]], key: str, ids: list[Any]) -> float | None:
    wanted = set(ids)
    vals = [r[key] for r in recs if r["id"] in wanted and r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None
