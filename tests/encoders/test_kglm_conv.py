"""Convolutional kGLM DEQ equals the dense kGLM on a small pixel grid (SPEC §4)."""

from __future__ import annotations

import pytest
import torch

from deqppl.encoders.kglm import ConvKGLMLayer, Informed, Random, conv_spectral_norm, kernel_stencil, solve_kglm
from deqppl.encoders.kglm import spectral_norm
from deqppl.expfam import bernoulli, gaussian
from deqppl.kernels import Matern32, SquaredExponential

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grid(H: int, W: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64))


@pytest.mark.parametrize("kernel", [SquaredExponential(lengthscale=1.5), Matern32(lengthscale=2.0)], ids=["se", "m32"])
def test_conv_is_dense_kernel_and_its_norm(kernel) -> None:
    H, W = 7, 5
    K = kernel(_grid(H, W))
    k = kernel_stencil(kernel, (H - 1, W - 1))
    z = torch.randn(3, H, W, generator=torch.Generator().manual_seed(0))
    from deqppl.encoders.kglm import _conv, _conv_transpose

    torch.testing.assert_close(_conv(z, k).reshape(3, -1), z.reshape(3, -1) @ K.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(_conv_transpose(z, k).reshape(3, -1), z.reshape(3, -1) @ K, rtol=0, atol=1e-12)
    # power iteration on the convolution vs the dense eigenvalue; stops at a 1e-12 change of the
    # Rayleigh quotient, so the estimate is within ~1e-10 for this spectral gap
    torch.testing.assert_close(conv_spectral_norm(k, (H, W)), spectral_norm(K), rtol=1e-9, atol=0)


@pytest.mark.parametrize(("fam", "s"), [(gaussian(), 1.0), (bernoulli(), 2.0), (bernoulli(), 0.3)],
                         ids=["gaussian", "bernoulli-s2", "bernoulli-s0.3"])
def test_conv_deq_equals_dense_kglm(fam, s: float) -> None:
    H, W = 6, 5
    kernel = SquaredExponential(lengthscale=1.2)
    g = torch.Generator().manual_seed(1)
    y = torch.bernoulli(torch.full((H, W), 0.4), generator=g) if fam.name == "bernoulli" else torch.randn(H, W, generator=g)
    layer = ConvKGLMLayer(fam, (H, W), init=Informed(kernel, s=s))
    z, sol = layer(y)
    assert bool(sol.converged.all()) and sol.solver == "Anderson"
    K = kernel(_grid(H, W))
    dense = solve_kglm(fam, K, y.reshape(-1), lam=layer.lam)
    torch.testing.assert_close(z[0].reshape(-1), dense.mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(layer.lam, s * spectral_norm(K), rtol=1e-9, atol=0)  # power iteration


def test_random_init_and_norm_sweep() -> None:
    layer = ConvKGLMLayer(gaussian(), (8, 8), init=Random(), radius=(2, 2), spectral_norm=0.7, seed=3)
    assert layer.w_W.shape == (5, 5)
    torch.testing.assert_close(conv_spectral_norm(layer.w_W.detach(), (8, 8)), 0.7, rtol=1e-8, atol=0)
    inf = ConvKGLMLayer(gaussian(), (8, 8), init=Informed(SquaredExponential()), spectral_norm=0.7)
    torch.testing.assert_close(conv_spectral_norm(inf.w_W.detach(), (8, 8)), 0.7, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match=r"y must have shape \(B, 8, 8\)"):
        layer(torch.zeros(8, 7))
    with pytest.raises(TypeError, match="init must be"):
        ConvKGLMLayer(gaussian(), (8, 8), init="random")  # type: ignore[arg-type]


def test_experiment_c_corrupted_image_equals_kernel_logistic_regression() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    from kglm_image_check import run

    r = run(size=28, seed=0)
    assert r["flipped"] == 784 // 3
    assert r["max_abs_diff"] <= 1e-8 and r["disagreeing"] == 0
