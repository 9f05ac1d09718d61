"""Values: the vector a module should output at the subject's last token so that the model predicts the new
target (ROME's v*, MEMIT's z). A delta δᵢ per request is added to ``module``'s output at the subject's last token
in every context template and optimised with Adam (as in the reference) on

    Σᵢ [ mean NLL(targetᵢ) + kl_factor · KL(p ‖ p₀ on "{subject} is a") + weight_decay · ‖δᵢ‖ / ‖v₀ᵢ‖² ],

clamped to ‖δᵢ‖ ≤ clamp_norm_factor · ‖v₀ᵢ‖ (Meng et al. 2022, eq. 4 and reference code). The blocks below the
edited one do not depend on δ: their output is computed once and every step runs only the blocks above. Nor do
the tokens before each row's subject: they run once, their keys and values are kept, and every step runs only the
rest of the row (``prefix_cache``, locate_edit.prefix). ``shrink_steps`` then scales each δ that met the stop down
to the smallest fraction that still meets it (the last Adam step overshoots; an update's effect on other text
grows with ‖δ‖, and in sequential use the excess of every edit adds up).

``Realized`` (ROME's ``realized_values``): δ is optimised as the rank-one update will write it. An update
ΔW = (δ + c) uᵀ changes the module's output at a row whose key is k by (uᵀk)(δ + c), not by δ: with
``direction`` u (C⁻¹k* over its normalising key's projection) and ``offset`` c, each row adds that instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.keys import last_token_index, subject_rows
from locate_edit.prefix import cached_rows
from mend.adapters import ModelAdapter
from mend.adapters.partial import start_at_layer, supports_partial
from mend.config import NONNEGATIVE
from mend.errors import ConfigError
from mend.hooks import add_to_output, capture
from mend.requests import EditRequest
from mend.scoring import forward_target_logits, logprobs_at_targets, make_batch


@dataclass
class ValueSettings:
    lr: float = field(default=0.5, metadata=NONNEGATIVE)
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = field(default=0.5, metadata=NONNEGATIVE)
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2  # stop when every request's loss (stop_on) is below this
    stop_on: str = "loss"  # loss: the whole objective (reference code); nll: the target's NLL averaged over templates
    # and, when set, only once the request's own (bare) prompt has a target NLL below this: its key can lie far
    # from the averaged key, so the mean over templates may be low while the prompt itself is not yet edited
    prompt_nll: float | None = None
    # after the stop, scale each δ down to the smallest fraction that still meets it (bisection, this many extra
    # forward passes; 0: off): the last Adam step overshoots, and in sequential use every edit's excess adds up
    shrink_steps: int = 0
    kl_prompt: str = "{} is a"
    chunk: int = 8  # requests optimised together in one batch
    # run the tokens before each row's subject once and keep their keys and values (locate_edit.prefix)
    prefix_cache: bool = True


STOP_ON = ("loss", "nll")


@dataclass
class Realized:
    """Per-request ``direction`` (n, d_in) and ``offset`` (n, d_out) of the rank-one update δ will become."""

    direction: torch.Tensor
    offset: torch.Tensor

    def __getitem__(self, rows: slice) -> Realized:
        return Realized(self.direction[rows], self.offset[rows])


@dataclass
class Values:
    delta: torch.Tensor  # (n, d) optimised deltas
    init: torch.Tensor  # (n, d) the module's output at the subject's last token of each bare prompt
    steps: list[int]
    final_loss: list[float]


def optimize_values(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ModelAdapter, requests: Sequence[EditRequest],
    templates: Sequence[str], module: nn.Module, layer: int, s: ValueSettings, realized: Realized | None = None,
) -> Values:
    """δ for each request, optimised in chunks of ``s.chunk`` requests (each δ has its own loss terms); a progress
    bar counts the requests when there is more than one chunk (a MEMIT batch of 100 takes minutes on a CPU)."""
    from tqdm.auto import tqdm

    if s.stop_on not in STOP_ON:
        raise ConfigError(f"value.stop_on must be one of {', '.join(STOP_ON)}, got '{s.stop_on}'")
    parts = []
    with tqdm(total=len(requests), desc="v* optimisation", unit="request", leave=False,
              disable=len(requests) <= s.chunk) as bar:
        for i in range(0, len(requests), s.chunk):
            chunk = requests[i : i + s.chunk]
            part = None if realized is None else realized[i : i + s.chunk]
            parts.append(_optimize_chunk(model, tok, adapter, chunk, templates, module, layer, s, part))
            bar.update(len(chunk))
    return Values(torch.cat([p.delta for p in parts]), torch.cat([p.init for p in parts]),
                  [x for p in parts for x in p.steps], [x for p in parts for x in p.final_loss])


def _rows(tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str], kl_prompt: str):
    """Rewriting rows (every template, teacher-forced target) then one KL row per request."""
    assert templates[0] == "{}", "the first template must be the bare prompt"
    prompts, pos = subject_rows(tok, requests, templates)
    owner = [i for i in range(len(requests)) for _ in templates]
    targets = [requests[i].target_new for i in owner]
    is_kl = [False] * len(owner)
    for i, r in enumerate(requests):
        text = kl_prompt.replace("{}", r.subject)
        start = kl_prompt.index("{}")
        prompts.append(text), targets.append(r.target_new), owner.append(i), is_kl.append(True)
        pos.append(last_token_index(tok, text, (start, start + len(r.subject))))
    return prompts, targets, torch.tensor(pos), torch.tensor(owner), torch.tensor(is_kl)


def _optimize_chunk(model, tok, adapter, requests, templates, module, layer, s: ValueSettings,
                    realized: Realized | None) -> Values:
    prompts, targets, pos, owner, is_kl = _rows(tok, requests, templates, s.kl_prompt)
    batch = make_batch(tok, prompts, targets, model)
    dev = model.device
    pos, owner, is_kl = pos.to(dev), owner.to(dev), is_kl.to(dev)
    n = len(requests)
    block = adapter.block(layer)
    partial = supports_partial(adapter)
    with torch.no_grad(), capture({"m": module, "b": block}, inputs=True, outputs=True) as cap:
        tlogits0 = forward_target_logits(model, batch)
    out0 = cap["m"].output
    first = torch.tensor([owner.tolist().index(i) for i in range(n)], device=dev)  # bare-prompt row per request
    init = out0[first, pos[first]].float()  # (n, d)
    hidden_in = cap["b"].input if partial else None
    kl_rows = is_kl.nonzero().squeeze(1)
    kl_logp0 = torch.log_softmax(tlogits0[kl_rows, 0].float(), -1)
    gain, offset = 1.0, 0.0  # each row gets gain · (δ + offset): δ itself, or what the update will add there
    if realized is not None:  # (uᵀk_row)(δ + c)
        keys = cap["m"].input[torch.arange(len(owner), device=dev), pos].float()
        gain = (keys * realized.direction.to(dev)[owner]).sum(1, keepdim=True)
        offset = realized.offset.to(dev)[owner]

    rows = cached_rows(model, batch, pos, tlogits0) if s.prefix_cache else None
    step_pos = pos
    if rows is not None:  # every step runs the rows from the subject's last token on (its suffix column 0)
        step_pos = torch.zeros_like(pos)
        hidden_in = rows.take(hidden_in) if partial else None

    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    max_norm = s.clamp_norm_factor * init.norm(dim=1)  # (n,)
    counts = torch.bincount(owner[~is_kl], minlength=n).float()
    steps, losses = [0] * n, [float("inf")] * n
    ctx = start_at_layer(adapter, layer, hidden_in) if partial else contextlib.nullcontext()

    def objective(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's loss and whether it meets the stop, with deltas ``d`` (n, d_model)."""
        with add_to_output(module, (gain * (d[owner] + offset)).to(out0.dtype), step_pos):
            # (rows, T, V) at target positions only
            tlogits = forward_target_logits(model, batch if rows is None else rows.batch())
        lp = logprobs_at_targets(tlogits, batch)  # (rows, T)
        nll_row = -(lp.sum(1) / batch.target_mask.sum(1))
        nll = torch.zeros(n, device=dev).index_add(0, owner[~is_kl], nll_row[~is_kl]) / counts
        kl_logp = torch.log_softmax(tlogits[kl_rows, 0].float(), -1)
        kl = (kl_logp.exp() * (kl_logp - kl_logp0)).sum(-1)  # KL(p ‖ p0), one per request
        wd = d.norm(dim=1) / init.norm(dim=1) ** 2
        per_req = nll + s.kl_factor * kl + s.weight_decay * wd
        watched = (nll if s.stop_on == "nll" else per_req).detach()
        met = watched < s.early_stop_loss
        if s.prompt_nll is not None:
            met &= nll_row[first].detach() < s.prompt_nll
        return per_req, met

    with ctx:
        met = torch.zeros(n, dtype=torch.bool, device=dev)
        for step in range(s.steps):
            per_req, met = objective(delta)
            losses = per_req.tolist()
            for i in range(n):
                steps[i] = step + 1
            if bool(met.all()) or step == s.steps - 1:
                break
            opt.zero_grad()
            per_req.sum().backward()
            opt.step()
            with torch.no_grad():
                scale = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale.unsqueeze(1))
        if s.shrink_steps > 0 and bool(met.any()):
            delta = _shrink(delta.detach(), met, objective, s.shrink_steps)
            with torch.no_grad():
                losses = objective(delta)[0].tolist()  # the loss of the δ returned
    return Values(delta.detach(), init, steps, losses)


@torch.no_grad()
def _shrink(delta: torch.Tensor, met: torch.Tensor, objective, n_steps: int) -> torch.Tensor:
    """Each δ that meets the stop scaled by the smallest fraction in (0, 1] that still meets it, found by
    bisection (``n_steps`` evaluations of ``objective``); the others unchanged."""
    lo = torch.zeros(len(delta), device=delta.device)
    hi = torch.ones(len(delta), device=delta.device)
    for _ in range(n_steps):
        mid = torch.where(met, (lo + hi) / 2, hi)
        ok = objective(delta * mid[:, None])[1]
        hi = torch.where(met & ok, mid, hi)
        lo = torch.where(met & ~ok, mid, lo)
    return delta * hi[:, None]
