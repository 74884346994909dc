"""Ground truth for msif_lab.solvers: dense, CG and LiSSA solve (H + λI) x = v; failures are loud and explained."""
import math

import pytest
import torch

try:
    from tiny_models import DT, random_spd, random_symmetric, trained
except ImportError:  # tests/ made a package
    from tests.tiny_models import DT, random_spd, random_symmetric, trained

from msif_lab.curvature import NonFiniteError, StageObjective
from msif_lab.solvers import (DenseFactor, NegativeCurvatureError, Solver, SolveInfo, SolverDivergedError, cg_solve,
                              dense_solve, lissa_solve, power_iteration)


def _rhs(k, p, seed=1):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _residual(H, lam, X, V):
    """max_k ||(H + λI) x_k − v_k|| / ||v_k||, computed here, not by the solver."""
    R = X @ (H + lam * torch.eye(len(H), dtype=H.dtype)).T - V
    return float((R.norm(dim=1) / V.norm(dim=1)).max())


# ------------------------------------------------------------------------------------------------ random SPD problems
@pytest.mark.parametrize("p", [1, 4, 12, 30])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_dense_cg_lissa_agree_on_random_spd(p, lam):
    H = random_spd(p, cond=20.0, seed=p)
    V = _rhs(4, p)
    exact = torch.linalg.solve(H + lam * torch.eye(p, dtype=DT), V.T).T

    xd, di = dense_solve(H, V, damping=lam)
    xc, ci = cg_solve(lambda x: H @ x, V, damping=lam, tol=1e-12)
    xl, li = lissa_solve(lambda x: H @ x, V, damping=lam, depth=800)

    for X, tol in [(xd, 1e-12), (xc, 1e-10), (xl, 1e-9)]:
        assert X.shape == V.shape
        assert _residual(H, lam, X, V) < tol
        assert torch.allclose(X, exact, rtol=0, atol=tol * 100 * float(exact.abs().max()))
    # diagnostics are honest about what happened
    assert di.method == "dense" and di.n_negative == 0 and di.n_rhs == 4 and di.residual < 1e-12
    e = torch.linalg.eigvalsh(H)
    assert math.isclose(di.eig_min, e[0], rel_tol=1e-9) and math.isclose(di.eig_max, e[-1], rel_tol=1e-9)
    assert ci.method == "cg" and ci.converged and ci.residual < 1e-10 and ci.iterations <= p + 5
    assert li.method == "lissa" and li.converged and li.scale >= float(e[-1]) + lam and li.residual < 1e-9
    assert di.damping == ci.damping == li.damping == lam


def test_single_rhs_gives_a_vector():
    H = random_spd(6, seed=3)
    v = _rhs(1, 6)[0]
    for x, _ in [dense_solve(H, v, 0.1), cg_solve(lambda y: H @ y, v, 0.1), lissa_solve(lambda y: H @ y, v, 0.1)]:
        assert x.shape == (6,)
        assert _residual(H, 0.1, x[None], v[None]) < 1e-7


def test_damping_means_h_plus_lambda_identity():
    """One meaning of λ: the solution of (H + λI)x = v, checked against a matrix we damp ourselves."""
    H = random_spd(5, seed=7)
    v = _rhs(2, 5)
    lam = 0.7
    Hd = H + lam * torch.eye(5, dtype=DT)
    for x, _ in [dense_solve(H, v, lam), cg_solve(lambda y: H @ y, v, lam, tol=1e-13),
                 lissa_solve(lambda y: H @ y, v, lam, depth=300)]:
        assert torch.allclose(Hd @ x.T, v.T, atol=1e-9)
        # and not a solution of the undamped or the "scaled" systems
        assert not torch.allclose(H @ x.T, v.T, atol=1e-3)


def test_dense_factor_is_reusable_across_dampings():
    H = random_spd(7, seed=2)
    fac = DenseFactor.from_hessian(H)
    v = _rhs(3, 7)
    for lam in [0.0, 0.01, 1.0]:
        x, info = fac.solve(v, lam)
        assert _residual(H, lam, x, v) < 1e-12 and info.damping == lam


def test_cg_reports_non_convergence_when_capped():
    H = random_spd(30, cond=1e4, seed=5)
    x, info = cg_solve(lambda y: H @ y, _rhs(1, 30)[0], tol=1e-14, max_iter=3)
    assert not info.converged and info.iterations == 3 and info.residual > 1e-6
    assert "NOT CONVERGED" in info.summary()


