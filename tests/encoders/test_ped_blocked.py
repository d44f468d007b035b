"""The PED encoder's graph-free fast paths (row blocks, the symmetric-half Hessian GEMM, the
fused linearization) against the whole-batch formulas and autograd."""

import pytest
import torch

from deqppl.deq import Newton, fixed_point
from deqppl.encoders import PEDEncoder
from deqppl.encoders.base import BLOCK_ENTRIES, row_blocks, weighted_gram
from deqppl.models import ExpFamPCA

from test_ped import THEOREM1  # noqa: E402

#: Sizes with several row blocks and a partial last one (BLOCK_ENTRIES // D rows per block).
N, D, L = 700, 300, 3
CASES = [c[:5] for c in THEOREM1]


def _setup(fam, nl, lam, scale):
    # param_scale 0.3: the simulated natural parameters stay where every family's sampler
    # works (at the default scale exponential rates underflow to 0 with D = 300)
    model = ExpFamPCA(family=fam, obs_dim=D, latent_dim=L, nonlinearity=nl, lam=lam,
                      param_scale=0.3)
    y = model.simulate(N, seed=0, dtype=torch.float64).data["y"]
    gen = torch.Generator().manual_seed(1)
    # entries of size scale / sqrt(D) * 2: eta = Wz + B of order one, as for test_ped's D
    W = 2 * scale * torch.randn(D, L, generator=gen, dtype=torch.float64) / D**0.5
    B = 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)
    z = torch.randn(N, L, generator=gen, dtype=torch.float64)
    return model, PEDEncoder(model, W=W, B=B), y, z


def _neg_log_post(enc, z, y):
    """Per-row F(z) written from SPEC §2.2, with autograd (the independent oracle)."""
    fam, lik = enc.model.family, enc.likelihood
    v = lik.natural(z @ enc.W.detach().T + enc.B.detach())
    return 0.5 * enc.lam * (z * z).sum(-1) + (fam.A(v) - fam.T(y) * v).sum(-1)


def _autograd_hessian(enc, z, y):
    """Per-row Hessian of F ``(n, l, l)`` by autograd (rows are independent problems)."""
    zz = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_neg_log_post(enc, zz, y).sum(), zz, create_graph=True)
    rows = [torch.autograd.grad(g[:, i].sum(), zz, retain_graph=True)[0] for i in range(L)]
    return torch.stack(rows, 1).detach()


def test_sizes_have_several_blocks():
    blocks = row_blocks(N, D)
    assert len(blocks) >= 3 and blocks[-1].stop - blocks[-1].start < BLOCK_ENTRIES // D
    assert [b.start for b in blocks[1:]] == [b.stop for b in blocks[:-1]]


@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_blocked_layer_is_the_whole_batch_formula(fam, nl, lam, scale):
    model, enc, y, z = _setup(fam, nl, lam, scale)
    W, B = enc.W.detach(), enc.B.detach()
    with torch.no_grad():
        fast = enc.layer(z, y)
    whole = enc.likelihood.drive(y, z @ W.T + B) @ W / lam
    # same arithmetic row by row; 1e-13 relative allows BLAS to round a block differently
    torch.testing.assert_close(fast, whole, rtol=1e-13, atol=1e-13 * float(whole.abs().max()))
    # with a graph (W, B are parameters) the whole-batch expression runs, differentiably
    graph = enc.layer(z, y)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), fast, rtol=1e-13, atol=1e-13 * float(whole.abs().max()))


@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_blocked_and_fused_hessians_are_autograds(fam, nl, lam, scale):
    model, enc, y, z = _setup(fam, nl, lam, scale)
    want = _autograd_hessian(enc, z, y)
    eye = torch.eye(L, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    with torch.no_grad():
        fz, jacobian = enc.linearize(z, y)
        assert torch.equal(fz, enc.layer(z, y))  # the fused layer is the layer, bitwise
        torch.testing.assert_close(enc.hessian(z, y), want, **tol)
        torch.testing.assert_close(lam * (eye - jacobian()), want, **tol)
        keep = torch.tensor([0, 5, 6, 250, 251, 480, N - 1])  # rows of several blocks
        torch.testing.assert_close(lam * (eye - jacobian(keep)), want[keep], **tol)
        assert jacobian(torch.tensor([], dtype=torch.long)).shape == (0, L, L)
    # the Hessian is symmetric by construction (upper triangle mirrored)
    with torch.no_grad():
        H = enc.hessian(z, y)
    assert torch.equal(H, H.transpose(1, 2))


def test_weighted_gram_is_the_sum_of_weighted_outer_products():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    c = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    want = torch.einsum("di,nd,dj->nij", W, c, W)
    torch.testing.assert_close(weighted_gram(W, c), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("fam, nl, lam, scale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_blocked_objective_is_the_formula(fam, nl, lam, scale):
    model, enc, y, z = _setup(fam, nl, lam, scale)
    want = _neg_log_post(enc, z, y)
    torch.testing.assert_close(enc.objective(z, y), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_fused_linearization_changes_no_solve():
    """fixed_point with the encoder's linearize (what PEDEncoder.solve passes) gives the solve
    without it: the fused Jacobian steers Newton only (values to 1e-12, same counts)."""
    from deqppl.expfam import bernoulli, identity, poisson

    for fam, scale in ((bernoulli(), 1.0), (poisson(), 0.5)):
        model, enc, y, _ = _setup(fam, identity(), 1.0, scale)
        data = enc.check_data(y)
        z0 = enc.initial_guess(data)
        solver = Newton(rtol=1e-10, atol=0.0, max_steps=100, max_backtracks=40)
        with torch.no_grad():
            fused = enc.solve(data, z0=z0, solver=solver, validated=True)
            plain = fixed_point(lambda z, rows=None: enc.layer(z, data if rows is None else {"y": y[rows]}),
                                z0, solver=solver, rows_independent=True,
                                jacobian=lambda z, rows=None: enc.layer_jacobian(
                                    z, data if rows is None else {"y": y[rows]}))
        torch.testing.assert_close(fused.value, plain.value, rtol=0, atol=1e-12)
        assert (fused.num_steps, fused.num_fevals, fused.num_jac_evals) == \
            (plain.num_steps, plain.num_fevals, plain.num_jac_evals)
        assert fused.num_row_jac_evals == plain.num_row_jac_evals
        assert bool(fused.converged.all())
