"""Closed-form editor algebra (locate_edit.solvers) on small seeded random matrices."""

from __future__ import annotations

import pytest
import torch
from tolerance import f32_tol

from locate_edit.solvers import (
    alphaedit_update,
    emmet_update,
    memit_update,
    null_space_projector,
    regularize,
    ridge_backward,
    ridge_system,
    ridge_update,
    rome_direction,
    rome_update,
)

D_IN, D_OUT, N_SAMPLES = 24, 16, 400
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def setup():
    """Full-rank key second moment C = K₀K₀ᵀ/N (keys with a non-isotropic spread), a weight and a key."""
    g = _gen(0)
    mix = _randn(D_IN, D_IN, g=g) + 2 * torch.eye(D_IN, dtype=F64)
    K0 = mix @ _randn(D_IN, N_SAMPLES, g=g)
    C = K0 @ K0.T / N_SAMPLES
    W = _randn(D_OUT, D_IN, g=g)
    return g, C, W


@pytest.fixture
def low_rank():
    """Preserved keys K₀ of rank 12 < d_in, so that C = K₀K₀ᵀ/N has a 12-dimensional null space."""
    g = _gen(1)
    K0 = _randn(D_IN, 12, g=g) @ _randn(12, N_SAMPLES, g=g)
    return g, K0, K0 @ K0.T / N_SAMPLES


# ---------------------------------------------------------------- ROME / r-ROME


def test_rome_default_k_norm_hits_target_rank_one(setup):
    g, C, W = setup
    k, v = _randn(D_IN, g=g), _randn(D_OUT, g=g)
    dW = rome_update(W, C, k, v)
    assert dW.shape == W.shape
    assert rel((W + dW) @ k, v) < 1e-10  # float64: (W + ΔW) k = v up to rounding
    assert torch.linalg.matrix_rank(dW) == 1


def test_rome_other_k_norm_hits_target_along_c_inv_k_avg(setup):
    g, C, W = setup
    k_avg, k_prompt, v = _randn(D_IN, g=g), _randn(D_IN, g=g), _randn(D_OUT, g=g)
    dW = rome_update(W, C, k_avg, v, k_norm=k_prompt)
    assert rel((W + dW) @ k_prompt, v) < 1e-10
    assert torch.linalg.matrix_rank(dW) == 1
    # the row space is spanned by C⁻¹ k_avg, not by the normalising key
    left = torch.linalg.solve(C, k_avg)
    left = left / left.norm()
    assert rel(dW @ left[:, None] @ left[None, :], dW) < 1e-8
    # column vectors (d, 1) are accepted too
    assert torch.allclose(rome_update(W, C, k_avg[:, None], v[:, None], k_prompt[:, None]), dW)


@pytest.mark.parametrize("own_norm", [False, True])
def test_rome_direction_gives_the_change_at_any_key(setup, own_norm):
    g, C, W = setup
    k_avg, k_prompt, v = _randn(D_IN, g=g), _randn(D_IN, g=g), _randn(D_OUT, g=g)
    k_norm = k_prompt if own_norm else k_avg
    dW = rome_update(W, C, k_avg, v, k_norm=k_norm)
    u = rome_direction(C, k_avg, k_norm)
    assert u.shape == (D_IN,) and abs(float(u @ k_norm) - 1) < 1e-10
    K = _randn(D_IN, 7, g=g)  # any keys: the update adds (v − W k_norm)(uᵀk) at each
    assert rel(dW @ K, torch.outer(v - W @ k_norm, u @ K)) < 1e-10


def test_rome_identity_c_is_minimum_norm_rank_one(setup):
    g, _, W = setup
    k, v = _randn(D_IN, g=g), _randn(D_OUT, g=g)
    dW = rome_update(W, torch.eye(D_IN, dtype=F64), k, v)
    expected = torch.outer(v - W @ k, k) / (k @ k)
    assert rel(dW, expected) < 1e-10


