"""Independent oracles for tests/spectra: infinite-width implicit kernels of centred-ReLU DEQs.

The kernel fixed point $K=\\sigma_a^2G(K)+\\sigma_b^2X^\\top X$ is iterated on the full $n\\times n$
matrix with the arc-cosine closed forms (Cho & Saul, 2009, NeurIPS) for
$\\mathbb E[\\mathrm{relu}(u)\\mathrm{relu}(v)]$ and $\\mathbb E[1\\{u>0\\}1\\{v>0\\}]$: no random-matrix
approximation and no finite width, so it separates the theory's error from sampling noise.
"""

from __future__ import annotations

import math

import torch


def relu_limit_kernels(gram: torch.Tensor, var_a: float, shift: float, *, tol: float = 1e-13,
                       max_steps: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G*, Theta*)`` for the DEQ with $\\phi=\\mathrm{relu}-c$, $c$ = ``shift``.

    $G^*_{ij}=\\mathbb E[\\mathrm{relu}\\,u\\,\\mathrm{relu}\\,v]-c(\\mathbb E\\,\\mathrm{relu}\\,u+
    \\mathbb E\\,\\mathrm{relu}\\,v)+c^2$ with $(u,v)$ of covariance $K^*$, and
    $\\Theta^*=G^*\\oslash(1-\\sigma_a^2\\mathbb E[1\\{u>0\\}1\\{v>0\\}])$.
    """
    var_b = 1.0 - var_a
    K = var_b * gram
    for _ in range(max_steps):
        G, Gdot = _relu_expectations(K, shift)
        K_new = var_a * G + var_b * gram
        if float((K_new - K).abs().max()) <= tol * float(K_new.abs().max()):
            K = K_new
            break
        K = K_new
    else:
        raise RuntimeError("the limit-kernel iteration did not converge")
    G, Gdot = _relu_expectations(K, shift)
    return G, G / (1.0 - var_a * Gdot)


def _relu_expectations(K, shift):
    d = torch.sqrt(torch.diagonal(K))
    norms = d[:, None] * d[None, :]
    cos = torch.clamp(K / norms, -1.0, 1.0)
    theta = torch.arccos(cos)
    both = norms * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    mean = d / math.sqrt(2 * math.pi)
    G = both - shift * (mean[:, None] + mean[None, :]) + shift**2
    Gdot = (math.pi - theta) / (2 * math.pi)
    return G, Gdot


def leaky_layer_kernel(K: torch.Tensor, positive_slope: float, negative_slope: float,
                       shift: float) -> torch.Tensor:
    """$\\mathbb E[\\sigma(u)\\sigma(v)]$ for $\\sigma=a\\,t^++b\\,t^--c$ and $(u,v)$ of covariance $K$.

    $\\sigma(t)=bt+(a-b)\\mathrm{relu}(t)-c$; with $\\mathbb E[u\\,\\mathrm{relu}(v)]=K_{uv}/2$ (Stein)
    and the arc-cosine kernel for $\\mathbb E[\\mathrm{relu}\\,u\\,\\mathrm{relu}\\,v]$.
    """
    a, b = positive_slope, negative_slope
    d = torch.sqrt(torch.diagonal(K))
    norms = d[:, None] * d[None, :]
    cos = torch.clamp(K / norms, -1.0, 1.0)
    theta = torch.arccos(cos)
    both = norms * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    mean = (a - b) * d / math.sqrt(2 * math.pi)  # E sigma(u) + c
    second = b * b * K + b * (a - b) * K + (a - b) ** 2 * both  # E[(sigma+c)(sigma+c)]
    return second - shift * (mean[:, None] + mean[None, :]) + shift**2
