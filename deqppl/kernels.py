r"""Positive-definite kernels as small composable objects (SPEC §4).

A kernel is a frozen dataclass of hyperparameters, validated when it is built; calling it on
inputs $x_1$ of shape ``(n1,)`` or ``(n1, p)`` and $x_2$ of shape ``(n2,)`` or ``(n2, p)``
returns the kernel matrix $K_{ij}=k(x_{1i},x_{2j})$ of shape ``(n1, n2)`` in the inputs' dtype
and on their device. Kernels combine with ``+`` (:class:`Sum`) and ``*`` (:class:`Product`);
multiplying by a positive number scales by a :class:`Constant` kernel. The design follows
GPyTorch's composable kernels; the parametrisations follow scikit-learn's
``sklearn.gaussian_process.kernels`` (the test oracle), with an explicit output ``variance``.

Stationary kernels depend on the Euclidean distance $d=\lVert x-x'\rVert$. Distances are formed
from explicit differences (memory $O(n_1 n_2 p)$) rather than the $\lVert x\rVert^2-2x^\top x'
+\lVert x'\rVert^2$ expansion, so $K(x, x)$ is exactly symmetric with an exact zero-distance
diagonal.

Examples
--------
>>> import torch
>>> from deqppl.kernels import SquaredExponential, Periodic
>>> k = SquaredExponential(lengthscale=0.5) + 0.1 * Periodic(period=2.0)
>>> x = torch.linspace(0, 1, 4, dtype=torch.float64)
>>> K = k(x)
>>> K.shape, K.dtype
(torch.Size([4, 4]), torch.float64)
>>> bool(torch.allclose(K, K.T))
True
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deqppl.validation import as_tensor, check_finite

__all__ = [
    "AbstractKernel",
    "Constant",
    "KERNELS",
    "Linear",
    "Matern32",
    "Matern52",
    "Periodic",
    "Product",
    "SquaredExponential",
    "Sum",
    "check_gram",
    "kernel",
]


def _positive(owner: object, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{type(owner).__name__} {name} must be a number, got {type(value).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{type(owner).__name__} {name} must be positive and finite, got {value}"
        )


def _non_negative(owner: object, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{type(owner).__name__} {name} must be a number, got {type(value).__name__}"
        )
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{type(owner).__name__} {name} must be non-negative and finite, got {value}"
        )


def _as_inputs(x: object, name: str) -> torch.Tensor:
    """Return ``x`` as a finite floating tensor of shape ``(n, p)``."""
    t = as_tensor(x, name)
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (n,) or (n, p), got {tuple(t.shape)}")
    check_finite(t, name)
    return t


def _sq_dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(n1, n2)`` from explicit differences."""
    return (x1.unsqueeze(-2) - x2.unsqueeze(-3)).pow(2).sum(-1)


def _dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; clamping at the smallest normal number keeps
    # gradients with respect to the inputs finite (zero) on the diagonal and changes values by
    # at most sqrt(tiny) ~ 1e-154 (float64) / 1e-19 (float32).
    d2 = _sq_dist(x1, x2)
    return torch.sqrt(d2.clamp_min(torch.finfo(d2.dtype).tiny))