def test_power_iteration_finds_largest_magnitude_eigenvalue():
    H = random_symmetric([-3.0, 0.5, 1.0, 2.0], seed=4)
    lam = power_iteration(lambda x: H @ x, 4, iters=200)
    assert lam == pytest.approx(-3.0, rel=1e-6)
    H2 = random_spd(10, seed=8)
    assert power_iteration(lambda x: H2 @ x, 10, iters=300) == pytest.approx(1.0, rel=1e-6)


def test_lissa_stochastic_minibatch_estimate_is_close():
    """Stochastic LiSSA (mini-batch HVPs, averaged repeats) on the tiny network: a loose but real agreement."""
    ts, pre, _, _, _ = trained(None)
    obj = StageObjective(ts.pretrain, pre.params, ts.pretrain.trainable_names)
    H = obj.hessian()
    v = _rhs(1, obj.space.size, seed=9)[0]
    lam = 0.5
    exact = torch.linalg.solve(H + lam * torch.eye(len(H), dtype=DT), v)
    opts = dict(depth=40, repeats=2, scale=1.8)
    x, info = Solver("lissa", damping=lam, options=dict(opts, lissa_batch=20)).solve(obj, v)
    assert info.hvp_calls >= 2 * 40
    assert (x - exact).norm() / exact.norm() < 0.15
    # the same settings with full-batch HVPs are exact to the series' truncation error
    x2, _ = Solver("lissa", damping=lam, options=opts).solve(obj, v)
    assert (x2 - exact).norm() / exact.norm() < 1e-4


# ------------------------------------------------------------------------------------------------ a network's Hessian
@pytest.mark.parametrize("method,lam,k,tol", [
    ("dense", 0.0, 3, 1e-10), ("dense", 0.05, 3, 1e-10), ("cg", 0.0, 2, 1e-8), ("cg", 0.05, 2, 1e-8),
    ("lissa", 0.3, 1, 1e-6),  # LiSSA converges like (1 − (λ_min+λ)/s)^J: damped, so that J stays small
])
def test_solvers_agree_on_a_small_networks_damped_hessian(method, lam, k, tol):
    ts, pre, _, _, _ = trained(None)
    obj = StageObjective(ts.pretrain, pre.params, ts.pretrain.trainable_names)
    H = obj.hessian()
    p = obj.space.size
    assert H.shape == (p, p) and torch.allclose(H, H.T)
    V = _rhs(k, p, seed=11)
    exact = torch.linalg.solve(H + lam * torch.eye(p, dtype=DT), V.T).T
    options = {"dense": {}, "cg": dict(tol=1e-12, max_iter=500), "lissa": dict(depth=110, scale=1.6)}[method]
    X, info = Solver(method, lam, options).solve(obj, V)
    assert isinstance(info, SolveInfo) and info.method == method and info.damping == lam
    assert _residual(H, lam, X, V) < tol, info.summary()
    assert (X - exact).norm() / exact.norm() < tol * 1e2, info.summary()
    assert info.residual == pytest.approx(_residual(H, lam, X, V), rel=1e-3, abs=1e-14)


# ------------------------------------------------------------------------------------------------ failures
def test_dense_reports_negative_eigenvalues():
    H = random_symmetric([-2.0, -0.5, 1.0, 3.0], seed=1)
    v = _rhs(2, 4)
    x, info = dense_solve(H, v, damping=0.1)
    assert info.n_negative == 2
    assert info.eig_min == pytest.approx(-2.0) and info.eig_max == pytest.approx(3.0)
    assert any("indefinite" in n for n in info.notes)
    assert "non-positive eig(H+λI)=2" in info.summary()
    assert _residual(H, 0.1, x, v) < 1e-12  # still the exact solution of the (indefinite) system
    # enough damping removes them
    _, info = dense_solve(H, v, damping=2.5)
    assert info.n_negative == 0 and not info.notes


def test_dense_singular_system_is_refused():
    H = random_symmetric([-1.0, 1.0, 2.0], seed=2)
    with pytest.raises(ValueError, match="singular.*increase the damping"):
        dense_solve(H, _rhs(1, 3), damping=1.0)


