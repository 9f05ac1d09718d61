"""MALMEN's hypernetwork: MEND's gradient transform predicting value shifts, a learned ridge λ per weight and the
preservation matrix of the solve (see :mod:`mend.learned.malmen.solve`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from locate_edit.solvers import regularize
from mend.learned.hypernet import HypernetConfig, MendHypernet, WeightSpec, checked_moment


class KeyMoment(nn.Module):
    """One weight's preservation matrix ``M`` for MALMEN's solve (float32 buffer) and whether it was set:
    ``C + ridge·τ·I`` from the keys' second moment ``C = E[k kᵀ]`` (``τ = tr(C)/d_in``), or ``τ·I`` without it
    (``hypernet.precondition=false``: plain ridge, on the keys' scale). With ``C_facts``, the second moment of the
    keys at the answer positions of known facts, ``C`` is ``½ C_text + ½ C_facts`` (the latter scaled to the same
    trace): the keys an edit must leave alone are ordinary text's and other facts' alike."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("M", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, C: torch.Tensor, ridge: float, full: bool, C_facts: torch.Tensor | None = None) -> None:
        if C_facts is not None:
            C, C_facts = C.detach().to(torch.float64), C_facts.detach().to(torch.float64)
            C = 0.5 * C + 0.5 * C_facts * (C.trace() / C_facts.trace().clamp_min(1e-300))
        C, tau = checked_moment(C, self.M.shape[0], ridge)
        M = regularize(C, ridge) if full else tau * torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
        self.M.copy_(M.to(self.M))
        self.fitted.fill_(True)


class MalmenHypernet(MendHypernet):
    """MALMEN's editor (Tan et al. 2024, "Massive Editing for Large Language Models via Meta Learning"): MEND's
    gradient transform predicts, for each kept token t of every edit, a value shift at its key ``u_t``,
    ``d_t = −α (ũ_t·u_t / tr C) δ̃_t`` (at initialisation ``≈ −α δ_t``: a gradient step on the module's output);
    the shifts of all edits are then aggregated by least squares, ``ΔW = D Uᵀ (U Uᵀ + λ M + C_prev)⁻¹``
    (``locate_edit.solvers.ridge_system``), with ``M`` the keys' second moment (preservation, as MEMIT) and one
    learned ``λ = exp(log_λ)`` per weight. ``C_prev`` holds earlier edits' keys in sequential use."""

    def __init__(self, weights: Sequence[WeightSpec], cfg: HypernetConfig, lambda_init: float = 1000.0):
        super().__init__(weights, replace(cfg, precondition=False))
        self.cfg = cfg
        if not lambda_init > 0:
            raise ValueError(f"lambda_init must be positive, got {lambda_init}")
        self.log_lambda = nn.Parameter(torch.full((len(self.weights),), math.log(lambda_init)))
        self.moment = nn.ModuleDict({w.key: KeyMoment(w.d_in) for w in self.weights})

    @property
    def preconditioned(self) -> bool:
        """Whether every weight's preservation matrix is set (it is needed with or without ``precondition``)."""
        return all(bool(m.fitted) for m in self.moment.values())

    @property
    def needs_second_moment(self) -> bool:
        return not self.preconditioned

    def set_preconditioner(self, label: str, C: torch.Tensor, C_facts: torch.Tensor | None = None) -> None:
        """``M`` of one weight from its inputs' second moment over text ``C`` and, optionally, at the answer
        positions of known facts ``C_facts`` (see :class:`KeyMoment`)."""
        self.moment[self._spec(label).key].fit(C, self.cfg.precondition_ridge, self.cfg.precondition, C_facts)

    def lam(self, label: str) -> torch.Tensor:
        return self.log_lambda[self._index[label]].exp()

    def preservation(self, label: str) -> torch.Tensor:
        m = self.moment[self._spec(label).key]
        if not bool(m.fitted):
            raise RuntimeError(f"the key second moment of {label} is not set (set_preconditioner before use)")
        return m.M

    def value_shift(self, label: str, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(N, d_out) value shifts ``d_t = −α (ũ_t·u_t / tr M) δ̃_t`` of the tokens' factors ``u`` (N, d_in), ``δ``."""
        ut, dt = self.transform(label, u, d)
        scale = self.alpha(label) / self.preservation(label).diagonal().sum()
        return -scale * (ut * u.float()).sum(-1, keepdim=True) * dt

    def delta(self, label: str, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("MALMEN aggregates value shifts by least squares: use mend.learned.malmen.solve.aggregate")