class AbstractKernel(abc.ABC):
    """Base of all kernels: input checking, ``+`` and ``*``. Never instantiated."""

    def __call__(self, x1: object, x2: object | None = None) -> torch.Tensor:
        """Kernel matrix of shape ``(n1, n2)``; ``x2`` defaults to ``x1``.

        Parameters
        ----------
        x1
            Inputs of shape ``(n1,)`` or ``(n1, p)``.
        x2
            Inputs of shape ``(n2,)`` or ``(n2, p)`` with the same ``p``; ``None`` for ``x1``.

        Raises
        ------
        TypeError
            If an input is not numeric.
        ValueError
            If an input has the wrong number of dimensions, non-finite entries, or the two
            inputs disagree in ``p``; if the matrix has a non-finite entry (the hyperparameters
            or inputs overflow the dtype); or, for ``K(x, x)`` (``x2`` omitted or ``x1``
            itself), if the matrix is not symmetric to round-off or (for a kernel that is not
            built only from this module's kernels, which are positive semi-definite by
            construction) not positive semi-definite to round-off. See :func:`check_gram`.
        """
        a = _as_inputs(x1, "x1")
        b = a if x2 is None else _as_inputs(x2, "x2")
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(
                f"x1 and x2 must have the same number of columns, got {a.shape[-1]} and "
                f"{b.shape[-1]}"
            )
        if a.dtype != b.dtype:
            dtype = torch.promote_types(a.dtype, b.dtype)
            a, b = a.to(dtype), b.to(dtype)
        K = self._matrix(a, b)
        _check_matrix(self, K, a, b)
        if x2 is None or x2 is x1:
            K = _check_gram(self, K)
        return K

    @abc.abstractmethod
    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Kernel matrix for checked inputs of shapes ``(n1, p)`` and ``(n2, p)``."""

    def __add__(self, other: object) -> Sum:
        if not isinstance(other, AbstractKernel):
            return NotImplemented
        return Sum(_flatten(Sum, self) + _flatten(Sum, other))

    def __mul__(self, other: object) -> Product:
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            other = Constant(float(other))
        if not isinstance(other, AbstractKernel):
            return NotImplemented
        return Product(_flatten(Product, self) + _flatten(Product, other))

    __rmul__ = __mul__


#: Kernels positive semi-definite and exactly symmetric by construction (sums and elementwise
#: products of PSD kernels are PSD: the Schur product theorem); exact types only, so that a
#: user's subclass overriding ``_matrix`` is checked.
def _psd_by_construction(k: AbstractKernel) -> bool:
    if type(k) in (Sum, Product):
        return all(_psd_by_construction(part) for part in k.kernels)
    return type(k) in (Constant, SquaredExponential, Matern32, Matern52, Periodic, Linear)


def _check_matrix(k: AbstractKernel, K: object, x1: torch.Tensor, x2: torch.Tensor) -> None:
    """A kernel's output must be a finite floating ``(n1, n2)`` tensor."""
    shape = (x1.shape[0], x2.shape[0])
    if not isinstance(K, torch.Tensor) or not K.is_floating_point() or tuple(K.shape) != shape:
        got = f"shape {tuple(K.shape)}, dtype {K.dtype}" if isinstance(K, torch.Tensor) else type(K).__name__
        raise ValueError(
            f"kernel {k!r} returned {got} for inputs of {shape[0]} and {shape[1]} rows; a kernel "
            f"must return a floating tensor of shape (n1, n2) = {shape}"
        )
    bad = ~torch.isfinite(K)
    if bool(bad.any()):
        i, j = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"kernel {k!r} gives the non-finite value {K[i, j].item()} at row {i}, column {j} of "
            f"its matrix ({int(bad.sum())} non-finite entries): its hyperparameters or inputs "
            f"overflow {K.dtype}; rescale the inputs or the variance"
        )


def _check_gram(k: AbstractKernel, K: torch.Tensor) -> torch.Tensor:
    if _psd_by_construction(k):
        return K  # exactly symmetric (distances from explicit differences) and PSD (theorem)
    return check_gram(K, name=f"the matrix K(x, x) of kernel {k!r}")