def test_dense_rejects_bad_hessians():
    with pytest.raises(ValueError, match="square"):
        dense_solve(torch.zeros(3, 4, dtype=DT), _rhs(1, 3))
    H = random_spd(3)
    H[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        dense_solve(H, _rhs(1, 3))


def test_cg_on_indefinite_hessian_raises_negative_curvature():
    H = random_symmetric([-1.0, 0.5, 1.0, 2.0], seed=3)
    v = torch.ones(4, dtype=DT)
    with pytest.raises(NegativeCurvatureError, match="negative curvature.*increase the damping") as err:
        cg_solve(lambda x: H @ x, v, damping=0.1)
    assert err.value.info.negative_curvature and not err.value.info.converged
    # damping above −λ_min makes it positive definite: CG works
    x, info = cg_solve(lambda x: H @ x, v, damping=1.5, tol=1e-12)
    assert info.converged and _residual(H, 1.5, x[None], v[None]) < 1e-10


def test_lissa_with_too_small_scale_diverges_with_a_helpful_message():
    H = random_spd(6, seed=4)  # λ_max = 1
    with pytest.raises(SolverDivergedError, match="raise the scale above the largest eigenvalue") as err:
        lissa_solve(lambda x: H @ x, _rhs(1, 6)[0], scale=0.3, depth=500)
    assert not err.value.info.converged and err.value.info.scale == 0.3


def test_lissa_on_indefinite_hessian_diverges():
    H = random_symmetric([-0.5, 0.2, 1.0, 2.0], seed=5)
    with pytest.raises(SolverDivergedError, match=r"raise λ above −λ_min\(H\)"):
        lissa_solve(lambda x: H @ x, _rhs(1, 4)[0], depth=3000)


def test_lissa_rejects_bad_scale():
    H = random_spd(3)
    with pytest.raises(ValueError, match="scale must be > 0"):
        lissa_solve(lambda x: H @ x, _rhs(1, 3)[0], scale=-1.0)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(())])
def test_rhs_of_wrong_rank_is_refused(bad):
    H = random_spd(3)
    with pytest.raises(ValueError, match=r"Right-hand side must be \[p\] or \[k, p\]"):
        cg_solve(lambda x: H @ x, bad.to(DT))


def test_solver_config_validates_its_arguments():
    with pytest.raises(ValueError, match="Unknown solver 'newton'.*'dense', 'cg' or 'lissa'"):
        Solver("newton")
    for bad in [-1e-3, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="damping must be a finite λ ≥ 0"):
            Solver("cg", damping=bad)
    s = Solver("cg", 0.1).with_damping(0.2)
    assert s.method == "cg" and s.damping == 0.2


@pytest.mark.parametrize("solve", [
    lambda H, v: dense_solve(H, v),
    lambda H, v: cg_solve(lambda x: H @ x, v),
    lambda H, v: lissa_solve(lambda x: H @ x, v, depth=10),
], ids=["dense", "cg", "lissa"])
def test_non_finite_right_hand_side_is_refused(solve):
    H = random_spd(3)
    v = _rhs(2, 3)
    v[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="right-hand side v of the .* solve has 1 NaN/inf entries"):
        solve(H, v)


def test_dense_right_hand_side_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"right-hand side has length 5 but the Hessian is 4×4: expected v of shape "
                                         r"\[4\] or \[k, 4\]"):
        dense_solve(random_spd(4), _rhs(1, 5)[0])


def test_solver_options_are_checked_when_the_solver_is_made():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['tolerance'\] for the 'cg' solver; its options are "
                                         r"\['tol', 'max_iter'\]"):
        Solver("cg", options={"tolerance": 1e-6})
    with pytest.raises(ValueError, match=r"'lissa' solver; its options are \['scale', 'depth', 'repeats', 'tol', "
                                         r"'seed', 'lissa_batch'\]"):
        Solver("lissa", options={"batch": 8})
    with pytest.raises(ValueError, match="'dense' solver; its options are \\[\\]. Fix: drop the options"):
        Solver("dense", options={"tol": 1e-6})
    with pytest.raises(ValueError, match="pass damping=λ to Solver itself"):
        Solver("cg", options={"damping": 0.1})
    Solver("lissa", options={"lissa_batch": 8, "depth": 5, "seed": 1})  # valid ones pass


def test_lissa_converged_says_whether_its_stopping_test_was_met():
    H = random_spd(12, cond=200.0, seed=3)
    v = _rhs(1, 12)[0]
    _, short = lissa_solve(lambda x: H @ x, v, depth=20, tol=1e-12)  # far too few steps for this conditioning
    _, long = lissa_solve(lambda x: H @ x, v, depth=20000, tol=1e-10)
    assert short.converged is False and short.iterations == 20
    assert long.converged is True and long.iterations < 20000
