"""Independent kernel-GLM reference: damped Newton/IRLS on alpha in NumPy (SPEC §4).

Written from the normal equations, not from deqppl: each step solves
$(KVK+\\lambda K)\\alpha = KVu$ with the working response $u = f + (t - \\mu)/v$, cancelling the
positive-definite $K$ to the better-conditioned $(VK+\\lambda I)\\alpha = Vu$, and halves the
step until the penalised objective decreases. Used by tests/encoders/test_kglm*.py and by
benchmarks/bench_kglm.py (the baseline).
"""

from __future__ import annotations

import numpy as np

# per family: (A, A', A'') of the canonical parameter, T(y) = y (Gaussian with precision 1)
FAMILIES = {
    "gaussian": (lambda f: 0.5 * f**2, lambda f: f, lambda f: np.ones_like(f)),
    "bernoulli": (
        lambda f: np.logaddexp(0.0, f),
        lambda f: 0.5 * (1.0 + np.tanh(0.5 * f)),
        lambda f: 0.25 / np.cosh(0.5 * f) ** 2,
    ),
    "poisson": (np.exp, np.exp, np.exp),
    "ising": (
        lambda f: np.logaddexp(f, -f),
        np.tanh,
        lambda f: 1.0 / np.cosh(f) ** 2,
    ),
}


def irls(name: str, K, t, lam: float, *, tol: float = 1e-14, max_steps: int = 200):
    """Return ``(alpha, num_steps)`` of the kGLM MAP; ``K`` ``(n, n)``, ``t = T(y)`` ``(n,)``."""
    A, dA, d2A = FAMILIES[name]
    K = np.asarray(K, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n = len(t)

    def objective(alpha):
        f = K @ alpha
        return float(np.sum(A(f) - t * f) + 0.5 * lam * alpha @ f)

    alpha = np.zeros(n)
    obj = objective(alpha)
    for step in range(1, max_steps + 1):
        f = K @ alpha
        mu, v = dA(f), d2A(f)
        u = f + (t - mu) / v
        new = np.linalg.solve(v[:, None] * K + lam * np.eye(n), v * u)
        direction = new - alpha
        scale = 1.0
        for _ in range(60):  # halve until the (convex) objective does not increase
            trial = alpha + scale * direction
            trial_obj = objective(trial)
            if trial_obj <= obj + 1e-13 * abs(obj):
                break
            scale *= 0.5
        change = np.max(np.abs(trial - alpha))
        alpha, obj = trial, trial_obj
        if change <= tol * (1.0 + np.max(np.abs(alpha))):
            return alpha, step
    raise RuntimeError(f"IRLS reference did not converge in {max_steps} steps")