def check_gram(K: torch.Tensor, *, name: str = "K") -> torch.Tensor:
    r"""Check that ``K`` is a symmetric positive semi-definite ``(n, n)`` matrix, to round-off.

    Returns $(K+K^\top)/2$, so that every consumer (a Cholesky factor reading one triangle,
    a DEQ weighting the whole matrix) sees the same matrix.

    Round-off tolerance: with $s=\max_{ij}|K_{ij}|$ and $\epsilon$ the dtype's machine
    epsilon, asymmetry up to $\sqrt\epsilon\,s$ is accepted (far above what rounding of a
    symmetric formula produces, far below any genuine asymmetry), and eigenvalues down to
    $-10\,n\,\epsilon\,s$ (Weyl's bound $\lVert E\rVert_2\le n\max|E_{ij}|$ for entrywise
    errors $|E_{ij}|\le\epsilon s$, with a factor 10 for the eigensolver's own backward error).

    Parameters
    ----------
    K
        Square floating matrix, shape ``(n, n)``.
    name
        How messages call ``K``.

    Raises
    ------
    ValueError
        Naming the worst asymmetric pair (row, column and both values) or the most negative
        eigenvalue, with the tolerance and what is allowed.

    Examples
    --------
    >>> import torch
    >>> check_gram(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    tensor([[2., 1.],
            [1., 2.]])
    >>> check_gram(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    Traceback (most recent call last):
    ...
    ValueError: K is not symmetric: K[0, 1] = 2.0 but K[1, 0] = 0.0 ...
    >>> check_gram(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    Traceback (most recent call last):
    ...
    ValueError: K is not positive semi-definite: its smallest eigenvalue is -1 < ...
    """
    if K.dim() != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square matrix (n, n), got shape {tuple(K.shape)}")
    check_finite(K, name)
    n = K.shape[0]
    if n == 0:
        return K
    eps = torch.finfo(K.dtype).eps
    scale = float(K.abs().max())
    asym = (K - K.T).abs()
    worst = float(asym.max())
    if worst > math.sqrt(eps) * scale:
        i, j = divmod(int(asym.argmax()), n)
        raise ValueError(
            f"{name} is not symmetric: K[{i}, {j}] = {K[i, j].item()!r} but K[{j}, {i}] = "
            f"{K[j, i].item()!r} (difference {worst:.3g} > round-off tolerance "
            f"{math.sqrt(eps) * scale:.3g}); a kernel must satisfy k(x, x') = k(x', x)"
        )
    K = 0.5 * (K + K.T)
    tol = 10.0 * n * eps * scale
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    # A Cholesky factorisation succeeds exactly when K + tol I is positive definite (to its
    # own round-off): one O(n^3/3) factorisation decides; the eigenvalues are computed only
    # to describe a failure.
    _, info = torch.linalg.cholesky_ex(K + tol * eye)
    if int(info) != 0:
        lam_min = float(torch.linalg.eigvalsh(K)[0])
        if lam_min < -tol:
            raise ValueError(
                f"{name} is not positive semi-definite: its smallest eigenvalue is "
                f"{lam_min:.6g} < -{tol:.3g} (round-off tolerance); a kernel must give "
                f"positive semi-definite matrices (Mercer's condition)"
            )
    return K


def _flatten(kind: type, k: AbstractKernel) -> tuple[AbstractKernel, ...]:
    return k.kernels if isinstance(k, kind) else (k,)


@dataclass(frozen=True)
class Constant(AbstractKernel):
    r"""$k(x,x')=c$ (scikit-learn's ``ConstantKernel(c)``); ``c * k`` builds ``Product``.

    Examples
    --------
    >>> Constant(2.0)([0.0, 1.0], [3.0])
    tensor([[2.],
            [2.]])
    """

    variance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "variance", self.variance)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        shape = (x1.shape[0], x2.shape[0])
        return torch.full(shape, self.variance, dtype=x1.dtype, device=x1.device)


@dataclass(frozen=True)
class SquaredExponential(AbstractKernel):
    r"""$k=s^2\exp\big(-d^2/(2\ell^2)\big)$; scikit-learn's ``s2 * RBF(length_scale=l)``.

    Parameters
    ----------
    lengthscale
        $\ell>0$.
    variance
        $s^2>0$, the value at $d=0$.

    Examples
    --------
    >>> SquaredExponential(lengthscale=2.0)([0.0], [2.0])
    tensor([[0.6065]])
    """

    lengthscale: float = 1.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lengthscale", self.lengthscale)
        _positive(self, "variance", self.variance)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.variance * torch.exp(-0.5 * _sq_dist(x1, x2) / self.lengthscale**2)


@dataclass(frozen=True)
class Matern32(AbstractKernel):
    r"""Matérn $\nu=3/2$: $k=s^2(1+\sqrt3 d/\ell)e^{-\sqrt3 d/\ell}$; ``Matern(l, nu=1.5)``.

    Examples
    --------
    >>> Matern32()([0.0], [0.0, 1.0])
    tensor([[1.0000, 0.4834]])
    """

    lengthscale: float = 1.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lengthscale", self.lengthscale)
        _positive(self, "variance", self.variance)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        r = math.sqrt(3.0) * _dist(x1, x2) / self.lengthscale
        return self.variance * (1.0 + r) * torch.exp(-r)


@dataclass(frozen=True)
class Matern52(AbstractKernel):
    r"""Matérn $\nu=5/2$: $k=s^2(1+r+r^2/3)e^{-r}$, $r=\sqrt5 d/\ell$; ``Matern(l, nu=2.5)``.

    Examples
    --------
    >>> Matern52()([0.0], [0.0, 1.0])
    tensor([[1.0000, 0.5240]])
    """

    lengthscale: float = 1.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "lengthscale", self.lengthscale)
        _positive(self, "variance", self.variance)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        r = math.sqrt(5.0) * _dist(x1, x2) / self.lengthscale
        return self.variance * (1.0 + r + r**2 / 3.0) * torch.exp(-r)


