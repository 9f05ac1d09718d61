"""Closed-form weight updates of locate-then-edit editors (ROME, r-ROME, MEMIT, EMMET, AlphaEdit).

Pure tensor algebra, no model code. Convention: a weight ``W`` has shape ``(d_out, d_in)`` and acts as
``y = W k``; keys are columns (``K``: ``(d_in, n)``), values and residuals are ``(d_out, n)``; ``C`` is the
``(d_in, d_in)`` second moment ``E[k kᵀ]`` of the layer's keys. Everything is computed in float64 and
returned in the input dtype (that of ``W``, or of ``R`` where there is no ``W``). Each function returns the
update ``ΔW`` only; the caller adds it to the weight (transposing for GPT-2 ``Conv1D`` weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RidgeSystem",
    "alphaedit_update",
    "emmet_update",
    "memit_update",
    "null_space_projector",
    "regularize",
    "ridge_backward",
    "ridge_system",
    "ridge_update",
    "rome_direction",
    "rome_update",
]

_F64 = torch.float64


def _mat(x: Tensor, name: str, rows: int | None = None, cols: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(x, 'shape', type(x))}")
    if (rows is not None and x.shape[0] != rows) or (cols is not None and x.shape[1] != cols):
        want = f"({'?' if rows is None else rows}, {'?' if cols is None else cols})"
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")
    return x.to(_F64)


def _vec(x: Tensor, name: str, size: int) -> Tensor:
    """A 1-D ``(size,)`` or column ``(size, 1)`` tensor, as a float64 column."""
    if not isinstance(x, Tensor) or not (x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1)):
        raise ValueError(f"{name} must be a vector (d,) or column (d, 1), got {getattr(x, 'shape', type(x))}")
    if x.shape[0] != size:
        raise ValueError(f"{name} has length {x.shape[0]}, expected {size}")
    return x.reshape(size, 1).to(_F64)


def _square(C: Tensor, name: str, d: int | None = None) -> Tensor:
    if not isinstance(C, Tensor) or C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got {getattr(C, 'shape', type(C))}")
    return _mat(C, name, d, d)


def _spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """``A⁻¹ B`` for symmetric ``A``: Cholesky when ``A`` is numerically positive definite, else LU."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.solve(A, B)


def _eye(d: int, like: Tensor) -> Tensor:
    return torch.eye(d, dtype=like.dtype, device=like.device)


def regularize(C: Tensor, eps: float) -> Tensor:
    """``C + eps · tr(C)/d · I``: a ridge scaled to the mean eigenvalue of ``C``, to make it invertible."""
    C64 = _square(C, "C")
    d = C64.shape[0]
    return (C64 + eps * torch.trace(C64) / d * _eye(d, C64)).to(C.dtype)


def rome_update(W: Tensor, C: Tensor, k_avg: Tensor, v: Tensor, k_norm: Tensor | None = None) -> Tensor:
    """ROME rank-one update (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 2).

    ``left = C⁻¹ k_avg`` (reference ``compute_u``: ``k_avg`` is the subject key averaged over context
    templates), ``ΔW = (v − W k_norm) leftᵀ / (leftᵀ k_norm)``, so that ``(W + ΔW) k_norm = v`` exactly.
    ``k_norm`` is the key the update is normalised by: original ROME (``compute_v``) uses the request
    prompt's own key, r-ROME (Gupta et al. 2024, "Rebuilding ROME") uses ``k_avg`` itself, the default.
    ``v`` is the target *without* any bias of the layer (the reference subtracts the module output, bias
    included). Shapes: ``W (d_out, d_in)``, ``C (d_in, d_in)``, ``k_avg, k_norm (d_in,)``, ``v (d_out,)``.
    """
    W64 = _mat(W, "W")
    d_out, d_in = W64.shape
    v64 = _vec(v, "v", d_out)
    direction, kn = _rome_direction(C, k_avg, k_norm, d_in)
    return ((v64 - W64 @ kn) @ direction.T).to(W.dtype)


def rome_direction(C: Tensor, k_avg: Tensor, k_norm: Tensor | None = None) -> Tensor:
    """``C⁻¹ k_avg / ((C⁻¹ k_avg)ᵀ k_norm)``, the ``(d_in,)`` row space of ROME's update: ``rome_update`` is
    ``(v − W k_norm) ⊗`` this, so the update changes the output at any key ``k`` by ``(v − W k_norm) · (thisᵀ k)``."""
    return _rome_direction(C, k_avg, k_norm)[0].reshape(-1).to(C.dtype)


