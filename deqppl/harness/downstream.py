r"""Downstream checks of latents: multinomial logistic regression and a plain-PCA baseline.

The classifier is written in torch (no scikit-learn at run time): features standardised with the
training mean and standard deviation, then the $L_2$-penalised multinomial log-likelihood

$$\min_{V, c}\ \frac1n\sum_s -\log\mathrm{softmax}(V x_s + c)_{k_s} + \frac\alpha2\lVert V\rVert_F^2$$

is minimised by full-batch L-BFGS (a smooth, strongly convex problem in $V$; the bias is
unpenalised), as scikit-learn's ``LogisticRegression(C=1/(n\alpha))`` does.

Examples
--------
>>> import torch
>>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
>>> labels = torch.tensor([0, 0, 1, 1])
>>> clf = fit_classifier(x, labels)
>>> clf.accuracy(x, labels)
1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogisticRegressionResult", "PCABaseline", "fit_classifier", "fit_pca"]

# Penalty per datum on the (standardised) weights: weak, only there to keep the optimum finite
# on separable classes; equals scikit-learn's C = 1 / (n * alpha).
_DEFAULT_ALPHA = 1e-3


@dataclass(frozen=True, kw_only=True, eq=False)
class LogisticRegressionResult:
    """A fitted multinomial logistic regression.

    Attributes
    ----------
    weight, bias
        ``(k, p)`` and ``(k,)`` in standardised-feature space.
    mean, scale
        ``(p,)`` feature standardisation from the training rows.
    classes
        ``(k,)`` the sorted class labels.
    converged
        Whether L-BFGS met its gradient tolerance.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    classes: torch.Tensor
    converged: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(n, k)`` of features ``x`` ``(n, p)``."""
        return ((x - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels ``(n,)``."""
        return self.classes[self.logits(x).argmax(1)]

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of rows of ``x`` whose predicted label equals ``labels``."""
        return float((self.predict(x) == labels.to(self.classes.dtype)).double().mean())


def _check_xy(x: torch.Tensor, labels: torch.Tensor) -> None:
    if x.dim() != 2 or labels.dim() != 1 or x.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need features (n, p) and labels (n,), got {tuple(x.shape)} and {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features must be finite")


def fit_classifier(
    x: torch.Tensor, labels: torch.Tensor, *, alpha: float = _DEFAULT_ALPHA, max_steps: int = 500
) -> LogisticRegressionResult:
    """Fit an $L_2$-penalised multinomial logistic regression of ``labels`` on ``x``.

    Parameters
    ----------
    x
        Features ``(n, p)``, e.g. latents.
    labels
        Integer labels ``(n,)``.
    alpha
        Penalty per datum on the weights (``C = 1 / (n alpha)`` in scikit-learn's terms).
    max_steps
        L-BFGS iterations.

    Returns
    -------
    LogisticRegressionResult
    """
    _check_xy(x, labels)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    x = x.detach()
    classes, k_index = torch.unique(labels, sorted=True, return_inverse=True)
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xs = (x - mean) / scale
    n, p = xs.shape
    k = classes.numel()
    weight = torch.zeros(k, p, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(k, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_steps,
        # Gradient tolerance near sqrt(eps) of float64: the accuracy only needs the argmax, the
        # oracle test compares probabilities to 1e-5.
        tolerance_grad=1e-9,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = xs @ weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, k_index) + 0.5 * alpha * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        closure()
    gmax = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    return LogisticRegressionResult(
        weight=weight.detach(),
        bias=bias.detach(),
        mean=mean,
        scale=scale,
        classes=classes,
        converged=gmax <= 1e-6,
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class PCABaseline:
    """Plain PCA by SVD of the centred training rows.

    Attributes
    ----------
    mean
        ``(d,)`` training mean.
    components
        ``(l, d)`` orthonormal principal directions, largest variance first.
    """

    mean: torch.Tensor
    components: torch.Tensor

    def transform(self, y: torch.Tensor) -> torch.Tensor:
        """Scores ``(n, l)`` of rows ``y`` ``(n, d)``."""
        return (y - self.mean) @ self.components.T


def fit_pca(y: torch.Tensor, num_components: int) -> PCABaseline:
    """Top ``num_components`` principal directions of ``y`` ``(n, d)``.

    Examples
    --------
    >>> y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1]])
    >>> fit_pca(y, 1).components.abs()
    tensor([[1., 0.]])
    """
    if y.dim() != 2 or not 1 <= num_components <= min(y.shape):
        raise ValueError(
            f"need y (n, d) and 1 <= num_components <= min(n, d); got {tuple(y.shape)} and "
            f"{num_components}"
        )
    mean = y.mean(0)
    _, _, vh = torch.linalg.svd(y - mean, full_matrices=False)
    return PCABaseline(mean=mean, components=vh[:num_components].clone())