@dataclass(frozen=True)
class Periodic(AbstractKernel):
    r"""$k=s^2\exp\big(-2\sin^2(\pi d/P)/\ell^2\big)$; ``ExpSineSquared(l, periodicity=P)``.

    $d$ is the Euclidean distance between whole input vectors (scikit-learn's convention;
    GPyTorch's ``PeriodicKernel`` instead sums over coordinates).

    Examples
    --------
    >>> Periodic(period=1.0)([0.0], [1.0, 0.5])
    tensor([[1.0000, 0.1353]])
    """

    period: float = 1.0
    lengthscale: float = 1.0
    variance: float = 1.0

    def __post_init__(self) -> None:
        _positive(self, "period", self.period)
        _positive(self, "lengthscale", self.lengthscale)
        _positive(self, "variance", self.variance)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        s = torch.sin(math.pi * _dist(x1, x2) / self.period)
        return self.variance * torch.exp(-2.0 * s**2 / self.lengthscale**2)


@dataclass(frozen=True)
class Linear(AbstractKernel):
    r"""$k=c+s^2\,x^\top x'$; scikit-learn's ``s2 * DotProduct(sigma_0=sqrt(c / s2))``.

    Parameters
    ----------
    variance
        $s^2>0$, the weight of the dot product.
    offset
        $c\ge0$, a constant added to every entry.

    Examples
    --------
    >>> Linear(variance=2.0, offset=1.0)([1.0, 2.0], [3.0])
    tensor([[ 7.],
            [13.]])
    """

    variance: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "variance", self.variance)
        _non_negative(self, "offset", self.offset)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # explicit products rather than a matmul keep K(x, x) exactly symmetric
        return self.offset + self.variance * (x1.unsqueeze(-2) * x2.unsqueeze(-3)).sum(-1)


@dataclass(frozen=True)
class Sum(AbstractKernel):
    r"""$k=\sum_m k_m$; built by ``k1 + k2`` (nested sums are flattened).

    Examples
    --------
    >>> k = Constant(1.0) + Linear()
    >>> k([2.0], [3.0])
    tensor([[7.]])
    """

    kernels: tuple[AbstractKernel, ...]

    def __post_init__(self) -> None:
        _check_parts(self, self.kernels)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        out = self.kernels[0]._matrix(x1, x2)
        for k in self.kernels[1:]:
            out = out + k._matrix(x1, x2)
        return out


@dataclass(frozen=True)
class Product(AbstractKernel):
    r"""$k=\prod_m k_m$ (elementwise); built by ``k1 * k2`` or ``c * k`` for a number $c>0$.

    Examples
    --------
    >>> k = 3.0 * Linear()
    >>> k([2.0], [1.0])
    tensor([[6.]])
    """

    kernels: tuple[AbstractKernel, ...]

    def __post_init__(self) -> None:
        _check_parts(self, self.kernels)

    def _matrix(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        out = self.kernels[0]._matrix(x1, x2)
        for k in self.kernels[1:]:
            out = out * k._matrix(x1, x2)
        return out


def _check_parts(owner: object, parts: object) -> None:
    if not isinstance(parts, tuple) or len(parts) < 2:
        raise ValueError(
            f"{type(owner).__name__} needs a tuple of at least two kernels, got {parts!r}"
        )
    for k in parts:
        if not isinstance(k, AbstractKernel):
            raise TypeError(f"{type(owner).__name__} parts must be kernels, got {k!r}")


#: Kernel classes by registry name (the CLI edge); compose the objects everywhere else.
KERNELS: dict[str, Callable[..., AbstractKernel]] = {
    "constant": Constant,
    "linear": Linear,
    "matern32": Matern32,
    "matern52": Matern52,
    "periodic": Periodic,
    "squared_exponential": SquaredExponential,
}


def kernel(name: str, **params: float) -> AbstractKernel:
    """Build a kernel by name (the CLI edge); unknown names list the valid ones.

    Raises
    ------
    ValueError
        For an unknown name or an invalid hyperparameter value.
    TypeError
        For unknown hyperparameter names.

    Examples
    --------
    >>> kernel("matern52", lengthscale=0.3)
    Matern52(lengthscale=0.3, variance=1.0)
    """
    try:
        factory = KERNELS[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel {name!r}; valid kernels are: {', '.join(sorted(KERNELS))}"
        ) from None
    try:
        return factory(**params)
    except TypeError as err:
        raise TypeError(f"bad parameters {params} for kernel {name!r}: {err}") from err
