"""Batched scoring of target continuations and greedy generation, for decoder-only and encoder-decoder models.

A target continues its prompt: for a decoder-only model prompt and target tokens form one sequence and the
logits at position ``i`` predict token ``i + 1``; for an encoder-decoder model the prompt is the encoder input
and the target is the decoder's label sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _is_enc_dec(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def encode_pair(
    tok: PreTrainedTokenizerBase, prompt: str, target: str, encoder_decoder: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target as the model would see the target after the prompt."""
    p_ids = tok(prompt).input_ids
    if encoder_decoder:
        return p_ids, tok(target.strip(), add_special_tokens=False).input_ids
    full = tok(prompt + target).input_ids
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        return p_ids, full[len(p_ids):]
    return p_ids, tok(target, add_special_tokens=False).input_ids  # a merge across the boundary


@dataclass
class TargetBatch:
    """Model inputs plus, for every target token, where its logits are."""

    inputs: dict[str, torch.Tensor]
    target_ids: torch.Tensor  # (B, T) long, 0 where padded
    target_mask: torch.Tensor  # (B, T) bool
    logit_pos: torch.Tensor  # (B, T) long: index into the logits' sequence dimension
    prompt_lens: list[int]


def make_batch(
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    model: PreTrainedModel,
) -> TargetBatch:
    """Right-padded batch of prompt+target sequences (decoder-only) or prompt / label pairs (encoder-decoder)."""
    enc_dec = _is_enc_dec(model)
    pairs = [encode_pair(tok, p, t, enc_dec) for p, t in zip(prompts, targets, strict=True)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tmax = max(len(t) for _, t in pairs)
    b = len(pairs)
    target_ids = torch.zeros(b, tmax, dtype=torch.long)
    target_mask = torch.zeros(b, tmax, dtype=torch.bool)
    logit_pos = torch.zeros(b, tmax, dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        target_ids[i, : len(t)] = torch.tensor(t)
        target_mask[i, : len(t)] = True
        start = 0 if enc_dec else len(p) - 1
        logit_pos[i, : len(t)] = torch.arange(start, start + len(t))
    if enc_dec:
        input_ids, attn = _pad([p for p, _ in pairs], pad)
        start_id = model.config.decoder_start_token_id
        dec = torch.full((b, tmax), pad, dtype=torch.long)
        dec[:, 0] = start_id
        dec[:, 1:] = torch.where(target_mask[:, :-1], target_ids[:, :-1], torch.full_like(target_ids[:, :-1], pad))
        inputs = {"input_ids": input_ids, "attention_mask": attn, "decoder_input_ids": dec,
                  "decoder_attention_mask": torch.cat([torch.ones(b, 1, dtype=torch.long),
                                                       target_mask[:, :-1].long()], 1)}
    else:
        input_ids, attn = _pad([p + t for p, t in pairs], pad)
        inputs = {"input_ids": input_ids, "attention_mask": attn}
    device = model.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return TargetBatch(inputs, target_ids.to(device), target_mask.to(device), logit_pos.to(device),
                       [len(p) for p, _ in pairs])


def select_rows(batch: TargetBatch, lo: int, hi: int) -> TargetBatch:
    """Rows ``[lo, hi)`` of a batch; a decoder-only batch is trimmed to those rows' longest sequence (right
    padding: the kept positions are unchanged, so hidden states can be sliced the same way)."""
    inputs = {k: v[lo:hi] for k, v in batch.inputs.items()}
    if "decoder_input_ids" not in inputs:
        width = int(inputs["attention_mask"].sum(1).max()) if hi > lo else 0
        inputs = {k: v[:, :width] for k, v in inputs.items()}
    return TargetBatch(inputs, batch.target_ids[lo:hi], batch.target_mask[lo:hi], batch.logit_pos[lo:hi],
                       batch.prompt_lens[lo:hi])


def index_rows(batch: TargetBatch, rows: torch.Tensor) -> TargetBatch:
    """The rows ``rows`` (indices) of a batch, padding kept."""
    idx = rows.tolist()
    return TargetBatch({k: v[rows] for k, v in batch.inputs.items()}, batch.target_ids[rows],
                       batch.target_mask[rows], batch.logit_pos[rows], [batch.prompt_lens[i] for i in idx])


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    attn = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return ids, attn


def target_logits(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B, T, V) logits that predict each target token, from full (B, L, V) logits."""
    idx = batch.logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx)


def forward_target_logits(model: PreTrainedModel, batch: TargetBatch, packed: bool = False) -> torch.Tensor:
    """(B, T, V) logits at the target positions only; with ``packed``, (N, V) at the N real target tokens
    (``batch.target_mask.nonzero()`` order), padding skipped.

    For a decoder-only model the LM head runs on the target positions alone: with a 49k vocabulary the head
    over every position costs more than the whole transformer for short prompts. Encoder-decoder models run
    in full (their decoder positions are the targets anyway).
    """
    base, head = split_head(model)
    rows, cols = batch.target_mask.nonzero(as_tuple=True) if packed else (None, None)
    if _is_enc_dec(model) or base is None or head is None:
        logits = model(**batch.inputs).logits
        return logits[rows, batch.logit_pos[rows, cols]] if packed else target_logits(logits, batch)
    hidden = base(**batch.inputs).last_hidden_state  # (B, L, d), final norm applied
    if packed:
        hidden = hidden[rows, batch.logit_pos[rows, cols]]  # (N, d)
    else:
        hidden = hidden.gather(1, batch.logit_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return head_logits(model, hidden)


def split_head(model: PreTrainedModel) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """A decoder-only model's base (hidden states, final norm applied) and LM head, or Nones when not split so."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return base, head


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """(..., V) logits of final hidden states (..., d) through the LM head, with Gemma's logit soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logprobs_at_targets(tlogits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B, T) log-probability of each target token from (B, T, V) target logits, 0 at padding."""
    lp = torch.log_softmax(tlogits.float(), dim=-1)
    return lp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask


def nll_at_targets(tlogits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Mean over rows of the mean NLL per target token, from (B, T, V) target logits."""
    lp = logprobs_at_targets(tlogits, batch)
    return -(lp.sum(1) / batch.target_mask.sum(1)).mean()


def token_logprobs(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """(B, T) log-probability of each target token, 0 at padding, from full (B, L, V) logits."""
    return logprobs_at_targets(target_logits(logits, batch), batch)


def target_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Mean over requests of the mean negative log-likelihood per target token, from full logits."""
    return nll_at_targets(target_logits(logits, batch), batch)


@dataclass
class TargetScore:
    logprob: float  # sum over the target's tokens: log P(target | prompt)
    n_tokens: int
    greedy_match: bool  # every target token is the argmax (teacher-forced)
    argmax: list[int] | None = None  # teacher-forced argmax token at each target position
    first_logdist: torch.Tensor | None = None  # (V,) log-probs of the first target position (next-token dist.)
    target_ids: list[int] | None = None

    @property
    def token_accuracy(self) -> float:
        """Teacher-forced token accuracy: the fraction of target positions whose argmax is the target token."""
        assert self.argmax is not None and self.target_ids is not None
        return sum(int(a == t) for a, t in zip(self.argmax, self.target_ids)) / max(1, len(self.target_ids))

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.n_tokens


@torch.no_grad()
def score_targets(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str],
    batch_size: int = 16, first_dist: bool = False,
) -> list[TargetScore]:
    """Log-probability of each target after its prompt, and the teacher-forced argmax tokens.

    With ``first_dist`` the full next-token log-distribution after each prompt is kept (for KL measures).
    """
    out: list[TargetScore] = []
    for s in range(0, len(prompts), batch_size):
        batch = make_batch(tok, prompts[s : s + batch_size], targets[s : s + batch_size], model)
        tl = forward_target_logits(model, batch).float()  # (B, T, V)
        logp = torch.log_softmax(tl, dim=-1)
        lp = logp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask
        am = tl.argmax(-1)
        hit = (am == batch.target_ids) | ~batch.target_mask
        for i in range(lp.shape[0]):
            n = int(batch.target_mask[i].sum())
            out.append(TargetScore(
                lp[i].sum().item(), n, bool(hit[i].all()), am[i, :n].tolist(),
                logp[i, 0].clone() if first_dist else None, batch.target_ids[i, :n].tolist(),
            ))
    return out


@torch.no_grad()
def greedy_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, n_tokens: int) -> list[int]:
    """The greedy continuation of ``prompt`` as token ids."""
    enc = tok(prompt, return_tensors="pt").to(model.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**enc, max_new_tokens=n_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
    new = out[0] if _is_enc_dec(model) else out[0, enc.input_ids.shape[1]:]
    specials = set(tok.all_special_ids)
    if _is_enc_dec(model) and len(new) and int(new[0]) == model.config.decoder_start_token_id:
        new = new[1:]
    return [int(t) for t in new if int(t) not in specials][:n_tokens]


def greedy_text(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, n_tokens: int = 12) -> str:
    return tok.decode(greedy_ids(model, tok, prompt, n_tokens))