def _rome_direction(C: Tensor, k_avg: Tensor, k_norm: Tensor | None, d_in: int | None = None) -> tuple[Tensor, Tensor]:
    """The direction and the normalising key, both float64 columns (``d_in`` from ``C`` unless given)."""
    C64 = _square(C, "C", d_in)
    d_in = C64.shape[0]
    k = _vec(k_avg, "k_avg", d_in)
    kn = k if k_norm is None else _vec(k_norm, "k_norm", d_in)
    left = _spd_solve(C64, k)  # (d_in, 1)
    denom = (left.T @ kn).squeeze()
    if denom.abs() <= torch.finfo(_F64).tiny:
        raise ValueError("leftᵀ k_norm is zero: k_norm is C-orthogonal to k_avg")
    return left / denom, kn


def memit_update(C: Tensor, K: Tensor, R: Tensor, lam: float) -> Tensor:
    """MEMIT batch update (Meng et al. 2023, "Mass-Editing Memory in a Transformer", eq. 14).

    ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹``, the minimiser of ``‖ΔW K − R‖²_F + λ tr(ΔW C ΔWᵀ)``. ``R`` holds the
    residuals (target minus current output), already divided among the edited layers by the caller (the
    reference divides ``z − h`` by the number of remaining layers); ``lam`` is ``mom2_update_weight``.
    Shapes: ``C (d_in, d_in)``, ``K (d_in, n)``, ``R (d_out, n)``; returns ``(d_out, d_in)`` in ``R``'s dtype.
    """
    return ridge_update(ridge_system(K, lam, C), R)


@dataclass
class RidgeSystem:
    """The factorised normal matrix ``A = K Kᵀ + λ M + C_prev`` of a ridge-regularised least-squares edit
    (``M``: ``C`` or ``I``), with what :func:`ridge_update` and :func:`ridge_backward` need. float64."""

    K: Tensor  # (d_in, n)
    M: Tensor | None  # (d_in, d_in) the preservation matrix, None for the identity
    chol: Tensor | None  # Cholesky factor of A, or None when A was not numerically positive definite
    A: Tensor


def ridge_system(K: Tensor, lam: float | Tensor, C: Tensor | None = None, C_prev: Tensor | None = None) -> RidgeSystem:
    """Factorise ``A = K Kᵀ + λ C + C_prev`` (``C`` = I when None, ``C_prev`` = 0 when None) once, for
    :func:`ridge_update` and :func:`ridge_backward`. ``ΔW = R Kᵀ A⁻¹`` minimises
    ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) + ‖ΔW K_prev‖²`` (``C_prev = K_prev K_prevᵀ``): MEMIT's solve (``C`` the key
    second moment), MALMEN's aggregation (``C = I``; Tan et al. 2024, eq. 5) and both with earlier edits' keys
    preserved (AlphaEdit's / sequential ``C_prev``). ``lam`` may be a tensor (its value is used; gradients come
    from :func:`ridge_backward`)."""
    K64 = _mat(K, "K")
    d_in = K64.shape[0]
    lam = float(lam.detach()) if isinstance(lam, Tensor) else float(lam)
    A = K64 @ K64.T
    M = None
    if C is None:
        A = A + lam * _eye(d_in, K64)
    else:
        M = _square(C, "C", d_in)
        A = A + lam * M
    if C_prev is not None:
        A = A + _square(C_prev, "C_prev", d_in)
    L, info = torch.linalg.cholesky_ex(A)
    return RidgeSystem(K64, M, L if int(info) == 0 else None, A)


def _ridge_solve(sys: RidgeSystem, B: Tensor) -> Tensor:
    return torch.cholesky_solve(B, sys.chol) if sys.chol is not None else torch.linalg.solve(sys.A, B)


def ridge_update(sys: RidgeSystem, R: Tensor) -> Tensor:
    """``ΔW = R Kᵀ A⁻¹`` ``(d_out, d_in)`` for value shifts ``R`` ``(d_out, n)``, in ``R``'s dtype."""
    R64 = _mat(R, "R", cols=sys.K.shape[1])
    return _ridge_solve(sys, sys.K @ R64.T).T.to(R.dtype)  # A symmetric: ΔWᵀ = A⁻¹ K Rᵀ


