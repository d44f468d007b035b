"""Kernels against scikit-learn's ``gaussian_process.kernels``, from one table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.gaussian_process import kernels as skk

from deqppl.kernels import (
    KERNELS,
    AbstractKernel,
    Constant,
    Linear,
    Matern32,
    Matern52,
    Periodic,
    Product,
    SquaredExponential,
    Sum,
    kernel,
)

# One table: (ours, scikit-learn's kernel with the same hyperparameters). Conventions:
# sklearn kernels have unit variance, so ours with variance s2 is ConstantKernel(s2) * theirs;
# DotProduct(sigma_0) is sigma_0^2 + x.x', so Linear(s2, c) is s2 * DotProduct(sqrt(c / s2)).
KERNEL_TABLE = [
    pytest.param(SquaredExponential(), skk.RBF(1.0), id="se"),
    pytest.param(
        SquaredExponential(lengthscale=0.4, variance=2.5),
        skk.ConstantKernel(2.5) * skk.RBF(0.4),
        id="se-scaled",
    ),
    pytest.param(Matern32(lengthscale=0.7), skk.Matern(0.7, nu=1.5), id="matern32"),
    pytest.param(
        Matern52(lengthscale=1.3, variance=0.3),
        skk.ConstantKernel(0.3) * skk.Matern(1.3, nu=2.5),
        id="matern52-scaled",
    ),
    pytest.param(
        Periodic(period=1.7, lengthscale=0.8, variance=1.5),
        skk.ConstantKernel(1.5) * skk.ExpSineSquared(0.8, periodicity=1.7),
        id="periodic",
    ),
    pytest.param(Linear(offset=0.5), skk.DotProduct(sigma_0=math.sqrt(0.5)), id="linear"),
    pytest.param(
        Linear(variance=2.0, offset=0.5),
        skk.ConstantKernel(2.0) * skk.DotProduct(sigma_0=math.sqrt(0.5 / 2.0)),
        id="linear-scaled",
    ),
    pytest.param(Constant(0.7), skk.ConstantKernel(0.7), id="constant"),
    pytest.param(
        SquaredExponential(0.5) + Periodic(period=2.0),
        skk.RBF(0.5) + skk.ExpSineSquared(1.0, periodicity=2.0),
        id="sum",
    ),
    pytest.param(
        Matern32(2.0) * Linear(offset=1.0),
        skk.Matern(2.0, nu=1.5) * skk.DotProduct(sigma_0=1.0),
        id="product",
    ),
    pytest.param(
        0.1 * SquaredExponential() * Periodic(period=3.0) + Matern52(0.3),
        skk.ConstantKernel(0.1) * skk.RBF(1.0) * skk.ExpSineSquared(1.0, periodicity=3.0)
        + skk.Matern(0.3, nu=2.5),
        id="scaled-sum-of-product",
    ),
]


def _inputs(n: int, p: int | None, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if p is None else (n, p)
    return 3.0 * torch.rand(shape, generator=g, dtype=torch.float64) - 1.5


def _np2d(x: torch.Tensor) -> np.ndarray:
    return x.reshape(x.shape[0], -1).numpy()


@pytest.mark.parametrize("p", [None, 1, 3], ids=["1d", "p1", "p3"])
@pytest.mark.parametrize(("ours", "theirs"), KERNEL_TABLE)
def test_matches_sklearn(ours: AbstractKernel, theirs: skk.Kernel, p: int | None) -> None:
    x1, x2 = _inputs(20, p, 0), _inputs(7, p, 1)
    # 1e-12: both sides evaluate the same closed forms in float64 by different routes
    # (sklearn via scipy's cdist).
    want = theirs(_np2d(x1), _np2d(x2))
    np.testing.assert_allclose(ours(x1, x2).numpy(), want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours(x1).numpy(), theirs(_np2d(x1)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("ours", "theirs"), KERNEL_TABLE)
def test_symmetric_psd(ours: AbstractKernel, theirs: skk.Kernel) -> None:
    # A dense grid gives a numerically singular K: the test of PSD is that rounding leaves
    # no eigenvalue below -1e-10 * (largest eigenvalue).
    x = torch.linspace(-2, 2, 60, dtype=torch.float64).reshape(30, 2)
    K = ours(x)
    assert torch.equal(K, K.T)
    eig = torch.linalg.eigvalsh(K)
    assert eig.min() >= -1e-10 * eig.max().clamp_min(1.0)


@pytest.mark.parametrize(("ours", "theirs"), KERNEL_TABLE)
def test_follows_dtype(ours: AbstractKernel, theirs: skk.Kernel) -> None:
    x = torch.linspace(0, 1, 5, dtype=torch.float32)
    K = ours(x, x[:3])
    assert K.dtype == torch.float32 and K.shape == (5, 3) and K.device == x.device
    # integer input promotes to the default float dtype, as elsewhere in deqppl
    assert ours([0, 1, 2]).dtype == torch.get_default_dtype()


def test_sum_and_product_algebra() -> None:
    a, b, c = SquaredExponential(0.5), Matern32(), Linear(offset=1.0)
    x = _inputs(9, 2, 3)
    assert torch.allclose((a + b)(x), a(x) + b(x), rtol=0, atol=0)
    assert torch.allclose((a * b)(x), a(x) * b(x), rtol=0, atol=0)
    assert isinstance(a + b + c, Sum) and len((a + b + c).kernels) == 3  # flattened
    assert isinstance(a * (b * c), Product) and len((a * (b * c)).kernels) == 3
    assert torch.equal((2.0 * a)(x), 2.0 * a(x))
    assert torch.equal((a * 2)(x), 2.0 * a(x))
    assert a + b == Sum((a, b))  # value semantics of frozen dataclasses


def test_input_gradients_finite() -> None:
    # sqrt at zero distance would give NaN gradients on the diagonal without the clamp.
    x = _inputs(6, 2, 4).requires_grad_(True)
    for k in (Matern32(), Matern52(), Periodic()):
        (g,) = torch.autograd.grad(k(x).sum(), x)
        assert torch.isfinite(g).all(), k


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (lambda: SquaredExponential(lengthscale=-1.0), "-1.0"),
        (lambda: SquaredExponential(variance=0.0), "0.0"),
        (lambda: Matern32(lengthscale=math.inf), "inf"),
        (lambda: Matern52(lengthscale=math.nan), "nan"),
        (lambda: Periodic(period=-2.0), "-2.0"),
        (lambda: Linear(offset=-0.5), "-0.5"),
        (lambda: Constant(-3.0), "-3.0"),
        (lambda: -1.0 * SquaredExponential(), "-1.0"),
    ],
    ids=["se-ls", "se-var", "m32-inf", "m52-nan", "period", "offset", "const", "neg-scale"],
)
def test_rejects_invalid_hyperparameters(make, value: str) -> None:
    with pytest.raises(ValueError, match=value):
        make()


def test_rejects_bad_inputs() -> None:
    k = SquaredExponential()
    with pytest.raises(TypeError, match="x1 must be numeric"):
        k(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="must be a number"):
        SquaredExponential(lengthscale="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(n, p\)"):
        k(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="same number of columns"):
        k(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="non-finite value nan at row 1, column 0"):
        k(torch.tensor([0.0, math.nan]))
    with pytest.raises(TypeError, match="kernels"):
        Sum((k, "rbf"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least two"):
        Sum((k,))


def test_lookup_by_name() -> None:
    assert kernel("squared_exponential", lengthscale=2.0) == SquaredExponential(2.0)
    assert kernel("periodic", period=3.0) == Periodic(period=3.0)
    with pytest.raises(ValueError, match="unknown kernel 'rbf'") as info:
        kernel("rbf")
    assert all(name in str(info.value) for name in KERNELS)
    with pytest.raises(TypeError, match="lenghtscale"):
        kernel("matern32", lenghtscale=1.0)
    with pytest.raises(ValueError, match="-1"):
        kernel("matern32", lengthscale=-1.0)


# ------------------------------------------------------------------- kernel matrices checked
class ExpandedSE(AbstractKernel):
    """A user's squared exponential written the usual fast way, with ``x x'^T`` by matmul.

    Rounding makes its ``K(x, x)`` asymmetric (by about eps) and its smallest eigenvalues
    slightly negative: the round-off the checks must accept.
    """

    def _matrix(self, x1, x2):
        d2 = (x1**2).sum(-1)[:, None] - 2 * x1 @ x2.T + (x2**2).sum(-1)[None, :]
        return torch.exp(-0.5 * d2.clamp_min(0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [50, 400])
def test_round_off_of_a_valid_user_kernel_is_accepted(dtype, n):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype)
    K = ExpandedSE()(x)
    assert torch.equal(K, K.T)  # symmetrised, so Cholesky and the DEQ read the same matrix
    # the oracle: the built-in kernel (exact differences) and scikit-learn's RBF
    ref = skk.RBF(1.0)(x.double().numpy())
    # float32: entries of d2 up to ~40 carry absolute rounding ~40 * 1.2e-7, so K differs by
    # ~5e-6 at worst; float64's 1e-12 is the same bound with eps = 2.2e-16
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(K.double().numpy(), ref, rtol=0, atol=atol)
    np.testing.assert_allclose(SquaredExponential()(x).double().numpy(), ref, rtol=0, atol=atol)


def test_asymmetric_and_indefinite_matrices_are_refused_with_the_numbers():
    x = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)

    class Shifted(AbstractKernel):  # k(x, x') = exp(-(x - x' - 0.1)^2): not symmetric
        def _matrix(self, x1, x2):
            return torch.exp(-((x1 - x2.T - 0.1) ** 2))

    with pytest.raises(ValueError, match=r"is not symmetric: K\[\d, \d\] = 0\.\d+ but K\[\d, \d\] = 0\.\d+"):
        Shifted()(x)
    # the cross matrix K(x1, x2) is not a Gram matrix and has no symmetry to check
    assert Shifted()(x, x[:3]).shape == (6, 3)

    class Negated(AbstractKernel):  # -SE: symmetric, every eigenvalue negative
        def _matrix(self, x1, x2):
            return -SquaredExponential()._matrix(x1, x2)

    K = SquaredExponential()(x)
    lam_min = float(torch.linalg.eigvalsh(-K)[0])  # the oracle of the reported eigenvalue
    with pytest.raises(ValueError, match=f"smallest eigenvalue is {lam_min:.6g} <"):
        Negated()(x)


def test_builtin_kernels_are_exactly_symmetric_without_the_psd_solve(monkeypatch):
    # built-in kernels are PSD by construction; the O(n^3) check is only for user kernels
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = (SquaredExponential(0.5) + Linear()) * Periodic() + 2.0 * Matern52()
    K = k(x)
    assert torch.equal(K, K.T) and calls == []
    ExpandedSE()(x)
    assert calls == [1]
