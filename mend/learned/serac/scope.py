"""SERAC's scope classifier: is an input about one of the stored edits?

The frozen base model embeds every text (its hidden states at ``layer``, averaged over the text's tokens; the pass
the edited model runs anyway, so an input costs no extra forward to classify); a trained linear map to ``dim``
dimensions, on standardised features, gives unit vectors, and ``score(q, e) = s · cos(q, e) + b`` is the logit of
"q is in the scope of edit e". Retrieval over N stored edits is one ``(B, dim) @ (dim, N)`` product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.config import NONNEGATIVE


@dataclass
class ScopeConfig:
    layer: int = -1  # hidden state pooled for the embedding (0: token embeddings, -1: the last, final norm applied)
    dim: int = 256  # width of the trained projection
    threshold: float = field(default=0.5, metadata=NONNEGATIVE)  # in scope when sigmoid(score) exceeds it


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, d) over the positions where ``mask`` (B, L) is 1, in float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def text_features(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str], layer: int,
                  batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Pooled hidden states (n, d) of ``texts`` under the unedited model (right-padded batches)."""
    from tqdm.auto import tqdm

    body = getattr(model, model.base_model_prefix, model)  # the LM head is not needed (and costs most on 49k tokens)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: little padding
    out = torch.zeros(len(texts), model.config.hidden_size)
    for lo in tqdm(range(0, len(texts), batch_size), desc="scope features", disable=not progress, leave=False):
        rows = order[lo : lo + batch_size]
        enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True).to(model.device)
        hs = body(**enc, output_hidden_states=True, use_cache=False).hidden_states
        out[rows] = pool(hs[layer], enc.attention_mask).cpu()
    return out


class ScopeClassifier(nn.Module):
    def __init__(self, d_model: int, cfg: ScopeConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(d_model, cfg.dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))  # untrained: in scope from cos 0.5 on

    def fit_features(self, feats: torch.Tensor) -> None:
        """Standardise features by their per-dimension mean and std over the training texts."""
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-6))

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats.to(self.mean) - self.mean) / self.std
        return F.normalize(self.proj(z), dim=-1)

    def logits(self, q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """(B, N) scope logits of query embeddings ``q`` (B, dim) against edit embeddings ``e`` (N, dim)."""
        return self.log_scale.exp() * (q @ e.T) + self.bias

    def retrieve(self, q: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each query the best edit's index and its in-scope probability."""
        p, idx = torch.sigmoid(self.logits(q, e)).max(dim=1)
        return idx, p