def test_rome_ridge_keeps_the_constraint_and_shrinks_the_update(setup):
    """ROME on ``C + ridge·tr(C)/d·I`` (the ``ridge`` option) still writes ``v`` at the key exactly; its Frobenius
    norm falls as the ridge grows, towards the minimum-norm update (identity C)."""
    g, C, W = setup
    k, v = _randn(D_IN, g=g), _randn(D_OUT, g=g)
    norms = []
    for ridge in (0.0, 0.1, 1.0, 1e6):
        dW = rome_update(W, regularize(C, ridge) if ridge else C, k, v)
        assert rel((W + dW) @ k, v) < 1e-10
        norms.append(float(torch.linalg.norm(dW)))
    assert norms[0] > norms[1] > norms[2] > norms[3]
    minimum = torch.outer(v - W @ k, k) / (k @ k)
    assert norms[3] == pytest.approx(float(torch.linalg.norm(minimum)), rel=1e-4)


def test_r_rome_equals_emmet_with_one_key(setup):
    g, C, W = setup
    k, v = _randn(D_IN, g=g), _randn(D_OUT, g=g)
    assert rel(emmet_update(W, C, k[:, None], v[:, None]), rome_update(W, C, k, v)) < 1e-10


def test_sequential_r_rome_total_is_the_min_norm_change_for_its_final_values(setup):
    """Each r-ROME update's row space is C⁻¹k (with earlier keys added to C as well, by Woodbury), so the total of
    a sequence of them is EMMET's minimum-C-norm change writing, at every edited key, the value it ends with:
    re-solving over the history cannot make it smaller (README, sequential editing)."""
    g, C, W0 = setup
    K, V = _randn(D_IN, 4, g=g), _randn(D_OUT, 4, g=g)
    for memory in (0.0, 1.0):
        W = W0.clone()
        for i in range(K.shape[1]):
            Ci = C + memory * K[:, :i] @ K[:, :i].T
            W = W + rome_update(W, Ci, K[:, i], V[:, i])
        assert rel(emmet_update(W0, C, K, W @ K), W - W0) < 1e-8


# ---------------------------------------------------------------- EMMET


def test_emmet_satisfies_constraint(setup):
    g, C, W = setup
    K, V = _randn(D_IN, 5, g=g), _randn(D_OUT, 5, g=g)
    dW = emmet_update(W, C, K, V)
    assert dW.shape == W.shape
    assert rel((W + dW) @ K, V) < 1e-10  # float64: the constraint holds up to rounding


def test_emmet_minimises_c_weighted_norm_among_feasible(setup):
    g, C, W = setup
    K, V = _randn(D_IN, 5, g=g), _randn(D_OUT, 5, g=g)
    dW = emmet_update(W, C, K, V)

    def cost(D):
        return float(torch.trace(D @ C @ D.T))

    not_k = torch.eye(D_IN, dtype=F64) - K @ torch.linalg.solve(K.T @ K, K.T)  # Z = A·not_k has Z K = 0
    for scale in (1e-3, 1e-1, 1.0):
        Z = scale * _randn(D_OUT, D_IN, g=g) @ not_k
        assert torch.linalg.norm(Z @ K) < 1e-10
        assert rel((W + dW + Z) @ K, V) < 1e-10  # still feasible
        assert cost(dW + Z) > cost(dW)
    # invariant to rescaling C (the reference's mom2_update_weight has no effect on EMMET)
    assert rel(emmet_update(W, 7.0 * C, K, V), dW) < 1e-10


def test_emmet_lambda_regularises(setup):
    g, C, W = setup
    K, V = _randn(D_IN, 5, g=g), _randn(D_OUT, 5, g=g)
    dW = emmet_update(W, C, K, V)
    assert rel(emmet_update(W, C, K, V, lam=1e-10), dW) < 1e-6
    damped = emmet_update(W, C, K, V, lam=10.0)
    assert torch.linalg.norm(damped) < torch.linalg.norm(dW)
    assert rel((W + damped) @ K, V) > 1e-3  # the constraint now holds only approximately


# ---------------------------------------------------------------- MEMIT


@pytest.mark.parametrize("lam", [0.1, 1.0, 1e4])
def test_memit_is_stationary_point_of_objective(setup, lam):
    g, C, _ = setup
    K, R = _randn(D_IN, 8, g=g), _randn(D_OUT, 8, g=g)
    dW = memit_update(C, K, R, lam)
    assert dW.shape == (D_OUT, D_IN)
    grad = 2 * (dW @ K - R) @ K.T + 2 * lam * dW @ C
    assert torch.linalg.norm(grad) / torch.linalg.norm(R @ K.T) < 1e-6


