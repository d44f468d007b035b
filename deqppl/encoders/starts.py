r"""Where an encoder's solve starts: start objects, from zeros to a start learned from fixed points.

A start maps validated data to the solver's first iterate $z_0$, of the encoder's
:meth:`~deqppl.encoders.AbstractMAPEncoder.latent_shape`. It changes only the *cost* of a
solve, never its answer: the solver, its per-sample stopping rule and hence the fixed point
$z^*$ are the same from every start (where $z^*$ is unique: a strongly convex negative log
posterior, e.g. every family with $R$ = identity, or the uniqueness conditions of
:meth:`~deqppl.encoders.PEDEncoder.uniqueness`; where several stationary points exist, any
start -- zeros and the ridge start included -- picks one of them).

* :class:`ZeroStart` -- $z_0 = 0$, the prior mode; any encoder.
* :class:`RidgeStart` -- ridge regression in natural-parameter space (PED encoders); the
  default of :class:`~deqppl.encoders.PEDEncoder`.
* :class:`LearnedStart` -- a regression $z_0 = g(s)$ of the fixed point on the encoder's
  data summary $s$ (:meth:`~deqppl.encoders.PEDEncoder.summary`), fitted by least squares on
  the fixed points of training data (:meth:`LearnedStart.fit`).

Why a regression on the summary works (SPEC §2.2): for $R$ = identity the negative log posterior
$F(z)=\tfrac\lambda2\lVert z\rVert^2-T(y)^\top(Wz+B)+\mathbf 1^\top A(Wz+B)$ depends on $y$
only through $s = W^\top T(y)$, and $\nabla F(z^*) = 0$ reads $s = \Phi(z^*)$ with
$\Phi(z) = \lambda z + W^\top A'(Wz+B)$. So $z^* = \Phi^{-1}(s)$ is a smooth map of
$l$ numbers, whatever $d$, and a low-degree regression in $s$ approximates it well where the
training data lie; Newton then needs one or two steps instead of four to eight
(``benchmarks/bench_ped.py``, ``docs/bench_ped.md``). For other $R$ the summary is not
sufficient and the start is only a heuristic (still correct, since it changes only the cost).

Each start keeps its state as plain tensors and a JSON-able configuration
(:meth:`AbstractStart.state_dict`, :meth:`AbstractStart.config`; :func:`load_start` rebuilds
it), so that model files can store it.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from deqppl.validation import as_tensor, check_finite, check_shape

from .base import row_blocks

__all__ = [
    "AbstractStart",
    "LearnedStart",
    "RidgeStart",
    "ZeroStart",
    "check_start",
    "load_start",
]


def _rows(encoder, data) -> tuple[int, ...]:
    return tuple(encoder.latent_shape(data))


def _reference(encoder, data) -> torch.Tensor:
    """A tensor with the dtype and device the start must return."""
    ref = next(iter(encoder.parameters()), None)
    if ref is not None:
        return ref
    return next(iter(data.values())) if isinstance(data, Mapping) else data


class AbstractStart(abc.ABC):
    """Base of every start: ``start(encoder, data) -> z0`` of shape ``encoder.latent_shape(data)``.

    A start is a small frozen object. It is called by the encoder's
    :meth:`~deqppl.encoders.AbstractMAPEncoder.initial_guess` with *validated* data (the
    output of :meth:`~deqppl.encoders.AbstractMAPEncoder.check_data`) and returns a detached
    tensor of the encoder's dtype and device. Subclasses implement :meth:`__call__`, may
    override :meth:`check_encoder` (raise ``TypeError`` for encoders they cannot serve), and
    keep their state in :meth:`state_dict` / :meth:`config`.

    Examples
    --------
    A start that begins every row at the same point:

    >>> import torch
    >>> from dataclasses import dataclass
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import gaussian
    >>> from deqppl.models import ExpFamPCA
    >>> @dataclass(frozen=True)
    ... class Ones(AbstractStart):
    ...     def __call__(self, encoder, data):
    ...         n, l = encoder.latent_shape(data)
    ...         return encoder.W.new_ones(n, l).detach()
    >>> enc = PEDEncoder(ExpFamPCA(family=gaussian(), obs_dim=4, latent_dim=2), start=Ones()).double()
    >>> enc.initial_guess(torch.zeros(3, 4, dtype=torch.float64)).tolist()
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """

    @abc.abstractmethod
    def __call__(self, encoder, data) -> torch.Tensor:
        """The start ``(n, *event)`` for validated ``data``, detached, in the encoder's dtype."""

    def check_encoder(self, encoder) -> None:
        """Raise ``TypeError`` if this start cannot serve ``encoder`` (default: any encoder)."""

    def config(self) -> dict[str, Any]:
        """JSON-able settings (and fitted sizes) of the start; ``"start"`` names its class."""
        return {"start": type(self).__name__}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The start's fitted tensors by name (empty for starts without state)."""
        return {}

    @classmethod
    def from_state(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> AbstractStart:
        """Rebuild the start from :meth:`config` and :meth:`state_dict` (starts without state)."""
        return cls()


def check_start(start: object, encoder) -> AbstractStart:
    """Validate ``start`` for ``encoder``: an :class:`AbstractStart` that can serve it.

    Raises
    ------
    TypeError
        If ``start`` is not an :class:`AbstractStart`, or it cannot serve this encoder.
    """
    if not isinstance(start, AbstractStart):
        raise TypeError(
            f"start must be a deqppl.encoders start object (ZeroStart(), RidgeStart(), a fitted "
            f"LearnedStart, or another AbstractStart), got {start!r}"
        )
    start.check_encoder(encoder)
    return start


# ------------------------------------------------------------------------------ fixed starts
@dataclass(frozen=True)
class ZeroStart(AbstractStart):
    """$z_0 = 0$: the prior mode of every latent; serves any encoder.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import poisson
    >>> from deqppl.models import ExpFamPCA
    >>> enc = PEDEncoder(ExpFamPCA(family=poisson(), obs_dim=3, latent_dim=2), start=ZeroStart())
    >>> enc.initial_guess(torch.ones(2, 3)).tolist()
    [[0.0, 0.0], [0.0, 0.0]]
    """

    def __call__(self, encoder, data) -> torch.Tensor:
        ref = _reference(encoder, data)
        return torch.zeros(_rows(encoder, data), dtype=ref.dtype, device=ref.device)


#: What :class:`RidgeStart` reads from its encoder (the PED encoder's globals and model).
_RIDGE_ATTRIBUTES = ("W", "B", "lam")


@dataclass(frozen=True)
class RidgeStart(AbstractStart):
    r"""Ridge regression in natural-parameter space; PED encoders (``W``, ``B``, ``lam``).

    For $R$ = identity, the observations are mapped to natural parameters by the canonical
    link of a mean shrunk half-way towards the mean at $\eta = B$ (so that counts of 0 or
    binary data stay inside the link's domain), $\hat\eta = (A')^{-1}((T(y) + A'(B))/2)$,
    and $z_0 = (\lambda I + W^\top W)^{-1}W^\top(\hat\eta - B)$. This puts Newton in its
    quadratic region for Poisson counts spanning orders of magnitude. Other nonlinearities,
    or a non-finite row, start from zero.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import gaussian
    >>> from deqppl.models import ExpFamPCA
    >>> enc = PEDEncoder(ExpFamPCA(family=gaussian(), obs_dim=5, latent_dim=2)).double()
    >>> y = torch.randn(3, 5, dtype=torch.float64)
    >>> z0 = RidgeStart()(enc, y)
    >>> W, B = enc.W.detach(), enc.B.detach()  # Gaussian: eta_hat - B = (y - B) / 2
    >>> ridge = torch.linalg.solve(torch.eye(2, dtype=W.dtype) + W.T @ W, W.T @ ((y - B) / 2).T).T
    >>> bool(torch.allclose(z0, ridge, atol=1e-12))
    True
    """

    def check_encoder(self, encoder) -> None:
        missing = [a for a in _RIDGE_ATTRIBUTES if not hasattr(encoder, a)]
        if missing or not hasattr(getattr(encoder, "model", None), "family"):
            raise TypeError(
                f"RidgeStart needs a PED encoder (attributes {list(_RIDGE_ATTRIBUTES)} and a "
                f"model with a family), got {type(encoder).__name__}; use ZeroStart() or a "
                f"LearnedStart for it"
            )

    def __call__(self, encoder, data) -> torch.Tensor:
        y = data["y"] if isinstance(data, Mapping) else data
        n, l = _rows(encoder, data)
        zeros = torch.zeros(n, l, dtype=y.dtype, device=y.device)
        fam = encoder.model.family
        if not encoder.model.nonlinearity.is_identity:
            return zeros
        with torch.no_grad():
            B = encoder.B.detach()
            if not bool(fam.in_domain(B).all()):
                return zeros
            W = encoder.W.detach()
            mean_B = fam.dA(B)
            # W^T (eta_hat - B) row by row, in blocks of ~2^16 entries that stay in cache
            # (measured: 114 -> 35 ms for 10 000 x 500 Poisson counts)
            rhs = y.new_empty(n, l)
            for rows in row_blocks(n, W.shape[0]):
                eta_hat = fam.link(0.5 * (fam.T(y[rows]) + mean_B))
                torch.mm(eta_hat - B, W, out=rhs[rows])
            eye = torch.eye(l, dtype=y.dtype, device=y.device)
            z0 = torch.linalg.solve(encoder.lam * eye + W.T @ W, rhs.T).T
        return torch.where(torch.isfinite(z0).all(-1, keepdim=True), z0, zeros)


# ------------------------------------------------------------------------------ learned start
@functools.lru_cache(maxsize=64)
def _monomial_prefixes(width: int, degree: int) -> tuple[tuple[int, ...], ...]:
    r"""For degrees 2..``degree``: per variable $k$, how many monomials of the previous degree
    have largest variable index $\le k$.

    The monomials of each degree are ordered by their largest variable index, so those are a
    prefix of them, and the monomials of degree $j$ whose largest variable is $k$ are that
    prefix times $u_k$ (each monomial once, in a fixed order).
    """
    steps = []
    tops = list(range(width))  # largest variable index of each degree-1 monomial
    for _ in range(2, degree + 1):
        prefixes = tuple(sum(1 for top in tops if top <= k) for k in range(width))
        steps.append(prefixes)
        tops = [k for k in range(width) for _ in range(prefixes[k])]
    return tuple(steps)


def _num_features(width: int, degree: int) -> int:
    """Monomials of degree 1..``degree`` in ``width`` variables (the constant is separate)."""
    return math.comb(width + degree, degree) - 1


def _polynomial(u: torch.Tensor, degree: int) -> torch.Tensor:
    r"""All monomials of degree 1..``degree`` of the columns of ``u`` ``(n, k)``, ``(n, m)``.

    The transpose of :func:`_polynomial_t` (the same numbers, feature by feature).
    """
    return _polynomial_t(u.T.contiguous(), degree).T


def _polynomial_t(ut: torch.Tensor, degree: int) -> torch.Tensor:
    r"""All monomials of degree 1..``degree`` of the rows of ``ut`` ``(k, n)``, as rows ``(m, n)``.

    Per degree and variable $k$ one product of a contiguous slice of the previous degree's
    monomials with the row $u_k$ (:func:`_monomial_prefixes`), written into one preallocated
    output: features as rows, no gathers. Measured (:class:`LearnedStart` on 10 000 rows,
    degree 3, $k = 5$, in blocks): 1.3 ms, against 1.8 ms with two row gathers per degree and
    4.5 ms for gathers of columns concatenated per block of 256 rows.
    """
    k, n = ut.shape
    out = ut.new_empty(_num_features(k, degree), n)
    out[:k] = ut
    low, high = 0, k  # rows of the monomials of the previous degree
    for prefixes in _monomial_prefixes(k, degree):
        pos = high
        for var, count in enumerate(prefixes):
            torch.mul(out[low:low + count], ut[var], out=out[pos:pos + count])
            pos += count
        low, high = high, pos
    return out


def _network(u: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Tanh network ``[W0, b0, W1, b1, ...]``: tanh after every layer but the last."""
    h = u
    for i in range(0, len(params), 2):
        h = torch.nn.functional.linear(h, params[i], params[i + 1])
        if i + 2 < len(params):
            h = torch.tanh(h)
    return h


#: Relative ridge of the least-squares normal equations (times the mean diagonal of the Gram
#: matrix): it only guards against exactly collinear monomials (e.g. y^2 = y for binary
#: summaries) and is far below the noise of the fit; measured on the bench_ped cases, 1e-12 to
#: 1e-8 gave the same start to 3 digits.
_LSTSQ_RIDGE = 1e-10

#: The start is clipped to the range of the training fixed points widened by this fraction of
#: it on each side. Clipping to the bare range cost the Bernoulli (d, l) = (50, 5) case of
#: bench_ped a third Newton step (a few test fixed points lie just outside the training range);
#: a quarter of the range leaves it at two, and still bounds a runaway polynomial.
_CLIP_MARGIN = 0.25

#: The tensors of a fitted :class:`LearnedStart`, in the order they are stored.
_STATE_NAMES = ("mean", "scale", "coef", "intercept", "z_low", "z_high")


@dataclass(frozen=True, eq=False)
class LearnedStart(AbstractStart):
    r"""A start learned from fixed points: polynomial regression of $z^*$ on the data summary.

    With the encoder's summary $s$ ``(n, k)`` (:meth:`~deqppl.encoders.PEDEncoder.summary`,
    $s = W^\top T(y)$, sufficient for $z^*$ when $R$ is the identity) standardised by the
    training mean and scale, $u = (s - \bar s)/\sigma_s$, the start is
    $z_0 = \phi(u)\,C + c$ with $\phi$ all monomials of $u$ of degree 1 to ``degree``, and
    $(C, c)$ the least-squares fit to the training fixed points (:meth:`fit`). Rows whose
    start is not finite start from zero.

    Create it with the settings, then :meth:`fit` it: ``LearnedStart(degree=3).fit(encoder,
    y_train)`` returns a fitted copy (the settings object itself stays unfitted and refuses
    to run). The start is only a start: a start fitted for other globals (``W``, ``B``
    changed since) still gives the same fixed point, only after more Newton steps.

    Parameters
    ----------
    degree
        Highest degree of the monomials, ``>= 1``; ``1`` is linear regression. The number of
        features is $\binom{k+\text{degree}}{\text{degree}} - 1$ ($k$ the summary width): 55
        for $k = 5$ and 1 770 for $k = 20$ at degree 3 (the default).
    hidden
        Widths of an optional tanh network on $u$ fitted (by L-BFGS, ``max_steps`` steps from
        a ``seed``-ed draw) to what the polynomial leaves; ``()`` (default) for none.
    max_steps, seed
        L-BFGS steps and initialisation seed of the network (unused without ``hidden``).
    fallback
        A second start (e.g. :class:`RidgeStart`): each row starts from whichever of the two
        has the lower negative log posterior (:meth:`~deqppl.encoders.PEDEncoder.objective`).
        A regression extrapolates badly on rows unlike the training data (Poisson rows with
        counts in the thousands); the fallback bounds the damage at the cost of two objective
        evaluations. ``None`` (default): no fallback.

    Attributes
    ----------
    mean, scale
        ``(k,)`` training mean and scale of the summary (``None`` until fitted).
    coef, intercept
        ``(m, D)`` and ``(D,)`` regression coefficients, ``D`` the flattened latent size.
    z_low, z_high
        ``(D,)`` per-coordinate range of the training fixed points. The start is clipped to it,
        widened by a quarter of its width on each side:
        a polynomial extrapolates without bound on rows unlike the training rows (measured:
        starts of order 1e4 for exponential-family rows from 60 training rows, where the
        layer overflows), and a point inside the range of seen fixed points is a safe start.
    network
        Weights and biases of the tanh network (empty without ``hidden``).
    train_rmse
        Root mean squared error $\lVert z_0 - z^*\rVert_2$ over the training rows.
    num_train
        Number of training rows.

    Examples
    --------
    >>> import torch
    >>> from deqppl.encoders import PEDEncoder
    >>> from deqppl.expfam import bernoulli
    >>> from deqppl.models import ExpFamPCA
    >>> model = ExpFamPCA(family=bernoulli(), obs_dim=20, latent_dim=2, param_scale=0.7)
    >>> sim = model.simulate(600, seed=0, dtype=torch.float64)
    >>> enc = PEDEncoder.from_values(model, sim.truth)
    >>> y_train, y_new = sim.data["y"][:500], sim.data["y"][500:]
    >>> z_ridge, sol_ridge = enc(y_new)  # the default start, RidgeStart()
    >>> enc.start = LearnedStart(degree=3).fit(enc, y_train)
    >>> z, sol = enc(y_new)
    >>> bool(torch.allclose(z, z_ridge, rtol=0, atol=1e-8)), bool(sol.converged.all())
    (True, True)
    >>> sol.num_steps < sol_ridge.num_steps
    True
    >>> sorted(enc.start.state_dict())
    ['coef', 'intercept', 'mean', 'scale', 'z_high', 'z_low']
    """

    degree: int = 3
    hidden: tuple[int, ...] = ()
    max_steps: int = 1000
    seed: int = 0
    fallback: AbstractStart | None = None
    mean: torch.Tensor | None = field(default=None, repr=False)
    scale: torch.Tensor | None = field(default=None, repr=False)
    coef: torch.Tensor | None = field(default=None, repr=False)
    intercept: torch.Tensor | None = field(default=None, repr=False)
    z_low: torch.Tensor | None = field(default=None, repr=False)
    z_high: torch.Tensor | None = field(default=None, repr=False)
    network: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    train_rmse: float | None = None
    num_train: int | None = None

    def __post_init__(self):
        for name, low in (("degree", 1), ("max_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LearnedStart {name} must be an integer >= {low}, got {value!r}")
        if self.fallback is not None and not isinstance(self.fallback, AbstractStart):
            raise TypeError(f"LearnedStart fallback must be a start object (e.g. RidgeStart()) "
                            f"or None, got {self.fallback!r}")
        if not isinstance(self.hidden, tuple) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"LearnedStart hidden must be a tuple of integers >= 1 (widths of "
                             f"the tanh layers; () for none), got {self.hidden!r}")
        state = [getattr(self, name) for name in _STATE_NAMES]
        if any(t is not None for t in state):
            if any(t is None for t in state):
                missing = [n for n, t in zip(_STATE_NAMES, state) if t is None]
                raise ValueError(f"LearnedStart state is incomplete: {missing} missing; give all "
                                 f"of {list(_STATE_NAMES)} or none (then call fit)")
            self._check_state()

    def _check_state(self) -> None:
        mean = as_tensor(self.mean, "LearnedStart mean")
        k = mean.shape[0] if mean.ndim == 1 else -1
        if k < 1:
            raise ValueError(f"LearnedStart mean must have shape (k,), got {tuple(mean.shape)}")
        m = _num_features(k, self.degree)
        check_shape(as_tensor(self.scale, "LearnedStart scale"), (k,), "LearnedStart scale")
        coef = as_tensor(self.coef, "LearnedStart coef")
        if coef.ndim != 2 or coef.shape[0] != m:
            raise ValueError(f"LearnedStart coef must have shape ({m}, D) for a summary of width "
                             f"{k} at degree {self.degree}, got {tuple(coef.shape)}")
        for name in ("intercept", "z_low", "z_high"):
            check_shape(as_tensor(getattr(self, name), f"LearnedStart {name}"), (coef.shape[1],),
                        f"LearnedStart {name}")
        widths = [k, *self.hidden, coef.shape[1]] if self.hidden else []
        want = [shape for a, b in zip(widths[:-1], widths[1:]) for shape in ((b, a), (b,))]
        got = [tuple(as_tensor(t, "LearnedStart network").shape) for t in self.network]
        if got != want:
            raise ValueError(f"LearnedStart network must hold tensors of shapes {want} for "
                             f"hidden = {self.hidden}, got {got}")
        for name in _STATE_NAMES:
            check_finite(getattr(self, name), f"LearnedStart {name}")
        for i, t in enumerate(self.network):
            check_finite(t, f"LearnedStart network[{i}]")
        if not bool((self.scale > 0).all()):
            raise ValueError("LearnedStart scale must be positive")

    # ------------------------------------------------------------------ state
    @property
    def fitted(self) -> bool:
        """Whether the regression has been fitted (or loaded)."""
        return self.coef is not None

    @property
    def summary_width(self) -> int | None:
        """Width $k$ of the summary it was fitted on (``None`` until fitted)."""
        return None if self.mean is None else int(self.mean.shape[0])

    @property
    def latent_size(self) -> int | None:
        """Flattened latent size $D$ it predicts (``None`` until fitted)."""
        return None if self.coef is None else int(self.coef.shape[1])

    def config(self) -> dict[str, Any]:
        """Settings and fitted sizes, JSON-able (``{"start": "LearnedStart", "degree": 3, ...}``)."""
        return {"start": type(self).__name__, "degree": self.degree,
                "hidden": list(self.hidden), "max_steps": self.max_steps, "seed": self.seed,
                "fallback": None if self.fallback is None else self.fallback.config(),
                "summary_width": self.summary_width, "latent_size": self.latent_size,
                "train_rmse": self.train_rmse, "num_train": self.num_train}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``mean``, ``scale``, ``coef``, ``intercept``, ``z_low``, ``z_high``, ``network.0``, ...

        Empty before :meth:`fit`; ``fallback.<name>`` for the tensors of a fallback start.
        """
        if not self.fitted:
            return {}
        state = {name: getattr(self, name).detach().clone() for name in _STATE_NAMES}
        state.update({f"network.{i}": t.detach().clone() for i, t in enumerate(self.network)})
        if self.fallback is not None:
            state.update({f"fallback.{k}": v for k, v in self.fallback.state_dict().items()})
        return state

    @classmethod
    def from_state(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> LearnedStart:
        """Rebuild a (fitted) start from :meth:`config` and :meth:`state_dict`.

        Raises
        ------
        ValueError
            If a tensor is missing, or the shapes disagree with the configuration.
        """
        missing = [name for name in _STATE_NAMES if name not in tensors] if tensors else []
        if missing:
            raise ValueError(f"LearnedStart.from_state: tensors {missing} missing; a fitted "
                             f"start stores {list(_STATE_NAMES)}")
        state = {name: tensors[name] for name in _STATE_NAMES} if tensors else {}
        hidden = tuple(int(h) for h in config.get("hidden", ()))
        if tensors:
            count = 2 * (len(hidden) + 1) if hidden else 0
            missing = [f"network.{i}" for i in range(count) if f"network.{i}" not in tensors]
            if missing:
                raise ValueError(f"LearnedStart.from_state: tensors {missing} missing for "
                                 f"hidden = {hidden}")
            state["network"] = tuple(tensors[f"network.{i}"] for i in range(count))
        fallback = config.get("fallback")
        if fallback is not None:
            fallback = load_start(fallback, {k[len("fallback."):]: v for k, v in (tensors or {}).items()
                                             if k.startswith("fallback.")})
        start = cls(degree=int(config.get("degree", 3)), hidden=hidden, fallback=fallback,
                    max_steps=int(config.get("max_steps", 1000)), seed=int(config.get("seed", 0)),
                    **state, train_rmse=config.get("train_rmse"), num_train=config.get("num_train"))
        for key, have in (("summary_width", start.summary_width), ("latent_size", start.latent_size)):
            want = config.get(key)
            if want is not None and have is not None and int(want) != have:
                raise ValueError(f"LearnedStart.from_state: config says {key} = {want}, the "
                                 f"tensors give {have}")
        return start

    # ------------------------------------------------------------------ use
    def check_encoder(self, encoder) -> None:
        if not callable(getattr(encoder, "summary", None)):
            raise TypeError(
                f"LearnedStart needs an encoder with a summary(data) method (PEDEncoder, "
                f"DeepPEDEncoder), got {type(encoder).__name__}"
            )
        if self.fallback is not None:
            if not callable(getattr(encoder, "objective", None)):
                raise TypeError(
                    f"LearnedStart with a fallback needs an encoder with an objective(z, data) "
                    f"method (PEDEncoder, AutoDEQ), got {type(encoder).__name__}"
                )
            self.fallback.check_encoder(encoder)

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(
                f"this LearnedStart(degree={self.degree}) is not fitted: use the start returned "
                f"by LearnedStart(...).fit(encoder, y_train), or LearnedStart.from_state(...)"
            )

    def _features(self, encoder, data) -> torch.Tensor:
        s = encoder.summary(data).detach()
        if s.ndim != 2:
            raise ValueError(f"{type(encoder).__name__}.summary must return (n, k), got shape "
                             f"{tuple(s.shape)}")
        return s

    def __call__(self, encoder, data) -> torch.Tensor:
        self._require_fitted()
        shape = _rows(encoder, data)
        size = math.prod(shape[1:])
        s = self._features(encoder, data)
        if s.shape[1] != self.summary_width:
            raise ValueError(
                f"LearnedStart was fitted on summaries of width {self.summary_width}, but "
                f"{type(encoder).__name__}.summary gives width {s.shape[1]}: fit the start for "
                f"this encoder"
            )
        if size != self.latent_size:
            raise ValueError(
                f"LearnedStart predicts latents of size {self.latent_size}, but "
                f"{type(encoder).__name__} has latents of shape {shape[1:]} (size {size}): fit "
                f"the start for this encoder"
            )
        with torch.no_grad():
            mean, scale, coef, intercept = (t.to(dtype=s.dtype, device=s.device)
                                            for t in (self.mean, self.scale, self.coef, self.intercept))
            u = (s - mean) / scale
            # in row blocks: the (n, m) monomials of a whole batch are written to fresh memory
            # and read back once (measured: 330 ms for n = 10 000, k = 20, degree 3, against
            # 150 ms in blocks of 256 rows, which stay in cache); ~2^16 entries per block
            # (base.BLOCK_ENTRIES)
            z0 = u.new_empty(u.shape[0], coef.shape[1])
            for rows in row_blocks(u.shape[0], coef.shape[0]):
                feats = _polynomial_t(u[rows].T.contiguous(), self.degree)
                torch.addmm(intercept, feats.T, coef, out=z0[rows])
            if self.network:
                z0 = z0 + _network(u, [t.to(dtype=s.dtype, device=s.device) for t in self.network])
            # a sum is finite only if every entry is (else, rarely, the per-row pass)
            if not math.isfinite(float(z0.sum())):
                z0 = torch.where(torch.isfinite(z0).all(-1, keepdim=True), z0, torch.zeros_like(z0))
            low, high = (t.to(dtype=s.dtype, device=s.device) for t in (self.z_low, self.z_high))
            margin = _CLIP_MARGIN * (high - low)
            z0 = torch.minimum(torch.maximum(z0, low - margin), high + margin).reshape(shape)
            if self.fallback is not None:
                other = self.fallback(encoder, data)
                mine, theirs = encoder.objective(z0, data), encoder.objective(other, data)
                # a non-finite objective (overflow far out) loses to the other candidate
                better = torch.nan_to_num(mine, nan=math.inf) <= torch.nan_to_num(theirs, nan=math.inf)
                z0 = torch.where(better.reshape(-1, *([1] * (z0.ndim - 1))), z0, other)
        return z0

    # ------------------------------------------------------------------ training
    def fit(self, encoder, data, *, z: torch.Tensor | None = None) -> LearnedStart:
        r"""Fit the regression on training data; returns a fitted copy of this start.

        Parameters
        ----------
        encoder
            The encoder the start is for (:class:`~deqppl.encoders.PEDEncoder` or
            :class:`~deqppl.encoders.DeepPEDEncoder`), at the globals of the fitted model.
        data
            Training data: a mapping of the model's data names or the bare ``y`` ``(n, d)``.
        z
            The training fixed points ``(n, *event)`` if already solved; default: solved here
            with the encoder (its own start, solver and stopping rule; ``throw=True``).

        Returns
        -------
        LearnedStart
            Fitted, with ``train_rmse`` and ``num_train`` set.

        Raises
        ------
        TypeError
            If the encoder has no ``summary``.
        ValueError
            If there are fewer training rows than regression coefficients, ``z`` has the wrong
            shape or a non-finite entry, or the summaries are not finite.
        ConvergenceError
            If solving the training fixed points fails.
        """
        self.check_encoder(encoder)
        data = encoder.check_data(data)
        shape = _rows(encoder, data)
        n, size = shape[0], math.prod(shape[1:])
        s = self._features(encoder, data)
        check_finite(s, f"{type(encoder).__name__}.summary of the training data")
        m = _num_features(s.shape[1], self.degree)
        if n < m + 1:
            raise ValueError(
                f"LearnedStart(degree={self.degree}) on a summary of width {s.shape[1]} has "
                f"{m + 1} coefficients per latent coordinate and needs at least that many "
                f"training rows, got {n}: use more data or a lower degree"
            )
        if z is None:
            with torch.no_grad():
                z = encoder.solve(data, validated=True, throw=True).value
        else:
            z = as_tensor(z, "z", dtype=s.dtype)
            check_shape(z, shape, "z")
            check_finite(z, "z")
        with torch.no_grad():
            target = z.detach().reshape(n, size).to(s.dtype)
            mean = s.mean(0)
            scale = s.std(0)
            # a constant summary coordinate carries no information: keep it unscaled
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            X = _polynomial((s - mean) / scale, self.degree)
            x_mean, t_mean = X.mean(0), target.mean(0)
            Xc = X - x_mean
            gram = Xc.T @ Xc
            ridge = _LSTSQ_RIDGE * float(gram.diagonal().mean())
            gram.diagonal().add_(ridge)
            coef = torch.linalg.solve(gram, Xc.T @ (target - t_mean))
            intercept = t_mean - x_mean @ coef
            residual = target - (X @ coef + intercept)
        network = self._fit_network((s - mean) / scale, residual) if self.hidden else ()
        with torch.no_grad():
            if network:
                residual = residual - _network((s - mean) / scale, list(network))
            rmse = float((residual ** 2).sum(1).mean().sqrt())
        return LearnedStart(degree=self.degree, hidden=self.hidden, max_steps=self.max_steps,
                            seed=self.seed, fallback=self.fallback, mean=mean, scale=scale, coef=coef,
                            intercept=intercept, z_low=target.min(0).values,
                            z_high=target.max(0).values, network=network, train_rmse=rmse, num_train=n)

    def _fit_network(self, u: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tanh network on ``u`` fitted to what the polynomial left, by L-BFGS."""
        from deqppl.optim import LBFGS, minimize  # deferred: optim imports the inference stack

        widths = [u.shape[1], *self.hidden, residual.shape[1]]
        gen = torch.Generator().manual_seed(self.seed)
        shapes, init = [], []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(widths) - 2
            # the output layer starts at zero, so the fit starts from the polynomial's start
            weight = torch.zeros(b, a) if last else torch.randn(b, a, generator=gen) / math.sqrt(a)
            shapes += [(b, a), (b,)]
            init += [weight.reshape(-1), torch.zeros(b)]
        x0 = torch.cat(init).to(u.dtype)
        sizes = [math.prod(sh) for sh in shapes]

        def unpack(x):
            return [p.reshape(sh) for p, sh in zip(torch.split(x, sizes), shapes)]

        def loss(x):
            return ((_network(u, unpack(x)) - residual) ** 2).sum(1).mean()

        # gtol 0: run the step budget (the loss is a mean square, no scale to be relative to)
        res = minimize(loss, x0, optimizer=LBFGS(max_steps=self.max_steps, gtol=0.0))
        return tuple(p.detach().clone() for p in unpack(res.x))


#: The built-in starts by class name, for :func:`load_start` (model files store the name).
_STARTS: dict[str, type[AbstractStart]] = {
    cls.__name__: cls for cls in (ZeroStart, RidgeStart, LearnedStart)
}


def load_start(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> AbstractStart:
    """Rebuild a built-in start from its :meth:`~AbstractStart.config` and tensors.

    Raises
    ------
    ValueError
        If ``config["start"]`` names no built-in start (the valid names are listed).

    Examples
    --------
    >>> load_start(ZeroStart().config())
    ZeroStart()
    >>> load_start({"start": "Adam"})
    Traceback (most recent call last):
    ...
    ValueError: config["start"] = 'Adam' names no start; the built-in starts are ['LearnedStart', 'RidgeStart', 'ZeroStart']
    """
    if not isinstance(config, Mapping) or "start" not in config:
        raise ValueError(f"config must be a mapping with a 'start' entry (AbstractStart.config()), "
                         f"got {config!r}")
    name = config["start"]
    cls = _STARTS.get(name)
    if cls is None:
        raise ValueError(f"config[\"start\"] = {name!r} names no start; the built-in starts are "
                         f"{sorted(_STARTS)}")
    return cls.from_state(config, dict(tensors or {}))


class WithStart:
    """Mixin of encoders whose solves start from an :class:`AbstractStart` (PED, deep PED):
    the validated ``start`` property, set in the encoder's ``__init__``."""

    @property
    def start(self) -> AbstractStart:
        """The start of every solve without an explicit ``z0`` (:mod:`deqppl.encoders.starts`)."""
        return self._start

    @start.setter
    def start(self, value: AbstractStart) -> None:
        self._start = check_start(value, self)