def ridge_backward(sys: RidgeSystem, G: Tensor, dW: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of a loss through ``ΔW = R Kᵀ A⁻¹(λ)``, given ``G = ∂L/∂ΔW`` and the ``ΔW`` of
    :func:`ridge_update`: ``∂L/∂R = X K`` ``(d_out, n)`` with ``X = G A⁻¹``, and ``∂L/∂λ = −⟨X, ΔW C⟩``
    (a 0-d tensor; from ``dΔW = −ΔW C A⁻¹ dλ``). MALMEN's split backward (Tan et al. 2024, §4.2): the loss's
    graph ends at ``ΔW``, and these carry its gradient to the value shifts and λ. Returned in ``G``'s dtype."""
    G64 = _mat(G, "G", cols=sys.K.shape[0])
    dW64 = _mat(dW, "dW", *G64.shape)
    X = _ridge_solve(sys, G64.T).T  # (d_out, d_in)
    g_lam = -(X * (dW64 if sys.M is None else dW64 @ sys.M)).sum()
    return (X @ sys.K).to(G.dtype), g_lam.to(G.dtype)


def emmet_update(W: Tensor, C: Tensor, K: Tensor, V: Tensor, lam: float = 0.0) -> Tensor:
    """EMMET equality-constrained batch update (Gupta et al. 2024, "A Unified Framework for Model Editing").

    Minimises ``tr(ΔW C ΔWᵀ)`` subject to ``(W + ΔW) K = V``:
    ``ΔW = (V − W K) (Kᵀ C⁻¹ K + lam·I)⁻¹ Kᵀ C⁻¹``. ``lam > 0`` regularises an ill-conditioned
    ``Kᵀ C⁻¹ K`` (the constraint then holds only approximately). With one key and ``lam = 0`` this is the
    r-ROME update. The solution is invariant to rescaling ``C``. Shapes: ``W (d_out, d_in)``,
    ``C (d_in, d_in)``, ``K (d_in, n)``, ``V (d_out, n)``.
    """
    W64 = _mat(W, "W")
    d_out, d_in = W64.shape
    C64 = _square(C, "C", d_in)
    K64 = _mat(K, "K", rows=d_in)
    n = K64.shape[1]
    V64 = _mat(V, "V", d_out, n)
    CinvK = _spd_solve(C64, K64)  # (d_in, n)
    D = K64.T @ CinvK + lam * _eye(n, K64)  # (n, n), symmetric
    Y = torch.linalg.solve(D, (V64 - W64 @ K64).T)  # D⁻¹ (V − W K)ᵀ: (n, d_out)
    return (CinvK @ Y).T.to(W.dtype)


def null_space_projector(C: Tensor, threshold: float = 1e-2, relative: bool = False) -> Tensor:
    """AlphaEdit null-space projector (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing").

    ``P = U₀ U₀ᵀ`` where ``U₀`` are the eigenvectors (``torch.linalg.eigh``) of the symmetric PSD
    ``C = K₀K₀ᵀ``-like matrix whose eigenvalues are ``< threshold`` (``< threshold · λ_max`` when
    ``relative``); then ``P K₀ ≈ 0``. The reference takes the SVD of ``C`` with an absolute threshold
    (``nullspace_threshold``, 2e-2); for a PSD matrix singular values and eigenvalues coincide.
    Returns a ``(d_in, d_in)`` symmetric idempotent matrix (zeros if no eigenvalue is below the threshold).
    """
    C64 = _square(C, "C")
    evals, evecs = torch.linalg.eigh((C64 + C64.T) / 2)
    cut = threshold * float(evals.abs().max()) if relative else float(threshold)
    U0 = evecs[:, evals < cut]
    return (U0 @ U0.T).to(C.dtype)


def alphaedit_update(
    P: Tensor, K: Tensor, R: Tensor, C_prev: Tensor | None = None, l2: float = 1.0
) -> Tensor:
    """AlphaEdit null-space-projected update (Fang et al. 2025, eq. 14 / reference ``apply_AlphaEdit``).

    ``X = solve(P (C_prev + K Kᵀ) + l2·I, P K Rᵀ)`` of shape ``(d_in, d_out)`` and ``ΔW = Xᵀ
    = R Kᵀ P ((C_prev + K Kᵀ) P + l2·I)⁻¹``, the minimiser over ``ΔW = ΔW P`` of
    ``‖ΔW K − R‖² + ‖ΔW K_p‖² + l2 ‖ΔW‖²``. ``C_prev = Σ K_p K_pᵀ`` over the keys of earlier edits
    (sequential editing; zeros when None). Since ``l2 X = P (K Rᵀ − (C_prev + K Kᵀ) X)``, ``X`` lies in the
    range of ``P``, so ``ΔW K₀ = ΔW P K₀ ≈ 0`` for the preserved keys ``K₀``. Requires ``l2 > 0``.
    Shapes: ``P (d_in, d_in)``, ``K (d_in, n)``, ``R (d_out, n)``, ``C_prev (d_in, d_in)``.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0 (P (C_prev + K Kᵀ) is singular), got {l2}")
    K64 = _mat(K, "K")
    d_in, n = K64.shape
    P64 = _square(P, "P", d_in)
    R64 = _mat(R, "R", cols=n)
    A = K64 @ K64.T
    if C_prev is not None:
        A = A + _square(C_prev, "C_prev", d_in)
    X = torch.linalg.solve(P64 @ A + l2 * _eye(d_in, K64), P64 @ K64 @ R64.T)
    return X.T.to(R.dtype)