def test_memit_small_lambda_fits_residuals(setup):
    g, C, _ = setup
    K, R = _randn(D_IN, 10, g=g), _randn(D_OUT, 10, g=g)
    assert rel(memit_update(C, K, R, 1e-8) @ K, R) < 1e-5
    # larger λ trades fit for a smaller C-weighted change
    assert rel(memit_update(C, K, R, 10.0) @ K, R) > 1e-2


# ---------------------------------------------------------------- AlphaEdit


def test_null_space_projector_is_orthogonal_projector_onto_null_space(low_rank):
    _, K0, C = low_rank
    P = null_space_projector(C, threshold=1e-2)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert round(float(torch.trace(P))) == D_IN - 12
    assert torch.linalg.norm(P @ K0) / torch.linalg.norm(K0) < 1e-8


def test_null_space_projector_relative_threshold(low_rank):
    _, K0, C = low_rank
    P = null_space_projector(C, threshold=1e-6, relative=True)
    assert round(float(torch.trace(P))) == D_IN - 12
    assert torch.allclose(P, null_space_projector(C, threshold=1e-2))
    # scaling C changes the absolute cut but not the relative one
    assert torch.allclose(null_space_projector(1e6 * C, threshold=1e-6, relative=True), P)
    # round-off puts the null eigenvalues at ±1e-14: any cut between that and the spectrum finds them
    assert round(float(torch.trace(null_space_projector(C, threshold=1e-10)))) == D_IN - 12
    assert round(float(torch.trace(null_space_projector(C, threshold=2.0, relative=True)))) == D_IN


def test_alphaedit_update_preserves_k0_and_is_stationary(low_rank):
    g, K0, C = low_rank
    P = null_space_projector(C)
    K, R = _randn(D_IN, 4, g=g), _randn(D_OUT, 4, g=g)
    l2 = 0.5
    dW = alphaedit_update(P, K, R, l2=l2)
    assert dW.shape == (D_OUT, D_IN)
    assert torch.linalg.norm(dW @ K0) / (torch.linalg.norm(dW) * torch.linalg.norm(K0)) < 1e-4
    assert torch.linalg.norm(dW @ P - dW) / torch.linalg.norm(dW) < 1e-10  # ΔW = ΔW P
    # stationary point of ‖ΔW K − R‖² + l2‖ΔW‖² over ΔW = ΔW P
    grad = (dW @ K - R) @ K.T @ P + l2 * dW
    assert torch.linalg.norm(grad) / torch.linalg.norm(R @ K.T) < 1e-8
    # small l2: the new keys are written (12-dim null space, 4 keys)
    assert rel(alphaedit_update(P, K, R, l2=1e-6) @ K, R) < 1e-3


def test_alphaedit_c_prev_keeps_earlier_edits(low_rank):
    g, K0, C = low_rank
    P = null_space_projector(C)
    K_prev, K, R = _randn(D_IN, 4, g=g), _randn(D_IN, 3, g=g), _randn(D_OUT, 3, g=g)
    C_prev = K_prev @ K_prev.T
    free = alphaedit_update(P, K, R, l2=1e-4)
    kept = alphaedit_update(P, K, R, C_prev=C_prev, l2=1e-4)
    assert torch.linalg.norm(kept @ K_prev) < 1e-2 * torch.linalg.norm(free @ K_prev)
    assert torch.linalg.norm(kept @ K_prev) / torch.linalg.norm(R) < 1e-2
    assert rel(kept @ K, R) < 1e-2  # the new edits are still written
    assert torch.linalg.norm(kept @ K0) / (torch.linalg.norm(kept) * torch.linalg.norm(K0)) < 1e-4
    # zeros for C_prev is the same as None
    assert torch.allclose(alphaedit_update(P, K, R, C_prev=torch.zeros_like(C), l2=1e-4), free)


# ---------------------------------------------------------------- helpers, dtypes, validation


