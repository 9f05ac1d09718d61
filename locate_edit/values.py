"""Values: the vector a module should output at the subject's last token so that the model predicts the new
target (ROME's v*, MEMIT's z). A delta δᵢ per request is added to ``module``'s output at the subject's last token
in every context template and optimised with Adam (as in the reference) on

    Σᵢ [ mean NLL(targetᵢ) + kl_factor · KL(p ‖ p₀ on "{subject} is a") + weight_decay · ‖δᵢ‖ / ‖v₀ᵢ‖² ],

clamped to ‖δᵢ‖ ≤ clamp_norm_factor · ‖v₀ᵢ‖ (Meng et al. 2022, eq. 4 and reference code). The blocks below the
edited one do not depend on δ: their output is computed once and every step runs only the blocks above. Nor do
the tokens before each row's subject: the first full pass keeps their keys and values, and every step runs only the
rest of the row (``prefix_cache``, locate_edit.prefix).

The losses are separable, so many requests' rows share each step's forward and backward (``rows_per_step``);
requests are grouped by the length of what follows their subject (little padding), and a request leaves the batch
at its own stop, as when it is optimised alone: each δ is the one the request gets by itself, up to rounding.
``shrink_steps`` then scales each δ that met the stop down
to the smallest fraction that still meets it (the last Adam step overshoots; an update's effect on other text
grows with ‖δ‖, and in sequential use the excess of every edit adds up).

``Realized`` (ROME's ``realized_values``): δ is optimised as the rank-one update will write it. An update
ΔW = (δ + c) uᵀ changes the module's output at a row whose key is k by (uᵀk)(δ + c), not by δ: with
``direction`` u (C⁻¹k* over its normalising key's projection) and ``offset`` c, each row adds that instead.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from locate_edit.keys import last_token_index, subject_rows
from locate_edit.prefix import SuffixBatch, cached_rows, forward_keeping_cache
from mend.adapters import ModelAdapter
from mend.adapters.partial import block_output_len, start_at_layer, supports_partial
from mend.config import NONNEGATIVE
from mend.errors import ConfigError
from mend.hooks import add_to_output, capture
from mend.requests import EditRequest
from mend.scoring import TargetBatch, forward_target_logits, index_rows, logprobs_at_targets, make_batch


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
    # rows (requests × (templates + 1)) that share one forward and backward per step: the compute of a step grows
    # with its rows, so on a CPU this only amortises the per-pass overhead; on a GPU raise it as memory allows
    rows_per_step: int = 64
    # run the tokens before each row's subject once and keep their keys and values (locate_edit.prefix)
    prefix_cache: bool = True


STOP_ON = ("loss", "nll")


@dataclass
class Realized:
    """Per-request ``direction`` (n, d_in) and ``offset`` (n, d_out) of the rank-one update δ will become."""

    direction: torch.Tensor
    offset: torch.Tensor

    def __getitem__(self, rows: slice | torch.Tensor) -> Realized:
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
    """δ for each request. Requests run in groups of about ``s.rows_per_step`` rows (each δ has its own loss
    terms, so a group's rows share one forward and backward per step), grouped by the length of what follows
    their subject so that little is padding; a request that meets its stop leaves the group's later steps. A
    progress bar counts the requests and shows the rows still active when there is more than one group."""
    from tqdm.auto import tqdm

    if s.stop_on not in STOP_ON:
        raise ConfigError(f"value.stop_on must be one of {', '.join(STOP_ON)}, got '{s.stop_on}'")
    if s.rows_per_step < 1:
        raise ConfigError(f"value.rows_per_step must be at least 1, got {s.rows_per_step}")
    if not requests:
        raise ConfigError("no edit requests to optimise values for")
    n = len(requests)
    per_group = max(1, s.rows_per_step // (len(templates) + 1))
    groups = -(-n // per_group)  # as few as the budget allows, of even sizes
    bounds = [n * g // groups for g in range(groups + 1)]
    order = _by_suffix_length(tok, requests)
    delta = init = None
    steps, losses = [0] * n, [float("inf")] * n
    with tqdm(total=n, desc="v* optimisation", unit="request", leave=False, disable=n <= per_group) as bar:
        for lo, hi in itertools.pairwise(bounds):
            idx = order[lo:hi]
            part = None if realized is None else realized[torch.tensor(idx)]
            got = _optimize_group(model, tok, adapter, [requests[i] for i in idx], templates, module, layer, s,
                                  part, bar)
            if delta is None:
                delta, init = got.delta.new_zeros(n, got.delta.shape[1]), got.init.new_zeros(n, got.init.shape[1])
            delta[idx], init[idx] = got.delta, got.init
            for j, i in enumerate(idx):
                steps[i], losses[i] = got.steps[j], got.final_loss[j]
    return Values(delta, init, steps, losses)


def _by_suffix_length(tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest]) -> list[int]:
    """Request indices by the number of tokens from the subject's last token to the target's end (stable)."""
    texts, pos = subject_rows(tok, requests, ["{}"])
    lens = [len(tok(t + r.target_new).input_ids) - p for t, p, r in zip(texts, pos, requests, strict=True)]
    return sorted(range(len(requests)), key=lambda i: lens[i])


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


@dataclass
class _Rows:
    """The rows of the requests ``req`` (the group's indices, ascending) that a step runs."""

    req: torch.Tensor  # (m,)
    owner: torch.Tensor  # (rows,) position of each row's request in ``req``
    rewrite: torch.Tensor  # (rows,) bool: a template row (the others are KL rows)
    kl: torch.Tensor  # (m,) each request's KL row
    first: torch.Tensor  # (m,) each request's bare-prompt row
    counts: torch.Tensor  # (m,) template rows per request
    batch: TargetBatch  # what the loss reads (targets, their positions)
    suffix: SuffixBatch | None  # what the model runs, when the prefixes are cached
    pos: torch.Tensor  # (rows,) where δ is added
    hidden: torch.Tensor | None  # (rows, L, d) the edited block's input, for a partial forward
    gain: torch.Tensor | float
    offset: torch.Tensor | float


def _optimize_group(model, tok, adapter, requests, templates, module, layer, s: ValueSettings,
                    realized: Realized | None, bar) -> Values:
    prompts, targets, pos, owner, is_kl = _rows(tok, requests, templates, s.kl_prompt)
    batch = make_batch(tok, prompts, targets, model)
    dev = model.device
    pos, owner, is_kl = pos.to(dev), owner.to(dev), is_kl.to(dev)
    n = len(requests)
    block = adapter.block(layer)
    partial = supports_partial(adapter)
    with torch.no_grad(), capture({"m": module, "b": block}, inputs=True, outputs=True) as cap:
        if s.prefix_cache:
            tlogits0, kv = forward_keeping_cache(model, batch)
        else:
            tlogits0, kv = forward_target_logits(model, batch), None
    out0 = cap["m"].output
    first = torch.tensor([owner.tolist().index(i) for i in range(n)], device=dev)  # bare-prompt row per request
    kl_rows = is_kl.nonzero().squeeze(1)  # in request order
    init = out0[first, pos[first]].float()  # (n, d)
    hidden_in = cap["b"].input if partial else None
    kl_logp0 = torch.log_softmax(tlogits0[kl_rows, 0].float(), -1)
    gain, offset = 1.0, 0.0  # each row gets gain · (δ + offset): δ itself, or what the update will add there
    if realized is not None:  # (uᵀk_row)(δ + c)
        keys = cap["m"].input[torch.arange(len(owner), device=dev), pos].float()
        gain = (keys * realized.direction.to(dev)[owner]).sum(1, keepdim=True)
        offset = realized.offset.to(dev)[owner]
    suffix = cached_rows(model, batch, pos, tlogits0, kv) if s.prefix_cache else None
    step_pos = pos
    if suffix is not None:  # every step runs the rows from the subject's last token on (its suffix column 0)
        step_pos = torch.zeros_like(pos)
        hidden_in = suffix.take(hidden_in) if partial else None
    tuple_len = block_output_len(adapter, layer) if partial else None

    def rows_of(active: torch.Tensor) -> _Rows:
        """The rows of the requests still active."""
        req = active.nonzero().squeeze(1)
        sel = active[owner].nonzero().squeeze(1)
        at = torch.full((len(owner),), -1, dtype=torch.long, device=dev)
        at[sel] = torch.arange(len(sel), device=dev)
        local = torch.full((n,), -1, dtype=torch.long, device=dev)
        local[req] = torch.arange(len(req), device=dev)
        rewrite, own = ~is_kl[sel], local[owner[sel]]
        return _Rows(
            req, own, rewrite, at[kl_rows[req]], at[first[req]],
            torch.bincount(own[rewrite], minlength=len(req)).float(),
            index_rows(batch, sel), None if suffix is None else suffix.select(sel), step_pos[sel],
            None if hidden_in is None else hidden_in[sel],
            gain if isinstance(gain, float) else gain[sel], offset if isinstance(offset, float) else offset[sel])

    def objective(d: torch.Tensor, r: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of each request of ``r`` and whether it meets the stop, with deltas ``d`` (n, d_model)."""
        dr = d[r.req]
        ctx = start_at_layer(adapter, layer, r.hidden, tuple_len) if partial else contextlib.nullcontext()
        with ctx, add_to_output(module, (r.gain * (dr[r.owner] + r.offset)).to(out0.dtype), r.pos):
            # (rows, T, V) at target positions only
            tlogits = forward_target_logits(model, r.batch if r.suffix is None else r.suffix.batch())
        lp = logprobs_at_targets(tlogits, r.batch)  # (rows, T)
        nll_row = -(lp.sum(1) / r.batch.target_mask.sum(1))
        nll = torch.zeros(len(r.req), device=dev).index_add(0, r.owner[r.rewrite], nll_row[r.rewrite]) / r.counts
        kl_logp = torch.log_softmax(tlogits[r.kl, 0].float(), -1)
        kl = (kl_logp.exp() * (kl_logp - kl_logp0[r.req])).sum(-1)  # KL(p ‖ p0), one per request
        wd = dr.norm(dim=1) / init[r.req].norm(dim=1) ** 2
        per_req = nll + s.kl_factor * kl + s.weight_decay * wd
        watched = (nll if s.stop_on == "nll" else per_req).detach()
        met = watched < s.early_stop_loss
        if s.prompt_nll is not None:
            met &= nll_row[r.first].detach() < s.prompt_nll
        return per_req, met

    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)
    max_norm = s.clamp_norm_factor * init.norm(dim=1)  # (n,)
    steps, losses = [0] * n, [float("inf")] * n
    active = torch.ones(n, dtype=torch.bool, device=dev)
    met_all = torch.zeros(n, dtype=torch.bool, device=dev)
    everyone = rows = rows_of(active)
    for step in range(s.steps):
        per_req, met = objective(delta, rows)
        for i, loss in zip(rows.req.tolist(), per_req.tolist(), strict=True):
            steps[i], losses[i] = step + 1, loss
        met_all[rows.req] = met
        done = met if step < s.steps - 1 else torch.ones_like(met)
        if bool(done.any()):
            bar.update(int(done.sum()))
        if bool(done.all()):
            break
        opt.zero_grad()
        per_req[~done].sum().backward()  # separable: a request's δ gets the gradient of its own loss only
        kept = delta.detach().clone()
        opt.step()
        active[rows.req[done]] = False
        with torch.no_grad():
            scale = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            delta.mul_(scale.unsqueeze(1))
            delta[~active] = kept[~active]  # a request that met its stop keeps the δ it met it with
        if bool(done.any()):
            rows = rows_of(active)
        bar.set_postfix(rows=int(len(rows.owner)), refresh=False)
    if s.shrink_steps > 0 and bool(met_all.any()):
        delta = _shrink(delta.detach(), met_all, lambda d: objective(d, everyone), s.shrink_steps)
        with torch.no_grad():
            losses = objective(delta, everyone)[0].tolist()  # the loss of the δ returned
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
