"""The MEND editor: a trained hypernetwork (``python -m mend.train``) turns the edit's gradient factors into
``ΔW = −α Σ_t δ̃_t ũ_tᵀ`` for each edited weight. Several requests in one call are one edit (their factors are
summed, as in training). One forward and one partial backward per call: no optimisation at edit time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.adapters import WeightRef, get_adapter
from mend.editor import Editor, EditResult
from mend.errors import ConfigError, MendError
from mend.learned.factors import edit_factors
from mend.learned.hypernet import HypernetConfig, MendHypernet
from mend.learned.run_dir import EditedWeight, EditorInfo, check_model, load_editor
from mend.models import fingerprint
from mend.moments import input_moments
from mend.requests import EditRequest
from mend.scoring import make_batch


@dataclass
class MendConfig:
    checkpoint: str | None = None  # a run directory written by python -m mend.train
    scale: float = 1.0  # multiplies every ΔW at edit time (> 1: stronger edits, < 1: more local ones)


class MendEditor(Editor):
    name = "mend"
    Config = MendConfig

    def __init__(self, config: MendConfig | None = None, hypernet: MendHypernet | None = None,
                 info: EditorInfo | None = None):
        """From ``config.checkpoint`` (loaded on first use), or from an in-memory hypernetwork and its info."""
        super().__init__(config)
        self._hypernet, self._info = hypernet, info
        self._checked: int | None = None  # id of the model whose fingerprint matched

    @property
    def info(self) -> EditorInfo:
        self._load()
        assert self._info is not None
        return self._info

    def _load(self) -> None:
        if self._hypernet is not None:
            return
        if not self.config.checkpoint:
            raise ConfigError(f"editor '{self.name}' needs editor.checkpoint=RUN_DIR (a run directory of python -m "
                              f"mend.train{'' if self.name == 'mend' else ' method=' + self.name})")
        self._hypernet, self._info = load_editor(self.config.checkpoint, method=self.name)

    def _check(self, model: PreTrainedModel) -> MendHypernet:
        self._load()
        assert self._hypernet is not None and self._info is not None
        if self._checked != id(model):
            check_model(self.name, self._info.model, self._info.fingerprint, self.config.checkpoint or "memory", model)
            self._checked = id(model)
        if next(self._hypernet.parameters()).device != model.device:
            self._hypernet.to(model.device)
        return self._hypernet

    def prepare(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self._check(model)

    def edit(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]
    ) -> EditResult:
        t0 = time.perf_counter()
        hypernet = self._check(model).eval()
        adapter = get_adapter(model)
        refs = [adapter.weight_ref(w.layer, w.kind, w.stack) for w in self.info.weights]
        batch = make_batch(tokenizer, [r.text for r in requests], [r.target_new for r in requests], model)
        factors, _ = edit_factors(model, adapter, refs, batch, len(requests), positions=hypernet.cfg.positions)
        with torch.no_grad():
            scale = self.config.scale
            deltas = {ref: (scale * hypernet.delta(ref.label, *factors[ref.label])).to(adapter.get_weight(ref).dtype)
                      for ref in refs}
            alphas = {ref.label: hypernet.alpha(ref.label).item() for ref in refs}
        return EditResult(deltas, {"alpha": alphas, "tokens": int(batch.inputs["attention_mask"].sum())},
                          time.perf_counter() - t0)


def untrained_editor(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, refs: list[WeightRef],
                     hcfg: HypernetConfig, warm_requests: list[EditRequest],
                     text_ids: torch.Tensor | None = None) -> MendEditor:
    """The hypernetwork at initialisation on ``refs``, ready to edit: its input statistics filled from the
    gradient factors of ``warm_requests``, and its preconditioner P (when ``hcfg.precondition``) from the
    second moment of the edited inputs over ``text_ids`` ``(n, seq)``. For latency and contract checks."""
    adapter = get_adapter(model)
    info = EditorInfo(str(model.config.name_or_path), fingerprint(model),
                      [EditedWeight(r.stack, r.layer, r.kind, *adapter.get_weight(r).shape) for r in refs], hcfg)
    hypernet = MendHypernet(info.specs(), hcfg)
    batch = make_batch(tokenizer, [r.text for r in warm_requests], [r.target_new for r in warm_requests], model)
    factors, _ = edit_factors(model, adapter, refs, batch, len(warm_requests), positions=hcfg.positions)
    for label, (u, d) in factors.items():
        hypernet.update_stats(label, u, d)
    if hcfg.precondition:
        if text_ids is None:
            raise MendError("a preconditioned editor needs text_ids for its preconditioner")
        for label, C in input_moments(model, text_ids, refs).items():
            hypernet.set_preconditioner(label, C)
    return MendEditor(hypernet=hypernet.eval(), info=info)
