r"""Figure 7 of Tsuchida & Ong (2023, AISTATS) as the paper ran it: PED vs PCA vs UMAP backbones.

Protocol (SPEC §2.6). Per dataset of a column: the 42 453 latents of the three-component grid
(all of them, :func:`grid_latents`); $W\in\mathbb R^{50\times2}$ iid $\mathcal N(0, 1/2)$; $y$
drawn with natural parameter $R(Wz)$:

* ``gaussian``: $y = Wz + \varepsilon$, $\varepsilon\sim\mathcal N(0, I)$; PED with $R$ = identity,
  $\lambda = 0.1$;
* ``binomial``: the paper's "Bernoulli" column, which its code draws as
  $y\sim\mathrm{Binomial}(t = 10, \mathrm{sigmoid}(Wz))$ (SPEC §2.6); binomial PCA, identity,
  $\lambda = 0.1$ (the first runs here drew $t = 1$: their rows are kept apart in
  ``experiments/results/fig7_bernoulli_t1``, docs/fig7.md);
* ``poisson``: $y\sim\mathrm{Poisson}(e^{0.5\,Wz})$ (the paper's code); canonical Poisson PCA,
  whose fitted $W$ absorbs the factor 1/2; identity, $\lambda = 0.1$;
* ``relu``: rectified Gaussian, $y = \mathrm{ReLU}(Wz) + \varepsilon$; PED with the **hard**
  ReLU (:func:`deqppl.expfam.relu`), $\lambda = 1$;
* ``relu2``: two-layer rectified Gaussian, $z^{(2)}$ the grid, $z^{(1)} = \mathrm{ReLU}(W^{(2)}
  z^{(2)}) + \varepsilon_1\in\mathbb R^{10}$, $y = \mathrm{ReLU}(W^{(1)}z^{(1)}) + \varepsilon$,
  every $W$ iid $\mathcal N(0, 1/2)$; a :class:`~deqppl.encoders.DeepPEDEncoder` of
  :class:`~deqppl.models.HierarchicalExpFamPCA` with widths (50, 10, 2), hard ReLUs and all
  precisions 1; its features are the top latent $z^{(2)}$.

Backbones, each mapping $y$ to 2 features and each fitted on all $y$ (unsupervised):

* ``ped``: the PED encoder, globals fitted by joint MAP through the fixed point with the
  paper's Adam (lr 1e-3, batch 500, 30 epochs, 10 for ``relu2``; constant learning rate, flat
  prior on the globals as in the paper), then fine-tuned through the fixed point (implicit
  gradients) together with the head;
* ``pca``: truncated SVD of the centred $y$ as a linear layer $z = V_2^\top(y-\bar y)$,
  fine-tuned with the head;
* ``umap``: ``umap.UMAP(n_components=2)`` at its defaults (``random_state`` = the dataset seed,
  which makes it deterministic and single-threaded), standardised; not differentiable, so
  only the head is trained on it.

Each backbone feeds a head Linear(2, 100)-ReLU-Linear(100, 1) regressing $z_1 + z_2$ (same
initialisation for every backbone), trained by Adam (lr 1e-3, batch 500, 30 epochs) on an
80/20 split; the lowest test MSE wins the dataset.

Resumable: each finished (dataset, column, method) row is one JSON file ``OUT/rows/*.json``,
written atomically and carrying a SHA-256 checksum of its content and a fingerprint of the
protocol. On reload a row that does not parse or whose checksum fails is moved aside
(``*.corrupt-N``) and redone; rows of another protocol stop the run (use another ``OUT``).
``--summarise`` rebuilds the tables (and, with ``--docs``, the results section of
``docs/fig7.md``, its figure and its CSV) from the row files alone.

Run (full protocol, up to the paper's 100 datasets per column, round-robin over columns)::

    nohup nice -n 15 python experiments/fig7.py --num-datasets 100 --out /work/runs/fig7 &
    python experiments/fig7.py --summarise --out /work/runs/fig7 --docs docs/fig7.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deqppl._progress import progress
from deqppl.deq import Newton
from deqppl.encoders import DeepPEDEncoder, PEDEncoder, SupervisedPED, fit_encoder, fit_supervised
from deqppl.encoders.base import default_rtol
from deqppl.expfam import binomial, gaussian, poisson, relu
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA
from deqppl.optim import Adam, ConstantLR

OBS_DIM, LATENT_DIM, HIDDEN_DIM = 50, 2, 10
#: Trials of the paper's "Bernoulli" column, as its code draws it (SPEC §2.6: binomial t = 10).
BINOMIAL_TRIALS = 10
METHODS = ("ped", "pca", "umap")
#: Bump when a change of this file changes what a row means (part of every row's fingerprint).
PROTOCOL_VERSION = 1
ROW_FIELDS = (
    "dataset", "column", "method", "seed", "num_data", "num_train", "test_mse", "train_mse",
    "backbone_seconds", "head_seconds", "seconds", "unconverged", "ped_fit_loss",
    "ped_fit_status", "started_at", "finished_at",
)


@dataclass(frozen=True)
class Column:
    """One column of Figure 7: how its data are drawn and which PED model encodes them."""

    name: str
    label: str
    lam: float
    num_epochs: int
    #: Paper's best-method counts out of 100 datasets: (PED, PCA, UMAP) (SPEC §2.6).
    paper_wins: tuple[int, int, int]


COLUMNS = {
    c.name: c
    for c in (
        Column("gaussian", "Gaussian", 0.1, 30, (95, 5, 0)),
        Column("binomial", "Bernoulli (binomial, t = 10)", 0.1, 30, (94, 6, 0)),
        Column("poisson", "Poisson", 0.1, 30, (84, 0, 16)),
        Column("relu", "rectified Gaussian L=1", 1.0, 30, (89, 0, 11)),
        Column("relu2", "rectified Gaussian L=2", 1.0, 10, (100, 0, 0)),
    )
}
#: Every column a row store may hold, for the summaries: this protocol's, and the superseded
#: Bernoulli column drawn with t = 1 (its rows: experiments/results/fig7_bernoulli_t1; no
#: longer simulated or run).
SUMMARISED = {**COLUMNS, "bernoulli": Column("bernoulli", "Bernoulli (t = 1, superseded)", 0.1, 30, (94, 6, 0))}


def _columns(rows: list[dict]) -> list[str]:
    """The columns the rows hold, in the order of :data:`SUMMARISED`."""
    present = {r["column"] for r in rows}
    return [c for c in SUMMARISED if c in present]


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """The experiment's settings (defaults: the paper's; SPEC §2.6). Tests shrink them."""

    num_data: int | None = None  # None: the full grid of 42 453 points
    batch_size: int = 500
    lr: float = 1e-3
    epochs_scale: float = 1.0  # multiplies each column's PED epochs (tests only)
    head_epochs: int = 30
    head_batch_size: int = 500
    head_lr: float = 1e-3
    train_fraction: float = 0.8
    dtype: str = "float64"

    def __post_init__(self) -> None:
        if self.num_data is not None and not (isinstance(self.num_data, int) and self.num_data >= 10):
            raise ValueError(f"Protocol.num_data must be None or an integer >= 10, got {self.num_data!r}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"Protocol.train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"Protocol.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if not self.epochs_scale > 0:
            raise ValueError(f"Protocol.epochs_scale must be positive, got {self.epochs_scale}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def ped_epochs(self, column: Column) -> int:
        return max(1, round(column.num_epochs * self.epochs_scale))

    def fingerprint(self) -> str:
        text = json.dumps({"version": PROTOCOL_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ data
def grid_latents() -> torch.Tensor:
    """The 42 453 grid points of SPEC §2.6, ``(42453, 2)`` float64.

    A 316 x 316 grid on $[-5, 5]^2$ (numpy's ``linspace``) keeping points strictly inside the
    disc of radius 3 at (2, 2), the disc of radius 2 at (-3, -3) or the $\\ell_1$ ball of
    radius 1 at (4, -4). (Non-strict inequalities, or torch's ``linspace``, whose last bits
    differ, give 42 455-42 457 points.)
    """
    g = np.linspace(-5.0, 5.0, 316)
    X, Y = np.meshgrid(g, g)
    keep = (
        ((X - 2) ** 2 + (Y - 2) ** 2 < 9)
        | ((X + 3) ** 2 + (Y + 3) ** 2 < 4)
        | (np.abs(X - 4) + np.abs(Y + 4) < 1)
    )
    return torch.from_numpy(np.stack([X[keep], Y[keep]], axis=1))


@dataclass(frozen=True)
class Dataset:
    z: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor
    seed: int


def dataset_seed(column: Column, dataset: int) -> int:
    """Seed of dataset ``dataset`` of ``column`` (distinct across columns)."""
    return 1000 * dataset + list(COLUMNS).index(column.name)


def simulate(column: Column, dataset: int, protocol: Protocol) -> Dataset:
    """Latents, observations, regression target and the 80/20 split of one dataset."""
    seed = dataset_seed(column, dataset)
    gen = torch.Generator().manual_seed(seed)
    z = grid_latents()
    if protocol.num_data is not None and protocol.num_data < len(z):
        z = z[torch.randperm(len(z), generator=gen)[: protocol.num_data]]

    def loadings(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float64) * math.sqrt(0.5)

    def noise(shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    if column.name == "relu2":
        W2, W1 = loadings(HIDDEN_DIM, LATENT_DIM), loadings(OBS_DIM, HIDDEN_DIM)
        z1 = torch.relu(z @ W2.T) + noise((len(z), HIDDEN_DIM))
        y = torch.relu(z1 @ W1.T) + noise((len(z), OBS_DIM))
    else:
        eta = z @ loadings(OBS_DIM, LATENT_DIM).T
        if column.name == "gaussian":
            y = eta + noise(eta.shape)
        elif column.name == "binomial":
            y = torch.binomial(torch.full_like(eta, float(BINOMIAL_TRIALS)), torch.sigmoid(eta), generator=gen)
        elif column.name == "poisson":
            y = torch.poisson(torch.exp(0.5 * eta), generator=gen)
        else:
            y = torch.relu(eta) + noise(eta.shape)
    perm = torch.randperm(len(z), generator=gen)
    n_train = int(protocol.train_fraction * len(z))
    dt = protocol.torch_dtype
    return Dataset(z=z, y=y.to(dt), target=z.sum(1, keepdim=True).to(dt),
                   train=perm[:n_train], test=perm[n_train:], seed=seed)


# ------------------------------------------------------------------------------------ backbones
def ped_encoder(column: Column, seed: int, dtype: torch.dtype) -> nn.Module:
    """The PED encoder of ``column`` at its default initialisation (flat prior on the globals).

    The rectified columns run with ``throw=False``: with the hard ReLU a datapoint whose MAP
    sits on a convex kink of $F$ has no fixed point (PEDEncoder Notes); such rows are returned
    at the solver's last iterate and counted in the ``unconverged`` field.
    """
    if column.name == "relu2":
        model = HierarchicalExpFamPCA(widths=(OBS_DIM, HIDDEN_DIM, LATENT_DIM),
                                      nonlinearities=(relu(), relu()), param_scale=None)
        return DeepPEDEncoder(model, seed=seed, throw=False, solver=kink_newton(dtype)).to(dtype)
    fam = {"gaussian": gaussian(), "binomial": binomial(BINOMIAL_TRIALS), "poisson": poisson(),
           "relu": gaussian()}[column.name]
    if column.name == "relu":
        model = ExpFamPCA(family=fam, obs_dim=OBS_DIM, latent_dim=LATENT_DIM, lam=column.lam,
                          param_scale=None, nonlinearity=relu())
        return PEDEncoder(model, seed=seed, throw=False, solver=kink_newton(dtype)).to(dtype)
    model = ExpFamPCA(family=fam, obs_dim=OBS_DIM, latent_dim=LATENT_DIM, lam=column.lam, param_scale=None)
    return PEDEncoder(model, seed=seed).to(dtype)


def kink_newton(dtype: torch.dtype) -> Newton:
    """Full-step Newton (an active-set iteration on the ReLU pattern) capped at 10 steps.

    With hard ReLUs and Gaussian conditionals $F$ is a convex quadratic on each activation
    pattern, so a full Newton step minimises the current piece exactly. Measured on 3 000
    rows of dataset 0 at the initial globals: every row that converges does so within 10
    steps (81% of rows for ``relu``, 22% for ``relu2``); the others cycle between patterns
    (a MAP on a convex kink, no fixed point), and the log joint after 20 steps equals that
    after 100 to 1e-15 relative (``relu``) and 1e-7 (``relu2``), at a fifth of the cost.
    The library default for ``relu2`` (safeguarded Anderson, 2 000 steps) converged on 16%
    of rows at 25 times the cost.
    """
    return Newton(rtol=default_rtol(dtype), atol=0.0, max_steps=10, line_search=False)


class KinkBackbone(nn.Module):
    r"""A rectified PED encoder as a fine-tunable backbone: one differentiable Newton step.

    With hard ReLUs some rows have no fixed point (their MAP sits on a convex kink of $F$;
    ``unconverged`` counts them), and the library's implicit adjoint rightly gives such rows
    NaN derivatives -- which poisons every minibatch that holds one. This backbone returns
    $z^+ = z - (I - J_f(z))^{-1}(z - f(z))$ at the solver's detached result $z$, with $J_f$
    and $f$ differentiable in the globals. At a fixed point $z - f(z) = 0$, so $z^+ = z^*$ and
    its gradient is $(I - J_f)^{-1}\partial_	heta f$, exactly the implicit-function-theorem
    gradient; at a cycling row $z^+$ is the minimiser of the current activation pattern's
    quadratic piece (the next active-set iterate) and its gradient is that piece's.
    ``top`` keeps the last ``LATENT_DIM`` coordinates (the deep encoder's $z^{(2)}$).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.encoder.solve(y, throw=False).value.detach()
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        step = torch.linalg.solve(eye - self.encoder.layer_jacobian(z, y),
                                  (z - self.encoder.layer(z, y))[..., None])[..., 0]
        return (z - step)[:, -LATENT_DIM:]


def head(seed: int, dtype: torch.dtype) -> nn.Module:
    """Linear(2, 100)-ReLU-Linear(100, 1), seeded (every backbone gets the same start)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(LATENT_DIM, 100), nn.ReLU(), nn.Linear(100, 1)).to(dtype)


def pca_layer(y: torch.Tensor) -> nn.Linear:
    """$z = V_2^\\top(y - \\bar y)$ from the truncated SVD of the centred ``y``, as a Linear layer."""
    mean = y.mean(0)
    V2 = torch.linalg.svd(y - mean, full_matrices=False).Vh[:LATENT_DIM]
    layer = nn.Linear(OBS_DIM, LATENT_DIM).to(y.dtype)
    with torch.no_grad():
        layer.weight.copy_(V2)
        layer.bias.copy_(-V2 @ mean)
    return layer


def _fit_head(net: nn.Module, inputs: torch.Tensor, data: Dataset, protocol: Protocol) -> tuple[float, float]:
    fit_supervised(net, inputs[data.train], data.target[data.train], num_epochs=protocol.head_epochs,
                   batch_size=protocol.head_batch_size, lr=protocol.head_lr, seed=data.seed, progress=False)
    with torch.no_grad():
        out = {k: float(torch.mean((net(inputs[idx]) - data.target[idx]) ** 2))
               for k, idx in (("test", data.test), ("train", data.train))}
    return out["test"], out["train"]


def _fit_ped(column: Column, data: Dataset, protocol: Protocol):
    """The PED backbone of ``column`` fitted unsupervised by Adam (the paper's settings)."""
    enc = ped_encoder(column, data.seed, protocol.torch_dtype)
    optimizer = Adam(num_epochs=protocol.ped_epochs(column), batch_size=protocol.batch_size,
                     lr=protocol.lr, rtol=0.0, schedule=ConstantLR())
    return enc, fit_encoder(enc, data.y, optimizer=optimizer, seed=data.seed, progress=False)


def _standardised(feats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Frozen features centred and scaled per column (what the head of a frozen backbone sees)."""
    feats = feats.detach().double()
    return ((feats - feats.mean(0)) / feats.std(0)).to(dtype)


def run_ped(column: Column, data: Dataset, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    enc, fit = _fit_ped(column, data, protocol)
    t1 = time.perf_counter()
    backbone = KinkBackbone(enc) if column.name in ("relu", "relu2") else enc
    net = SupervisedPED(backbone, head(data.seed, protocol.torch_dtype))
    test, train = _fit_head(net, data.y, data, protocol)
    with torch.no_grad():
        unconverged = int((~enc.solve(data.y, throw=False).converged).sum())
    return {"test_mse": test, "train_mse": train, "backbone_seconds": t1 - t0,
            "head_seconds": time.perf_counter() - t1, "unconverged": unconverged,
            "ped_fit_loss": float(fit.loss_trace[-1]), "ped_fit_status": fit.status.name}


def run_pca(column: Column, data: Dataset, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    layer = pca_layer(data.y)
    t1 = time.perf_counter()
    test, train = _fit_head(nn.Sequential(layer, head(data.seed, protocol.torch_dtype)), data.y, data, protocol)
    return {"test_mse": test, "train_mse": train, "backbone_seconds": t1 - t0,
            "head_seconds": time.perf_counter() - t1}


def run_umap(column: Column, data: Dataset, protocol: Protocol) -> dict:
    import umap  # optional extra "experiments"

    t0 = time.perf_counter()
    emb = umap.UMAP(n_components=LATENT_DIM, random_state=data.seed, n_jobs=1).fit_transform(
        data.y.double().numpy())
    feats = _standardised(torch.from_numpy(np.asarray(emb, dtype=np.float64)), protocol.torch_dtype)
    t1 = time.perf_counter()
    test, train = _fit_head(head(data.seed, protocol.torch_dtype), feats, data, protocol)
    return {"test_mse": test, "train_mse": train, "backbone_seconds": t1 - t0,
            "head_seconds": time.perf_counter() - t1}


# Diagnostics, not part of Figure 7 (experiments/fig7_frozen.py): the PED and PCA backbones
# frozen, their features standardised and fed to the head alone, as UMAP's are.
def run_ped_frozen(column: Column, data: Dataset, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    enc, fit = _fit_ped(column, data, protocol)
    with torch.no_grad():
        sol = enc.solve(data.y, throw=False)
    feats = _standardised(sol.value[:, -LATENT_DIM:], protocol.torch_dtype)
    t1 = time.perf_counter()
    test, train = _fit_head(head(data.seed, protocol.torch_dtype), feats, data, protocol)
    return {"test_mse": test, "train_mse": train, "backbone_seconds": t1 - t0,
            "head_seconds": time.perf_counter() - t1, "unconverged": int((~sol.converged).sum()),
            "ped_fit_loss": float(fit.loss_trace[-1]), "ped_fit_status": fit.status.name}


def run_pca_frozen(column: Column, data: Dataset, protocol: Protocol) -> dict:
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = _standardised(pca_layer(data.y)(data.y), protocol.torch_dtype)
    t1 = time.perf_counter()
    test, train = _fit_head(head(data.seed, protocol.torch_dtype), feats, data, protocol)
    return {"test_mse": test, "train_mse": train, "backbone_seconds": t1 - t0,
            "head_seconds": time.perf_counter() - t1}


RUNNERS: dict[str, Callable[[Column, Dataset, Protocol], dict]] = {
    "ped": run_ped, "pca": run_pca, "umap": run_umap,
    "ped_frozen": run_ped_frozen, "pca_frozen": run_pca_frozen,
}


# ------------------------------------------------------------------------------------ the row store
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def checksum(record: dict) -> str:
    """SHA-256 of the record's canonical JSON without its ``checksum`` field."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class RowStore:
    """One JSON file per finished (dataset, column, method) row, atomic, checksummed."""

    def __init__(self, out: Path) -> None:
        self.dir = Path(out) / "rows"
        self.quarantined: list[Path] = []

    def path(self, dataset: int, column: str, method: str) -> Path:
        return self.dir / f"{column}-{dataset:04d}-{method}.json"

    def save(self, record: dict) -> None:
        record = {**record, "checksum": checksum(record)}
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(record["dataset"], record["column"], record["method"])
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh, sort_keys=True, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _quarantine(self, path: Path, why: str) -> None:
        k = 1
        while path.with_name(f"{path.name}.corrupt-{k}").exists():
            k += 1
        target = path.with_name(f"{path.name}.corrupt-{k}")
        os.replace(path, target)
        self.quarantined.append(target)
        print(f"fig7: damaged row file {path} ({why}); moved to {target.name}, the row will be redone",
              file=sys.stderr, flush=True)

    def load(self) -> list[dict]:
        """Every valid row; damaged files are moved aside (and so redone by a run)."""
        rows = []
        if not self.dir.exists():
            return rows
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                self._quarantine(path, f"unreadable: {err}")
                continue
            if not isinstance(record, dict) or record.get("checksum") != checksum(record):
                self._quarantine(path, "checksum mismatch")
                continue
            missing = set(ROW_FIELDS) - set(record)
            if missing or path != self.path(record["dataset"], record["column"], record["method"]):
                self._quarantine(path, f"not a fig7 row of this name (missing {sorted(missing)})")
                continue
            rows.append(record)
        return rows


# ------------------------------------------------------------------------------------ the run
def run(out: Path, protocol: Protocol, *, num_datasets: int, columns: Sequence[str],
        methods: Sequence[str] = METHODS, show_progress: bool = True,
        shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run every missing (dataset, column, method) row, dataset-major (round-robin over columns).

    ``shard = (k, m)``: only the datasets ``d`` with ``d % m == k``, so that ``m`` processes
    (``--shard k/m``) share one ``out`` without doing a row twice; each row file is written
    atomically, and a process sees the others' rows when it (re)starts.
    """
    k, m = shard
    if not (isinstance(k, int) and isinstance(m, int) and m >= 1 and 0 <= k < m):
        raise ValueError(f"shard must be (k, m) with integers 0 <= k < m, got {shard!r}")
    out = Path(out)
    store = RowStore(out)
    rows = store.load()
    fp = protocol.fingerprint()
    foreign = sorted({r["fingerprint"] for r in rows} - {fp})
    if foreign:
        raise ValueError(
            f"{out} holds rows of another protocol (fingerprints {foreign}, this one {fp}); "
            "use another --out or the settings of that run"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps({"fingerprint": fp, **dataclasses.asdict(protocol)}, indent=1))
    done = {(r["dataset"], r["column"], r["method"]) for r in rows}
    units = []
    for d in range(k, num_datasets, m):
        for c in columns:
            todo = [m for m in methods if (d, c, m) not in done]
            if todo:
                units.append((d, c, todo))
    for d, c, todo in progress(units, enable=show_progress, desc="fig7 (dataset, column)"):
        column = COLUMNS[c]
        data = simulate(column, d, protocol)
        for m in todo:
            # every run on one torch thread (a deterministic row, and two shards on two cores
            # do not oversubscribe them): UMAP's numba layer resets torch's OpenMP pool to the
            # number of cores, which left every later PED run of the process on two threads
            torch.set_num_threads(1)
            started, t0 = _now(), time.perf_counter()
            result = RUNNERS[m](column, data, protocol)
            record = {
                "dataset": d, "column": c, "method": m, "seed": data.seed, "num_data": len(data.y),
                "num_train": len(data.train), "unconverged": 0, "ped_fit_loss": None,
                "ped_fit_status": None, **result, "seconds": time.perf_counter() - t0,
                "started_at": started, "finished_at": _now(), "fingerprint": fp,
            }
            store.save(record)
            rows.append(record)
            print(f"fig7 dataset {d} {c} {m}: test MSE {record['test_mse']:.4g} "
                  f"({record['seconds']:.1f} s, unconverged {record['unconverged']})", flush=True)
    return rows


# ------------------------------------------------------------------------------------ summaries
@dataclass(frozen=True)
class ColumnWins:
    column: str
    num_datasets: int  # datasets with all three methods finished
    wins: dict[str, int]
    ped_vs: dict[str, tuple[int, int]]  # method -> (PED wins, datasets compared)
    median_mse: dict[str, float]
    unconverged: float  # mean PED rows unconverged per dataset


def win_counts(rows: list[dict], methods: Sequence[str] = METHODS) -> dict[str, ColumnWins]:
    """Best-method counts per column over the datasets where every method finished."""
    by = {}
    for r in rows:
        by.setdefault(r["column"], {}).setdefault(r["dataset"], {})[r["method"]] = r
    out = {}
    for c in _columns(rows):
        datasets = by.get(c, {})
        full = {d: v for d, v in datasets.items() if all(m in v for m in methods)}
        wins = {m: 0 for m in methods}
        for v in full.values():
            wins[min(methods, key=lambda m: v[m]["test_mse"])] += 1
        ped_vs = {}
        for m in methods:
            if m == "ped":
                continue
            pairs = [v for v in datasets.values() if "ped" in v and m in v]
            ped_vs[m] = (sum(v["ped"]["test_mse"] < v[m]["test_mse"] for v in pairs), len(pairs))
        med = {m: float(np.median([v[m]["test_mse"] for v in datasets.values() if m in v]))
               if any(m in v for v in datasets.values()) else math.nan for m in methods}
        unconv = [v["ped"]["unconverged"] for v in datasets.values() if "ped" in v]
        out[c] = ColumnWins(c, len(full), wins, ped_vs, med, float(np.mean(unconv)) if unconv else math.nan)
    return out


def _se(k: int, n: int) -> float:
    """Binomial standard error of a count $k$ of $n$: $\\sqrt{n\\hat p(1-\\hat p)}$."""
    return math.sqrt(n * (k / n) * (1 - k / n)) if n else math.nan


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of k/n (z = the normal 0.975 quantile; informative at k = 0, n)."""
    if not n:
        return (math.nan, math.nan)
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (centre - half, centre + half)


def summary_markdown(rows: list[dict]) -> str:
    wins = win_counts(rows)
    lines = [
        "| column | datasets | PED wins | PCA wins | UMAP wins | paper PED / PCA / UMAP (of 100) "
        "| PED win fraction ± s.e. [95 % Wilson] | paper fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, w in wins.items():
        col = SUMMARISED[c]
        n = w.num_datasets
        cells = [f"{w.wins[m]} ± {_se(w.wins[m], n):.1f}" if n else "–" for m in METHODS]
        lo, hi = wilson(w.wins["ped"], n)
        frac = f"{w.wins['ped'] / n:.2f} ± {_se(w.wins['ped'], n) / n:.2f} [{lo:.2f}, {hi:.2f}]" if n else "–"
        paper = " / ".join(str(x) for x in col.paper_wins)
        lines.append(f"| {col.label} | {n} | {' | '.join(cells)} | {paper} | {frac} | {col.paper_wins[0] / 100:.2f} |")
    lines += [
        "",
        "| column | PED beats PCA | PED beats UMAP | median test MSE PED / PCA / UMAP | PED rows unconverged (mean per dataset) |",
        "|---|---|---|---|---|",
    ]
    for c, w in wins.items():
        pv = [f"{k} of {n}" for k, n in (w.ped_vs["pca"], w.ped_vs["umap"])]
        med = " / ".join("–" if math.isnan(w.median_mse[m]) else f"{w.median_mse[m]:.4g}" for m in METHODS)
        unc = "–" if math.isnan(w.unconverged) else f"{w.unconverged:.0f}"
        lines.append(f"| {SUMMARISED[c].label} | {pv[0]} | {pv[1]} | {med} | {unc} |")
    return "\n".join(lines) + "\n"


def timing_markdown(rows: list[dict]) -> str:
    """Compute seconds per (column, method), the run's wall-clock span and its rate."""
    if not rows:
        return "No rows finished yet.\n"
    lines = ["| column | PED s / dataset | PCA s / dataset | UMAP s / dataset |", "|---|---|---|---|"]
    for c in _columns(rows):
        cells = []
        for m in METHODS:
            secs = [r["seconds"] for r in rows if r["column"] == c and r["method"] == m]
            cells.append(f"{np.mean(secs):.0f} (n = {len(secs)})" if secs else "–")
        lines.append(f"| {SUMMARISED[c].label} | {' | '.join(cells)} |")
    start = min(_dt.datetime.fromisoformat(r["started_at"]) for r in rows)
    end = max(_dt.datetime.fromisoformat(r["finished_at"]) for r in rows)
    hours = max((end - start).total_seconds(), 1.0) / 3600
    full = sum(w.num_datasets for w in win_counts(rows).values())
    lines += ["", f"Wall clock {start:%Y-%m-%d %H:%M} – {end:%H:%M} UTC ({hours:.2f} h), "
              f"{sum(r['seconds'] for r in rows) / 3600:.2f} h of compute in {len(rows)} rows; "
              f"{full} complete dataset-columns, i.e. {full / hours:.1f} dataset-columns per hour."]
    return "\n".join(lines) + "\n"


def per_dataset_csv(rows: list[dict], path: Path) -> None:
    import csv

    fields = [f for f in ROW_FIELDS]
    with Path(path).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (list(SUMMARISED).index(r["column"]), r["dataset"], list(RUNNERS).index(r["method"]))):
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})


def _tick(column: str) -> str:
    """A column's label, short enough for the figure's axis."""
    return SUMMARISED[column].label.replace("rectified Gaussian", "rect.").replace(" (binomial, t = 10)", "\n(t = 10)")


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wins = win_counts(rows)
    cols = list(wins)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.27
    for k, m in enumerate(METHODS):
        frac = [wins[c].wins[m] / wins[c].num_datasets if wins[c].num_datasets else np.nan for c in cols]
        bounds = [wilson(wins[c].wins[m], wins[c].num_datasets) for c in cols]
        # Wilson's bound at 0 or n wins can land a rounding error past the fraction: clip at 0
        err = np.clip(np.array([[f - lo, hi - f] for f, (lo, hi) in zip(frac, bounds)]).T, 0.0, None)
        x = np.arange(len(cols)) + (k - 1) * width
        ax.bar(x, frac, width, yerr=err, capsize=2, label=f"{m.upper()} (here)")
        ax.plot(x, [SUMMARISED[c].paper_wins[k] / 100 for c in cols], "k_", markersize=14,
                label="paper" if k == 0 else None)
    ax.set_xticks(np.arange(len(cols)), [_tick(c) for c in cols],
                  fontsize=8)
    ax.set_ylabel("fraction of datasets won [95 % Wilson]")
    ax.set_ylim(0, 1.05)
    # below the axes: every bar group is tall somewhere, so no corner inside is free
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    ax.set_title("Best downstream test MSE")
    for k, m in enumerate(METHODS):
        for j, c in enumerate(cols):
            v = [r["test_mse"] for r in rows if r["column"] == c and r["method"] == m]
            bx.scatter(np.full(len(v), j + (k - 1) * width), v, s=8, color=f"C{k}",
                       label=m.upper() if j == 0 else None)
    bx.set_yscale("log")
    bx.set_xticks(np.arange(len(cols)), [_tick(c) for c in cols],
                  fontsize=8)
    bx.set_ylabel("test MSE of $z_1+z_2$")
    bx.legend(fontsize=7)
    bx.set_title("Per dataset")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


BEGIN, END = "<!-- BEGIN fig7 results (experiments/fig7.py --summarise) -->", "<!-- END fig7 results -->"


def summarise(out: Path, docs: Path | None = None) -> str:
    """Tables (and with ``docs`` the results section of that file, its figure and CSV) from the rows."""
    out = Path(out)
    rows = RowStore(out).load()
    text = summary_markdown(rows) + "\n" + timing_markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    per_dataset_csv(rows, out / "results.csv")
    if docs is not None:
        docs = Path(docs)
        fig_path = docs.parent / "figures" / "fig7.png"
        csv_path = docs.parent / "fig7_results.csv"
        per_dataset_csv(rows, csv_path)
        figure(rows, fig_path)
        block = (f"{BEGIN}\n\n{text}\n![Figure 7 wins](figures/{fig_path.name})\n\n"
                 f"Per-dataset rows: [`{csv_path.name}`]({csv_path.name}).\n\n{END}")
        doc = docs.read_text() if docs.exists() else f"# Figure 7\n\n{BEGIN}\n{END}\n"
        if BEGIN not in doc or END not in doc:
            raise ValueError(f"{docs} has no results markers ({BEGIN!r} ... {END!r})")
        head_, rest = doc.split(BEGIN, 1)
        docs.write_text(head_ + block + rest.split(END, 1)[1])
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory (rows/ inside)")
    parser.add_argument("--num-datasets", type=int, default=20, help="datasets per column")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--shard", default="0/1", metavar="K/M",
                        help="run only the datasets d with d %% M == K (M processes share one --out)")
    parser.add_argument("--summarise", action="store_true", help="only rebuild the tables from OUT")
    parser.add_argument("--docs", type=Path, default=None, help="with --summarise: update this markdown file")
    parser.add_argument("--no-progress", action="store_true")
    # test-size overrides (the defaults are the paper's protocol)
    parser.add_argument("--num-data", type=int, default=None, help="subsample the grid (tests only)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="scale PED epochs (tests only)")
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    args = parser.parse_args(argv)
    if args.summarise:
        sys.stdout.write(summarise(args.out, args.docs))
        return 0
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for given, valid, what in ((columns, COLUMNS, "columns"), (methods, RUNNERS, "methods")):
        bad = sorted(set(given) - set(valid))
        if bad:
            parser.error(f"unknown {what} {bad}; valid: {', '.join(valid)}")
    if args.num_datasets < 1:
        parser.error(f"--num-datasets must be >= 1, got {args.num_datasets}")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be K/M with integers 0 <= K < M, got {args.shard!r}")
    protocol = Protocol(num_data=args.num_data, epochs_scale=args.epochs_scale,
                        head_epochs=args.head_epochs, dtype=args.dtype)
    run(args.out, protocol, num_datasets=args.num_datasets, columns=columns, methods=methods,
        show_progress=not args.no_progress, shard=shard)
    sys.stdout.write(summarise(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
