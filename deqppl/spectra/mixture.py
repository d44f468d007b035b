"""High-dimensional Gaussian mixtures and the statistics the kernel theory needs (SPEC 6).

Data are rows here: ``x`` has shape ``(n, p)``, the transpose of SPEC 6's $X\\in\\mathbb R^{p\\times n}$,
so the Gram matrix $X^\\top X$ of SPEC 6 is ``x @ x.T``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "GaussianMixture",
    "MixtureSample",
    "MixtureStatistics",
    "AsymptoticsWarning",
    "two_class_mixture",
    "data_statistics",
    "MIN_DIMENSION",
]

#: Below this many dimensions (or points) the $O(p^{-1/2})$ terms the theory drops are not small.
#: Measured on SPEC 6's mixture (ReLU, against the exact infinite-width kernel, 3 samples): the
#: relative error of $\bar G$ is 0.03-0.04 at $p$ = 64-128 and 0.05-0.08 at $p$ = 16-32; for tanh the
#: error against empirical kernels is already 0.16 at $p=128$ (docs/spectra.md). A judgment call.
MIN_DIMENSION = 64


class AsymptoticsWarning(UserWarning):
    """The data are too small for the large-$n,p$ theory of SPEC 6 to be accurate."""


def _warn_small(p: int, n: int) -> None:
    if p < MIN_DIMENSION or n < MIN_DIMENSION:
        warnings.warn(
            f"p = {p}, n = {n}: the kernel predictions of SPEC 6 are asymptotic in n, p -> infinity "
            f"and drop O(p^-1/2) terms; below {MIN_DIMENSION} dimensions or points they are not "
            f"accurate (use them qualitatively, or compare with an empirical kernel)",
            AsymptoticsWarning, stacklevel=3)


@dataclass(frozen=True, kw_only=True, eq=False)
class MixtureSample:
    """Draws from a `GaussianMixture`.

    Attributes
    ----------
    x
        ``(n, p)`` points $x_i=\\mu_{a}/\\sqrt p+\\omega_i$, grouped by class.
    labels
        ``(n,)`` class indices (int64).
    noise
        ``(n, p)`` the $\\omega_i$.
    """

    x: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor


@dataclass(frozen=True, kw_only=True, eq=False)
class MixtureStatistics:
    """The statistics of SPEC 6 for $n$ points in $p$ dimensions and $K$ classes.

    Attributes
    ----------
    x
        ``(n, p)`` the data.
    labels
        ``(n,)`` class indices.
    t
        ``(K,)`` $t_a=\\mathrm{tr}(C_a-C^\\circ)/\\sqrt p$.
    T
        ``(K, K)`` $T_{ab}=\\mathrm{tr}((C_a-C^\\circ)(C_b-C^\\circ))/p$.
    psi
        ``(n,)`` $\\psi_i=\\lVert\\omega_i\\rVert^2-\\mathrm{tr}C_a/p$.
    V
        ``(n, K+1)`` $[J/\\sqrt p,\\ \\psi]$, $J$ the one-hot labels.
    T0
        $\\mathrm{tr}(C^{\\circ2})/p$.
    S
        ``(K, K)`` $S_{ab}=p\\cdot\\mathrm{mean}_{i\\in a,j\\in b,i\\neq j}(x_i^\\top x_j)^2$, the class means
        of the squared Gram matrix. *(derived)* The $\\alpha_3$ term of $\\bar K$ comes from
        $K_{ij}^2\\approx\\alpha_1^2(x_i^\\top x_j)^2$, whose class means are
        $S_{ab}/p=T_{ab}/p+T_0/p+(\\mu_a^\\top\\mu_b)^2/p^2+O(p^{-3/2})$. SPEC 6 keeps only $T$:
        it drops $T_0\\mathbf 1\\mathbf 1^\\top/p$, of operator norm $O(1)$, and the means' term,
        formally $O(p^{-1})$ but large at practical sizes ($\\lVert\\mu\\rVert^2=64$ in SPEC 6's
        mixture: at $p=512$ it is five times $T_0$). `assemble_kernel` uses $S$: against the
        infinite-width kernel of a ReLU DEQ this lowers the relative error of $\\bar G$ from
        0.059 / 0.034 to 0.023 / 0.015 at $p$ = 256 / 512 (SPEC's $T$ alone: docs/spectra.md).
    gram
        ``(n, n)`` the Gram matrix $X^\\top X$ (``x @ x.T``), computed once.
    tau0
        $\\tau_0$: the root mean squared norm $\\sqrt{\\frac1n\\sum_i\\lVert x_i\\rVert^2}$. SPEC 6 writes
        $\\sqrt{\\mathrm{tr}C^\\circ/p}$, its large-$p$ limit; the two differ by the means'
        $\\lVert\\mu_a\\rVert^2/p$ (0.125 at $p = 512$ for SPEC 6's mixture), which shifts
        $\\tau_*$ and hence the centring of $\\phi$, so the empirical value is used (as the
        authors' code does).
    """

    x: torch.Tensor
    labels: torch.Tensor
    t: torch.Tensor
    T: torch.Tensor
    psi: torch.Tensor
    V: torch.Tensor
    T0: float
    S: torch.Tensor
    tau0: float
    gram: torch.Tensor

    @property
    def num_data(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])



def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None) -> int:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor of shape ({n},)")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per row of x), got "
                         f"{tuple(labels.shape)}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())} at index "
                         f"{int(torch.argmin(labels))}")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(labels.long(), minlength=k)
    if counts.numel() > k:
        raise ValueError(f"labels must be < {k} (the number of classes), got {int(labels.max())}")
    small = (counts < 2).nonzero().flatten()
    if small.numel():
        a = int(small[0])
        raise ValueError(f"class {a} has {int(counts[a])} point(s); every class needs at least two "
                         f"(its covariance and the statistics t, T, psi are undefined otherwise)")
    return k


def _statistics(x, labels, means, covariances, noise) -> MixtureStatistics:
    n, p = x.shape
    k = means.shape[0]
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    centre = torch.einsum("a,aij->ij", counts / n, covariances)  # C°
    delta = covariances - centre
    t = torch.diagonal(delta, dim1=1, dim2=2).sum(-1) / math.sqrt(p)
    T = torch.einsum("aij,bji->ab", delta, delta) / p
    T0 = float(torch.einsum("ij,ji->", centre, centre)) / p
    traces = torch.diagonal(covariances, dim1=1, dim2=2).sum(-1) / p
    psi = (noise * noise).sum(1) - traces[labels]
    J = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    V = torch.cat([J / math.sqrt(p), psi[:, None]], dim=1)
    tau0 = math.sqrt(float((x * x).sum()) / n)
    gram = x @ x.T
    squared = gram**2
    squared.fill_diagonal_(0.0)
    pairs = counts[:, None] * counts[None, :] - torch.diag(counts)
    S = p * (J.T @ squared @ J) / pairs
    return MixtureStatistics(x=x, labels=labels, t=t, T=T, psi=psi, V=V, T0=T0, S=S, tau0=tau0,
                             gram=gram)


@dataclass(frozen=True, kw_only=True, eq=False)
class GaussianMixture:
    """A $K$-class Gaussian mixture $x=\\mu_a/\\sqrt p+\\omega$, $\\omega\\sim\\mathcal N(0,C_a/p)$.

    Parameters
    ----------
    means
        ``(K, p)`` the $\\mu_a$ (of norm $O(1)$ in SPEC 6's regime).
    covariances
        ``(K, p, p)`` the $C_a$, symmetric positive definite (with $\\lVert C_a\\rVert=O(1)$).
    proportions
        ``(K,)`` class proportions (positive, summing to one); ``None`` means equal.

    Examples
    --------
    >>> mix = two_class_mixture(128)
    >>> sample = mix.sample(100, seed=0)
    >>> sample.x.shape, sample.labels.bincount().tolist()
    (torch.Size([100, 128]), [50, 50])
    >>> stats = mix.statistics(sample)
    >>> round(float(stats.t[1]), 6)  # tr(C_1 - C°)/sqrt p = 4 for C_a = (1 + 8a/sqrt p) I
    4.0
    """

    means: torch.Tensor
    covariances: torch.Tensor
    proportions: torch.Tensor | None = None

    def __post_init__(self):
        m, c = self.means, self.covariances
        if not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.ndim != 2:
            raise TypeError("GaussianMixture.means must be a floating tensor of shape (K, p)")
        k, p = m.shape
        if k < 1 or p < 1:
            raise ValueError(f"GaussianMixture.means must have K >= 1 classes and p >= 1 "
                             f"dimensions, got shape {tuple(m.shape)}")
        if not isinstance(c, torch.Tensor) or c.shape != (k, p, p) or c.dtype != m.dtype:
            raise ValueError(f"GaussianMixture.covariances must be a {m.dtype} tensor of shape "
                             f"{(k, p, p)} (K, p, p), got "
                             f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c)}")
        for name, value in (("means", m), ("covariances", c)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"GaussianMixture.{name} must be finite")
        if not torch.allclose(c, c.transpose(1, 2)):
            raise ValueError("GaussianMixture.covariances must be symmetric")
        try:
            torch.linalg.cholesky(c)
        except RuntimeError:
            eig = torch.linalg.eigvalsh(c).min(dim=1).values
            a = int(torch.argmin(eig))
            raise ValueError(f"GaussianMixture.covariances[{a}] is not positive definite "
                             f"(smallest eigenvalue {float(eig[a]):.3g})") from None
        if self.proportions is not None:
            q = self.proportions
            if not isinstance(q, torch.Tensor) or q.shape != (k,):
                raise ValueError(f"GaussianMixture.proportions must be a tensor of shape ({k},)")
            if bool((q <= 0).any()) or abs(float(q.sum()) - 1.0) > 1e-10:
                raise ValueError(f"GaussianMixture.proportions must be positive and sum to one, "
                                 f"got {q.tolist()}")

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def counts(self, num_data: int) -> list[int]:
        """Points per class for ``num_data`` points: proportional, largest remainders first."""
        k = self.num_classes
        q = (torch.full((k,), 1.0 / k, dtype=torch.float64) if self.proportions is None
             else self.proportions.double())
        raw = q * num_data
        counts = raw.floor().long()
        order = torch.argsort(raw - counts, descending=True)
        counts[order[: num_data - int(counts.sum())]] += 1
        return counts.tolist()

    def sample(self, num_data: int, *, seed: int) -> MixtureSample:
        """``num_data`` points, a fixed number per class (`counts`), grouped by class.

        Raises
        ------
        ValueError
            If a class would get fewer than two points.
        """
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive int, got {num_data!r}")
        counts = self.counts(num_data)
        for a, count in enumerate(counts):
            if count < 2:
                raise ValueError(f"num_data = {num_data} gives class {a} only {count} point(s); "
                                 f"every class needs at least two")
        gen = torch.Generator().manual_seed(int(seed))
        p, dtype = self.dim, self.means.dtype
        chol = torch.linalg.cholesky(self.covariances)
        xs, noises, labels = [], [], []
        for a, count in enumerate(counts):
            white = torch.randn(count, p, generator=gen, dtype=dtype).to(self.means.device)
            noise = white @ chol[a].T / math.sqrt(p)
            noises.append(noise)
            xs.append(self.means[a] / math.sqrt(p) + noise)
            labels.append(torch.full((count,), a, dtype=torch.int64, device=self.means.device))
        return MixtureSample(x=torch.cat(xs), labels=torch.cat(labels), noise=torch.cat(noises))

    def statistics(self, sample: MixtureSample) -> MixtureStatistics:
        """The statistics of SPEC 6 from the mixture's parameters and a sample of it.

        Warns (`AsymptoticsWarning`) when $p$ or $n$ is below `MIN_DIMENSION`.
        """
        if not isinstance(sample, MixtureSample):
            raise TypeError(f"sample must be a MixtureSample, got {type(sample).__name__}")
        n, p = sample.x.shape
        if p != self.dim:
            raise ValueError(f"sample has dimension {p}, the mixture {self.dim}")
        _check_labels(sample.labels, n, self.num_classes)
        _warn_small(p, n)
        return _statistics(sample.x, sample.labels, self.means, self.covariances, sample.noise)


def two_class_mixture(dim: int, *, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """SPEC 6's two-class mixture: $\\mu_0=8e_1$, $\\mu_1=8e_9$, $C_a=(1+8a/\\sqrt p)I$.

    Parameters
    ----------
    dim
        $p \\ge 9$.
    dtype
        Floating dtype of the parameters (and of the samples).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 9:
        raise ValueError(f"dim must be an int >= 9 (mu_1 = 8 e_9), got {dim!r}")
    means = torch.zeros(2, dim, dtype=dtype)
    means[0, 0], means[1, 8] = 8.0, 8.0
    eye = torch.eye(dim, dtype=dtype)
    covariances = torch.stack([(1.0 + 8.0 * a / math.sqrt(dim)) * eye for a in range(2)])
    return GaussianMixture(means=means, covariances=covariances)


def data_statistics(x: torch.Tensor, labels: torch.Tensor) -> MixtureStatistics:
    """The statistics of SPEC 6 for labelled data, with class means and covariances estimated.

    Each row is read as $x_i=\\mu_a/\\sqrt p+\\omega_i$: $\\mu_a/\\sqrt p$ is the class mean,
    $\\omega_i$ the residual and $C_a/p$ the class covariance (``ddof = 1``). For real data
    (scikit-learn's digits, say) centre and scale first so that $\\lVert x_i\\rVert^2\\approx 1$.

    Parameters
    ----------
    x
        ``(n, p)`` floating data.
    labels
        ``(n,)`` integer classes $0..K-1$, each with at least two points.

    Examples
    --------
    >>> mix = two_class_mixture(256)
    >>> s = mix.sample(200, seed=0)
    >>> est, true = data_statistics(s.x, s.labels), mix.statistics(s)
    >>> abs(float(est.t[1] - true.t[1])) < 0.5
    True
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError("x must be a floating tensor of shape (n, p)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite")
    n, p = x.shape
    k = _check_labels(labels, n, None)
    labels = labels.long()
    _warn_small(p, n)
    means, covariances = [], []
    noise = torch.empty_like(x)
    for a in range(k):
        rows = x[labels == a]
        centre = rows.mean(0)
        noise[labels == a] = rows - centre
        means.append(centre * math.sqrt(p))
        resid = rows - centre
        covariances.append(resid.T @ resid / (rows.shape[0] - 1) * p)
    return _statistics(x, labels, torch.stack(means), torch.stack(covariances), noise)
