"""MEND's gradient transform (Mitchell et al. 2022, "Fast Model Editing at Scale", §3).

For an edited weight ``W`` (``(d_out, d_in)``) the gradient of the edit loss is ``∇W = Σ_t δ_t u_tᵀ`` over the
edit's tokens, with ``u_t`` the module's input and ``δ_t`` the gradient of the loss w.r.t. its output. MEND maps each
pair to ``(ũ_t, δ̃_t)`` with a small network ``g`` and edits ``W̃ = W − α Σ_t δ̃_t ũ_tᵀ`` (paper eq. 2 and §3.1),
with one learned step size ``α`` per edited weight.

- One network per weight *shape*, shared by the layers of that shape, with a per-layer scale and shift of its hidden
  units (the paper's layer-specific ``s_ℓ``, ``o_ℓ``); ``shared=False`` gives every weight its own network.
- Inputs are standardised per weight by running statistics (buffers, saved with the editor). The network works in
  standardised units and its change is mapped back: ``ũ = u + σ_u ⊙ (g(z) − z)`` with ``z = (u − μ_u) / σ_u``,
  the same as ``σ_u ⊙ g(z) + μ_u``. Residual blocks whose second linear is zero at initialisation make ``g`` the
  identity, so the untrained editor is exactly one gradient step ``ΔW = −α ∇W``.
- ``combine=True`` (paper default) transforms the concatenation ``[u; δ]`` with one network; ``False`` uses one
  network for ``u`` and one for ``δ``.
- ``α = exp(log_α)``: always positive; trained with its own (small) learning rate.
- ``precondition=True`` (an extension, the default; ``False`` is the paper's plain edit) writes the edit in
  the geometry of the weight's inputs, as ROME does: ``ΔW = −α Σ_t δ̃_t (P ũ_t)ᵀ`` with ``P = (C/τ + λI)⁻¹``,
  ``C = E[k kᵀ]`` of the module's input over ordinary text, ``τ = tr(C)/d_in`` and ``λ = precondition_ridge``.
  For one key ``u`` and ``λ → 0`` this is the update that writes a given change at ``u`` while changing typical
  inputs least: its mean squared effect on them, relative to the effect at ``u``, is ``1/(uᵀC⁻¹u)``, at most the
  plain step's ``uᵀCu/‖u‖⁴`` (Cauchy–Schwarz). ``P`` is a buffer, saved with the editor;
  :meth:`MendHypernet.set_preconditioner` fills it before training. At initialisation the editor is then exactly
  one preconditioned gradient step.

Where the reference code (eric-mitchell/mend) differs: it adds ``+lr · ∇̃W`` (the sign is left for the network to
learn, so at initialisation it takes an ascent step), keeps the statistics per shape rather than per weight, and
outputs the standardised factors without mapping them back (so at initialisation its edit is not the gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class HypernetConfig:
    """Architecture of the gradient transform (saved in the run's config.yaml)."""

    rank: int = 256  # hidden width of each residual block (a low-rank MLP: d -> rank -> d)
    n_blocks: int = 2  # residual blocks
    act: str = "relu"
    combine: bool = True  # one network over [u; δ] (paper default), else one for u and one for δ
    shared: bool = True  # one network per weight shape, per-layer scale/shift; False: one per weight
    norm: bool = True  # standardise u and δ by running statistics
    alpha_init: float = 5.0e-3  # initial edit step size α of every weight
    precondition: bool = True  # ΔW = −α Σ δ̃ (P ũ)ᵀ, P = (C/τ + λI)⁻¹ from the inputs' second moment C (see above)
    precondition_ridge: float = 1.0e-2  # λ, relative to the mean eigenvalue τ of C
    precondition_tokens: int = 50_000  # tokens of ordinary text C is gathered over (python -m mend.train)
    positions: str = "all"  # the tokens whose factors are edited: all (MEND) or target (those predicting the answer)


@dataclass(frozen=True)
class WeightSpec:
    """One edited weight as the hypernetwork sees it: a label and the shape of ``W`` as ``(d_out, d_in)``."""

    label: str  # e.g. "decoder.27.mlp_out" (WeightRef.label)
    d_out: int
    d_in: int

    @property
    def key(self) -> str:
        """A module-dict key (no dots)."""
        return self.label.replace(".", "-")


class RunningStats(nn.Module):
    """Per-feature mean and variance of everything seen so far (Chan et al.'s parallel update, float64).

    Under ``torch.distributed`` each update is reduced over all ranks first, so every rank holds the same values.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return bool(self.count >= 2)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (N, dim)."""
        x = x.detach().to(torch.float64)
        n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        total = x.sum(0)
        if _distributed():
            torch.distributed.all_reduce(n)
            torch.distributed.all_reduce(total)
        if n == 0:
            return
        mean_b = total / n
        m2_b = ((x - mean_b) ** 2).sum(0)
        if _distributed():
            torch.distributed.all_reduce(m2_b)
        count = self.count + n
        diff = mean_b - self.mean
        self.m2.add_(m2_b + diff**2 * self.count * n / count)
        self.mean.add_(diff * n / count)
        self.count.copy_(count)

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1).clamp_min(1)).sqrt() + self.eps


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Preconditioner(nn.Module):
    """One weight's ``P = (C/τ + λI)⁻¹`` (float32 buffer, identity until fitted) and whether it was fitted."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("P", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, C: torch.Tensor, ridge: float) -> None:
        C, tau = checked_moment(C, self.P.shape[0], ridge)
        eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
        self.P.copy_(torch.linalg.inv(C / tau + ridge * eye).to(self.P))
        self.fitted.fill_(True)


def checked_moment(C: torch.Tensor, dim: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A second moment of ``dim`` inputs as a symmetric float64 matrix and its mean eigenvalue ``τ = tr C / dim``;
    ValueError for another size, a ridge that is not positive or a zero moment."""
    if C.shape != (dim, dim):
        raise ValueError(f"second moment of shape {tuple(C.shape)} for inputs of size {dim}")
    if ridge <= 0:
        raise ValueError(f"hypernet.precondition_ridge must be positive, got {ridge}")
    C = C.detach().to(torch.float64)
    C = (C + C.T) / 2
    tau = C.trace() / dim
    if not tau > 0:
        raise ValueError("the second moment is zero: no inputs were seen")
    return C, tau