def test_null_space_projector_empty_for_full_rank(setup):
    _, C, _ = setup
    assert torch.count_nonzero(null_space_projector(C, threshold=1e-9)) == 0  # no null space: P = 0


def test_regularize_adds_scaled_identity(setup):
    _, C, _ = setup
    Cr = regularize(C, 0.1)
    assert torch.allclose(Cr - C, 0.1 * torch.trace(C) / D_IN * torch.eye(D_IN, dtype=F64))
    assert regularize(C.float(), 0.1).dtype == torch.float32


def test_float32_in_float32_out(setup, low_rank):
    g, C, W = setup
    C, W = C.float(), W.float()
    k, v = _randn(D_IN, g=g).float(), _randn(D_OUT, g=g).float()
    K, V = _randn(D_IN, 5, g=g).float(), _randn(D_OUT, 5, g=g).float()
    P = null_space_projector(low_rank[2].float())
    out = {
        "rome": rome_update(W, C, k, v),
        "emmet": emmet_update(W, C, K, V),
        "memit": memit_update(C, K, V, 1.0),
        "P": P,
        "alphaedit": alphaedit_update(P, K, V, C_prev=C, l2=1.0),
    }
    for name, t in out.items():
        assert t.dtype == torch.float32, name
    # computed in float64 internally: the float32 result matches the float64 one to float32 precision. The exact
    # update meets (W + ΔW) K = V; rounding ΔW to float32 and adding W in float32 moves each entry by
    # ≤ eps/2·(|ΔW| + |W + ΔW|) ≤ eps·(|W| + |ΔW|) = E, so the relative residual is ≤ ‖E‖_F ‖K‖₂ / ‖V‖_F
    mag = torch.linalg.norm(W.abs() + out["emmet"].abs()) * torch.linalg.matrix_norm(K, 2) / torch.linalg.norm(V)
    assert rel((W + out["emmet"]).double() @ K.double(), V.double()) <= f32_tol(mag, safety=1)


def test_bad_shapes_raise(setup):
    g, C, W = setup
    k, v = _randn(D_IN, g=g), _randn(D_OUT, g=g)
    K, V = _randn(D_IN, 5, g=g), _randn(D_OUT, 5, g=g)
    P = torch.eye(D_IN, dtype=F64)
    bad = [
        lambda: rome_update(W, C, k[:-1], v),  # key length
        lambda: rome_update(W, C, k, v[:-1]),  # value length
        lambda: rome_update(W, C[:-1], k, v),  # C not square
        lambda: rome_update(W, C, k, v, k_norm=K),  # k_norm a matrix
        lambda: rome_update(W[0], C, k, v),  # W 1-D
        lambda: memit_update(C, K, V[:, :4], 1.0),  # n mismatch
        lambda: memit_update(C[:-1, :-1], K, V, 1.0),  # C vs d_in
        lambda: emmet_update(W, C, K[:-1], V),  # K rows vs d_in
        lambda: emmet_update(W, C, K, V[:-1]),  # V rows vs d_out
        lambda: null_space_projector(K),  # not square
        lambda: alphaedit_update(P[:-1, :-1], K, V),  # P vs d_in
        lambda: alphaedit_update(P, K, V, C_prev=C[:-1]),  # C_prev not square
        lambda: alphaedit_update(P, K, V, l2=0.0),  # singular system
        lambda: regularize(K, 0.1),  # not square
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")


# --- the ridge solve of MALMEN and MEMIT (ridge_system / ridge_update / ridge_backward) ---------------------
def _definition(K: torch.Tensor, R: torch.Tensor, lam: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    eye = torch.eye(K.shape[0], dtype=F64)
    return R @ K.T @ torch.linalg.inv(K @ K.T + lam * (eye if C is None else C))


@pytest.mark.parametrize("n", [10, 40])
@pytest.mark.parametrize("lam", [1e-3, 1.0, 10.0])
def test_ridge_update_solves_its_normal_equations(n, lam):
    g = torch.Generator().manual_seed(n)
    K, R = torch.randn(24, n, generator=g, dtype=F64), torch.randn(16, n, generator=g, dtype=F64)
    dW = ridge_update(ridge_system(K, lam), R)
    want = _definition(K, R, torch.tensor(lam, dtype=F64))
    # float64 throughout: the error is the conditioning of KKᵀ + λI (≤ ~1e4 here) times the unit roundoff
    assert (dW - want).norm() / want.norm() < 1e-10
    assert ((dW @ K - R) @ K.T + lam * dW).norm() / (R @ K.T).norm() < 1e-10  # stationarity
    assert torch.allclose(dW, memit_update(torch.eye(24, dtype=F64), K, R, lam), rtol=0, atol=1e-12 * want.abs().max())
    Kp = torch.randn(24, 5, generator=g, dtype=F64)
    with_prev = ridge_update(ridge_system(K, lam, C_prev=Kp @ Kp.T), R)
    assert torch.allclose(with_prev, alphaedit_update(torch.eye(24, dtype=F64), K, R, Kp @ Kp.T, lam),
                          rtol=0, atol=1e-10 * with_prev.abs().max())


def test_ridge_backward_is_the_gradient_of_the_definition():
    g = torch.Generator().manual_seed(1)
    K, R = torch.randn(12, 7, generator=g, dtype=F64), torch.randn(5, 7, generator=g, dtype=F64)
    A = torch.randn(12, 12, generator=g, dtype=F64)
    C = A @ A.T / 12 + 0.1 * torch.eye(12, dtype=F64)
    G = torch.randn(5, 12, generator=g, dtype=F64)
    for M in (None, C):
        lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
        Rg = R.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda r, la, M=M: _definition(K, r, la, M), (Rg, lam))
        want_R, want_lam = torch.autograd.grad((G * _definition(K, Rg, lam, M)).sum(), (Rg, lam))
        system = ridge_system(K, 0.7, M)
        gR, g_lam = ridge_backward(system, G, ridge_update(system, R))
        assert torch.allclose(gR, want_R, rtol=1e-10, atol=1e-12) and torch.allclose(g_lam, want_lam, rtol=1e-10)


def test_ridge_keeps_float32_and_one_key_writes_its_value():
    """Sherman–Morrison: one key gives ΔW u = d ‖u‖²/(‖u‖² + λ); λ → 0 writes d exactly."""
    g = torch.Generator().manual_seed(2)
    u, d = torch.randn(30, 1, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    for lam in (1e-3, 1.0):
        dW = ridge_update(ridge_system(u, lam), d)
        s = float(u.norm() ** 2)
        assert (dW @ u - d * s / (s + lam)).norm() <= 1e-12 * d.norm()
    dW = ridge_update(ridge_system(u, 1e-12 * float(u.norm() ** 2)), d)
    assert (dW @ u - d).norm() <= 1e-10 * d.norm()
    out = ridge_update(ridge_system(u.float(), 1.0), d.float())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_large_batch_solves_match_the_float64_definition(solver):
    """Thousands of keys (n ≫ d_in, as in a 10,000-edit batch): the (d_in × d_in) solve from float32 keys and
    residuals equals the float64 normal-equation definition."""
    g = torch.Generator().manual_seed(3)
    n = 3000
    K = (torch.randn(D_IN, n, generator=g) * torch.linspace(0.1, 3.0, D_IN)[:, None]).float()
    R = torch.randn(D_OUT, n, generator=g).float()
    K64, R64 = K.double(), R.double()
    eye = torch.eye(D_IN, dtype=F64)
    if solver == "memit":
        C = (K64 @ K64.T) / n + 0.1 * eye
        got = memit_update(C, K, R, 50.0)
        want = R64 @ K64.T @ torch.linalg.inv(K64 @ K64.T + 50.0 * C)
    else:
        P = null_space_projector(eye * torch.linspace(0.0, 1.0, D_IN, dtype=F64), 0.3)
        got = alphaedit_update(P, K, R, None, 10.0)
        want = R64 @ K64.T @ P @ torch.linalg.inv((K64 @ K64.T) @ P + 10.0 * eye)
    assert got.dtype == torch.float32
    # float64 throughout, returned in float32: the float32 rounding of the result dominates
    assert torch.allclose(got.double(), want, rtol=0, atol=f32_tol(want.abs().max(), safety=2))