class ResidualBlock(nn.Module):
    """``h + U act(s_ℓ ⊙ (V h + b) + o_ℓ)``: a low-rank MLP with per-layer (mode) scale and shift; ``U = 0`` at
    initialisation, so the block starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, act: str):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.ones(n_modes, rank))
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))
        self.act = ACTIVATIONS[act]()

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:  # h: (N, dim)
        return h + self.up(self.act(self.scale[mode] * self.down(h) + self.shift[mode]))


class ResidualMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_blocks: int, n_modes: int, act: str):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(dim, rank, n_modes, act) for _ in range(n_blocks))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, mode)
        return h


class GradientTransform(nn.Module):
    """Maps standardised factors ``(z_u, z_δ)`` of one weight shape to transformed ones; identity at init."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, cfg: HypernetConfig):
        super().__init__()
        self.d_in, self.d_out, self.combine = d_in, d_out, cfg.combine
        rank = min(cfg.rank, d_in + d_out) if cfg.combine else cfg.rank
        if cfg.combine:
            self.net = ResidualMLP(d_in + d_out, rank, cfg.n_blocks, n_modes, cfg.act)
        else:
            self.net_u = ResidualMLP(d_in, min(rank, d_in), cfg.n_blocks, n_modes, cfg.act)
            self.net_d = ResidualMLP(d_out, min(rank, d_out), cfg.n_blocks, n_modes, cfg.act)

    def forward(self, z_u: torch.Tensor, z_d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.combine:
            out = self.net(torch.cat([z_u, z_d], -1), mode)  # (N, d_in + d_out)
            return out[:, : self.d_in], out[:, self.d_in :]
        return self.net_u(z_u, mode), self.net_d(z_d, mode)


class MendHypernet(nn.Module):
    """Everything MEND learns: the gradient transforms, the input statistics and the step sizes."""

    def __init__(self, weights: Sequence[WeightSpec], cfg: HypernetConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"hypernet.act must be one of {sorted(ACTIVATIONS)}, got {cfg.act!r}")
        self.cfg = cfg
        self.weights = list(weights)
        self._net_of: dict[str, tuple[str, int]] = {}  # weight key -> (transform key, mode index)
        groups: dict[str, list[WeightSpec]] = {}
        for w in self.weights:
            gkey = f"{w.d_out}x{w.d_in}" if cfg.shared else w.key
            groups.setdefault(gkey, []).append(w)
        self.transforms = nn.ModuleDict()
        for gkey, members in groups.items():
            self.transforms[gkey] = GradientTransform(members[0].d_in, members[0].d_out, len(members), cfg)
            for mode, w in enumerate(members):
                self._net_of[w.key] = (gkey, mode)
        self.stats_u = nn.ModuleDict({w.key: RunningStats(w.d_in) for w in self.weights})
        self.stats_d = nn.ModuleDict({w.key: RunningStats(w.d_out) for w in self.weights})
        self.log_alpha = nn.Parameter(torch.full((len(self.weights),), math.log(cfg.alpha_init)))
        if cfg.precondition:
            self.precond = nn.ModuleDict({w.key: Preconditioner(w.d_in) for w in self.weights})
        self._index = {w.label: i for i, w in enumerate(self.weights)}

    # --- statistics ----------------------------------------------------------------------------------------
    @property
    def stats_ready(self) -> bool:
        return all(s.ready for s in self.stats_u.values()) and all(s.ready for s in self.stats_d.values())

    def update_stats(self, label: str, u: torch.Tensor, d: torch.Tensor) -> None:
        """Add one weight's factors (N, d_in), (N, d_out) to its running statistics."""
        key = self._spec(label).key
        self.stats_u[key].update(u)
        self.stats_d[key].update(d)

    # --- the preconditioner ---------------------------------------------------------------------------------
    @property
    def preconditioned(self) -> bool:
        """Whether ``P`` is used and every weight's is set (False when ``precondition`` is off)."""
        return self.cfg.precondition and all(bool(p.fitted) for p in self.precond.values())

    @property
    def needs_second_moment(self) -> bool:
        """Whether the inputs' second moment must be gathered before use (:meth:`set_preconditioner`)."""
        return self.cfg.precondition and not self.preconditioned

    def set_preconditioner(self, label: str, C: torch.Tensor) -> None:
        """Set one weight's ``P = (C/τ + λI)⁻¹`` from the uncentred second moment ``C`` (d_in, d_in) of its input."""
        if not self.cfg.precondition:
            raise RuntimeError("this hypernetwork has no preconditioner (hypernet.precondition=false)")
        self.precond[self._spec(label).key].fit(C, self.cfg.precondition_ridge)

    # --- the transform -------------------------------------------------------------------------------------
    def alpha(self, label: str) -> torch.Tensor:
        return self.log_alpha[self._index[label]].exp()

    def transform(self, label: str, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed factors ``(ũ, δ̃)`` for one weight from ``u`` (N, d_in) and ``δ`` (N, d_out), float32."""
        w = self._spec(label)
        u, d = u.float(), d.float()
        gkey, mode = self._net_of[w.key]
        if self.cfg.norm:
            su, sd = self.stats_u[w.key], self.stats_d[w.key]
            if not (su.ready and sd.ready):
                raise RuntimeError(f"input statistics of {label} are not initialised (warm them up before use)")
            std_u, std_d = su.std().float(), sd.std().float()
            z_u, z_d = (u - su.mean.float()) / std_u, (d - sd.mean.float()) / std_d
        else:
            std_u = std_d = None
            z_u, z_d = u, d
        g_u, g_d = self.transforms[gkey](z_u, z_d, mode)
        if std_u is None:
            return g_u, g_d
        return u + std_u * (g_u - z_u), d + std_d * (g_d - z_d)

    def delta(self, label: str, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``ΔW = −α Σ_t δ̃_t ũ_tᵀ`` as ``(d_out, d_in)`` from the factors of every token of every edit."""
        ut, dt = self.transform(label, u, d)
        if self.cfg.precondition:
            p = self.precond[self._spec(label).key]
            if not bool(p.fitted):
                raise RuntimeError(f"the preconditioner of {label} is not set (set_preconditioner before use)")
            ut = ut @ p.P  # P is symmetric: rows ũ_tᵀ P = (P ũ_t)ᵀ
        return -self.alpha(label) * (dt.T @ ut)  # (d_out, N) @ (N, d_in)

    def _spec(self, label: str) -> WeightSpec:
        if label not in self._index:
            raise KeyError(f"weight {label!r} is not edited by this editor; it edits {list(self._index)}")
        return self.weights[self._index[label]]

