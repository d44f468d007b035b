"""The ``deqppl`` command line: the one place where names become objects.

::

    deqppl list
    deqppl compare [--model pca|hierarchical|kglm] [--data NAME|simulate:FAMILY[,n=N,...]|PATH]
                   [--family NAME] [--total-count T] [--nonlinearity NAME] [--latent-dim L]
                   [--widths D1,D2] [--lengthscale S] [--x-columns A,B] [--y-column C]
                   [--lam X] [--methods deq,svi,lbfgs] [--seed S] [--seeds S1,S2]
                   [--heldout-fraction F] [--label-column COL] [--rows N | --full]
                   [--no-model-comparison] [--out DIR] [--small] [--no-progress]
    deqppl report --out DIR
    deqppl encode --model FITTED --data FILE.parquet|FILE.csv --out LATENTS.parquet
                  [--chunk-rows N] [--no-laplace] [--overwrite] [--device D] [--no-progress]
    [torchrun --nproc-per-node N -m] deqppl fit --data NAME|PATH.csv|PATH.parquet --out MODEL
                   [--model pca] [--family NAME] [--total-count T] [--nonlinearity NAME]
                   [--latent-dim L] [--lam X] [--optimizer alternating|lbfgs|adam] [--max-steps K]
                   [--epochs E] [--batch-size B] [--lr R] [--seed S] [--dtype float64|float32]
                   [--device cpu|cuda] [--timeout SECONDS] [--no-progress]

``compare`` fits a model of the zoo to the data by every method (:func:`deqppl.harness.compare`)
and writes into ``--out``: ``table.csv`` (tidy, one row per model x method x seed x stage x
metric), ``summary.csv`` (one row per method), ``report.html`` / ``report.md`` with figures, and
``run.json`` (the resolved settings). Each finished unit of work is stored at once under
``OUT/runs``, so an interrupted run resumes where it stopped when the same command is run
again; ``deqppl report --out DIR`` rebuilds the tables and report from those stored units.

``encode`` streams a table larger than memory through a fitted model file
(:func:`deqppl.io.save`) chunk by chunk and writes the latents, per-row convergence, residual and
Laplace standard deviations (:func:`deqppl.io.encode`); an interrupted run resumes when the same
command is run again, and ``--out`` appears only when every chunk is done.

``fit`` fits the globals of a zoo model's DEQ encoder to a table (the joint MAP through the fixed
point, :func:`deqppl.encoders.fit_encoder`) and writes the fitted encoder with
:func:`deqppl.io.save`. Launched by ``torchrun`` it runs data-parallel
(:mod:`deqppl.distributed`): each rank reads only its block of the rows, the ranks sum their
losses and gradients, and rank 0 writes the file; a failing rank stops every rank with an error
naming it.

Models (``--model``) and their built-in data (``--data``):

``pca`` (default): exponential-family PCA, :class:`~deqppl.models.ExpFamPCA`
    ``digits`` (default; Binomial(16) pixel counts, ``--latent-dim`` 5), ``simulate:FAMILY``,
    or a CSV/Parquet file of observations (``--family`` required). On the digits the default
    report also compares Gaussian, Poisson and Binomial(16) PCA of latent sizes 2 and 5 by
    held-out log-likelihood and PSIS-LOO (:func:`deqppl.harness.compare_models`;
    ``--no-model-comparison`` skips it).
``hierarchical``: Gaussian latents in ``L`` layers, :class:`~deqppl.models.HierarchicalExpFamPCA`
    with latent widths ``--widths`` (default ``8,3``; the DEQ row is
    :class:`~deqppl.encoders.DeepPEDEncoder`); ``digits`` (the pixel counts as Gaussian
    observations with unit precision), ``simulate:gaussian`` or a file.
``kglm``: kernel GLM, :class:`~deqppl.models.KernelGLM` with a squared-exponential kernel of
    ``--lengthscale`` (default $\\sqrt p$ for $p$ standardised inputs); ``diabetes`` (default,
    Gaussian), ``breast_cancer`` (Bernoulli), ``simulate:FAMILY`` (1-D inputs) or a file with
    ``--y-column`` and optionally ``--x-columns`` (standardised as the bundled tables). Its
    held-out stage scores the predictive density at the held-out inputs
    (:func:`deqppl.harness.compare`, coupled models).

Digits run on a seeded subset of ``--rows`` rows (default :data:`DIGITS_DEFAULT_ROWS`, sized so
that the README's main command finishes in minutes on two cores with every method run to its
own convergence criterion); ``--full`` uses all 1 797.

Unknown names (model, family, nonlinearity, method, data) and bad data files are reported as
one line on stderr naming the bad value and the valid ones, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from deqppl.distributed import RankFailedError

__all__ = ["main"]

#: The built-in digits are Binomial(16) pixel counts (8x8 images, values 0..16).
DIGITS_TOTAL_COUNT = 16
#: Default latent dimension for the digits: five dimensions already separate the ten classes
#: well enough for the downstream accuracy check, and keep a full comparison to minutes.
DIGITS_LATENT_DIM = 5
#: Rows of the digits used unless ``--full`` (a seeded subset; see the module notes).
DIGITS_DEFAULT_ROWS = 600
#: Families and latent sizes of the digits' model comparison in the default report.
DIGITS_MODEL_COMPARISON = {"families": ("gaussian", "poisson", "binomial"), "latent_dims": (2, 5)}
#: Laplace draws per held-out row in that model comparison.
MODEL_COMPARISON_DRAWS = 100
#: Default latent widths of ``--model hierarchical`` (d_1, d_2).
HIERARCHICAL_WIDTHS = (8, 3)
#: Defaults of ``simulate:FAMILY`` (rows, observed and latent dimension).
SIMULATE_DEFAULTS = {"n": 200, "d": 10, "l": 2}
#: ``--small``: at most this many rows, and fewer optimiser steps per method (a smoke run).
SMALL_ROWS = 240
SMALL_STEPS = {"deq": 20, "svi": 1000, "lbfgs": 100}
#: The zoo models by ``--model`` name.
MODELS = ("pca", "hierarchical", "kglm")
#: Built-in data sets per model (besides ``simulate:...`` and files).
BUILTIN_DATA = {"pca": ("digits",), "hierarchical": ("digits",), "kglm": ("diabetes", "breast_cancer")}
#: Default ``--data`` per model.
DEFAULT_DATA = {"pca": "digits", "hierarchical": "digits", "kglm": "diabetes"}
#: Default ``--methods`` per model (the kernel GLM has no DEQ encoder yet).
DEFAULT_METHODS = {"pca": "deq,svi,lbfgs", "hierarchical": "deq,svi,lbfgs", "kglm": "deq,svi,lbfgs"}
#: Family of each built-in kernel-GLM data set.
KGLM_FAMILIES = {"diabetes": "gaussian", "breast_cancer": "bernoulli"}


def _data_help(model: str) -> str:
    return " | ".join([*BUILTIN_DATA[model], "simulate:FAMILY[,n=N,d=D,l=L,t=T]", "PATH.csv", "PATH.parquet"])


class UsageError(Exception):
    """A bad name, value or data file given on the command line (exit status 2)."""


@dataclass(frozen=True)
class Problem:
    """What ``compare`` runs on: the model, the train/held-out split and optional labels.

    ``data`` and ``heldout`` are validated by the model once (:func:`deqppl.harness.validated`)
    and passed on as such.
    """

    model: object
    data: object
    heldout: object | None
    labels: torch.Tensor | None
    heldout_labels: torch.Tensor | None
    description: str
    encoder: type | None
    model_comparison: dict | None
    #: ``--heldout-fraction 0``: no rows held out; the held-out stage re-infers the training rows.
    in_sample: bool = False


# --------------------------------------------------------------------------------------------
# names -> objects
# --------------------------------------------------------------------------------------------
def _lookup(factory, name: str, **params):
    try:
        return factory(name, **params)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def _family(name: str, total_count: int | None):
    from deqppl.expfam import FAMILIES, family

    if name not in FAMILIES:
        _lookup(family, name)  # raises listing the valid families
    if name == "binomial":
        if total_count is None:
            raise UsageError("family 'binomial' needs --total-count T (the number of trials)")
        return _lookup(family, name, total_count=total_count)
    if total_count is not None:
        raise UsageError(f"--total-count applies to family 'binomial' only, not {name!r}")
    return _lookup(family, name)


def _check_model(name: str) -> str:
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; valid models are: {', '.join(MODELS)}")
    return name


def _encoder(model_name: str):
    from deqppl.encoders import DeepPEDEncoder, KernelGLMEncoder, PEDEncoder

    return {"pca": PEDEncoder, "hierarchical": DeepPEDEncoder, "kglm": KernelGLMEncoder}.get(model_name)


def _methods(settings: dict) -> list:
    from deqppl.harness import METHODS, DEQMethod, method
    from deqppl.optim import LBFGS

    model_name = _check_model(settings["model"])
    text = settings["methods"] or DEFAULT_METHODS[model_name]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--methods is empty; give a comma-separated list, e.g. deq,svi,lbfgs")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods lists a method twice: {text!r}")
    out = []
    for name in names:
        m = _lookup(method, name)
        if isinstance(m, DEQMethod):
            encoder = _encoder(model_name)
            if encoder is None:
                valid = sorted(n for n in METHODS if not issubclass(METHODS[n], DEQMethod))
                raise UsageError(
                    f"method {name!r} needs a DEQ encoder, and model {model_name!r} has none yet; "
                    f"valid methods for it are: {', '.join(valid)}"
                )
            m = dataclasses.replace(m, encoder=encoder)
        if settings["small"] and name in SMALL_STEPS:
            # a smoke run caps every fit; the DEQ's encoder default becomes a capped profiled
            # L-BFGS, which every encoder supports
            base = m.optimizer if m.optimizer is not None else LBFGS()
            m = dataclasses.replace(m, optimizer=dataclasses.replace(base, max_steps=SMALL_STEPS[name]))
        out.append(m)
    return out


def _seeds(args) -> tuple[int, ...]:
    if args.seeds is None:
        return (args.seed,)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: {args.seeds!r}")
    return seeds


def _int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} must be comma-separated positive integers, got {text!r}")
    return values


def _simulate_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``simulate:poisson,n=100,l=3`` -> ``("poisson", {"n": 100, "d": 10, "l": 3})``."""
    name, *options = spec.split(",")
    sizes = dict(SIMULATE_DEFAULTS)
    allowed = sorted([*SIMULATE_DEFAULTS, "t"])
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise UsageError(
                f"bad option {option!r} in --data simulate:{spec}; allowed: "
                + ", ".join(f"{k}=INT" for k in allowed)
            )
        try:
            sizes[key] = int(value)
        except ValueError:
            raise UsageError(f"option {key}={value!r} in --data simulate:{spec} must be an integer") from None
        if sizes[key] < 1:
            raise UsageError(f"option {key}={value} in --data simulate:{spec} must be positive")
    return name.strip(), sizes


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"--heldout-fraction must lie in [0, 1), got {fraction}")
    if n < 2:
        raise UsageError(f"the data have {n} row{'s' * (n != 1)}; a comparison needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # a positive fraction holds out at least one row (0.2 of 3 rows is one row, not none)
    num_held = max(1, int(round(fraction * n))) if fraction > 0 else 0
    if num_held > 0 and n - num_held < 2:
        raise UsageError(
            f"--heldout-fraction {fraction} of {n} rows holds out {num_held}, leaving fewer than "
            f"2 training rows; use --heldout-fraction 0 (no held-out rows) or more data"
        )
    return order[num_held:], order[:num_held]


def _subset(n: int, keep: int, seed: int) -> torch.Tensor | None:
    if keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep]


def _validate(model, data: dict, where: str, columns: Sequence[str]):
    from deqppl.harness import validated

    try:
        return validated(model, data)
    except (ValueError, TypeError) as err:
        # Rows are 1-based data rows as in load_table, i.e. the line below the CSV header.
        raise UsageError(f"{where}: {_one_based(str(err), columns)}") from None


def _observations(settings: dict, model_name: str):
    """Built-in, simulated or file observations ``y (n, d)`` of a plate model, with labels."""
    from deqppl.data import load_digits, load_table

    data = settings["data"]
    if data == "digits":
        ds = load_digits()
        return ds.y, ds.labels, ds.columns, data, None
    if data.startswith("simulate:"):
        return None, None, None, data, _simulate_spec(data.removeprefix("simulate:"))
    path = Path(data)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise UsageError(f"unknown --data {data!r} for model {model_name!r}; valid: {_data_help(model_name)}")
    try:
        ds = load_table(path, label_column=settings["label_column"])
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise UsageError(str(err)) from None
    return ds.y, ds.labels, ds.columns, str(path), None


def _pca_problem(settings: dict):
    from deqppl.expfam import nonlinearity
    from deqppl.models import ExpFamPCA  # the CLI is the application edge; the library never imports the zoo

    seed, total_count = settings["seed"], settings["total_count"]
    y, labels, columns, where, sim = _observations(settings, "pca")
    if settings["data"] == "digits":
        family_name = settings["family"] or "binomial"
        if family_name == "binomial" and total_count is None:
            total_count = DIGITS_TOTAL_COUNT
        latent_dim = settings["latent_dim"] or DIGITS_LATENT_DIM
    elif sim is not None:
        family_name, sizes = sim
        if settings["family"] not in (None, family_name):
            raise UsageError(
                f"--family {settings['family']!r} contradicts --data {settings['data']!r}; give the family once"
            )
        if family_name == "binomial" and total_count is None:
            total_count = sizes.get("t")
        try:
            truth = ExpFamPCA(
                family=_family(family_name, total_count), obs_dim=sizes["d"], latent_dim=sizes["l"],
                nonlinearity=_lookup(nonlinearity, settings["nonlinearity"]), lam=settings["lam"],
            )
        except (ValueError, TypeError) as err:  # e.g. a family x nonlinearity pair that cannot work
            raise UsageError(f"--data {settings['data']}: {err}") from None
        y = truth.simulate(sizes["n"], seed=seed, dtype=torch.float64).data["y"]
        latent_dim = settings["latent_dim"] or sizes["l"]
        columns = tuple(f"y{j}" for j in range(sizes["d"]))
    else:
        if settings["family"] is None:
            raise UsageError(f"--family is required for a data file ({where}); see `deqppl list`")
        family_name = settings["family"]
        latent_dim = settings["latent_dim"] or 2
    fam = _family(family_name, total_count)
    nl = _lookup(nonlinearity, settings["nonlinearity"])
    try:
        model = ExpFamPCA(
            family=fam, obs_dim=int(y.shape[1]), latent_dim=latent_dim, nonlinearity=nl, lam=settings["lam"]
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    comparison = None
    if settings["data"] == "digits" and settings["model_comparison"]:
        comparison = dict(DIGITS_MODEL_COMPARISON)
    description = f"{fam.describe()} PCA, latent_dim={latent_dim}"
    return model, {"y": y}, labels, columns, where, description, comparison


def _hierarchical_problem(settings: dict):
    from deqppl.expfam import nonlinearity
    from deqppl.models import HierarchicalExpFamPCA

    if settings["family"] not in (None, "gaussian"):
        raise UsageError(
            f"--model hierarchical has Gaussian conditionals; --family {settings['family']!r} "
            "does not apply (valid: gaussian)"
        )
    if settings["latent_dim"] is not None:
        raise UsageError("--latent-dim applies to --model pca; give --widths D1,D2 for hierarchical")
    widths = tuple(settings["widths"] or HIERARCHICAL_WIDTHS)
    y, labels, columns, where, sim = _observations(settings, "hierarchical")
    nl = _lookup(nonlinearity, settings["nonlinearity"])
    precisions = (1.0,) * len(widths) + (float(settings["lam"]),)
    if sim is not None:
        family_name, sizes = sim
        if family_name != "gaussian":
            raise UsageError(f"--model hierarchical simulates Gaussian data: use simulate:gaussian, not {family_name!r}")
        truth = HierarchicalExpFamPCA(widths=(sizes["d"], *widths), precisions=precisions)
        y = truth.simulate(sizes["n"], seed=settings["seed"], dtype=torch.float64).data["y"]
        columns = tuple(f"y{j}" for j in range(sizes["d"]))
    try:
        model = HierarchicalExpFamPCA(
            widths=(int(y.shape[1]), *widths), nonlinearities=(nl,) * len(widths), precisions=precisions
        )
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    description = f"hierarchical Gaussian latents, widths {model.widths}"
    return model, {"y": y}, labels, columns, where, description, None


def _kglm_problem(settings: dict):
    from deqppl.data import load_breast_cancer, load_diabetes, load_xy_table
    from deqppl.kernels import SquaredExponential
    from deqppl.models import KernelGLM

    data = settings["data"]
    if settings["label_column"] is not None:
        raise UsageError("--label-column needs per-row latents; --model kglm has none (use --y-column)")
    if settings["latent_dim"] is not None or settings["widths"] is not None:
        raise UsageError("--latent-dim and --widths do not apply to --model kglm")
    family_name = settings["family"]
    if data in KGLM_FAMILIES:
        ds = (load_diabetes if data == "diabetes" else load_breast_cancer)()
        family_name = family_name or KGLM_FAMILIES[data]
        x, y, columns, where = ds.x, ds.y, ("y",), data
    elif data.startswith("simulate:"):
        family_name, sizes = _simulate_spec(data.removeprefix("simulate:"))
        if family_name == "binomial" and settings["total_count"] is None:
            settings = {**settings, "total_count": sizes.get("t")}
        truth = _kglm(KernelGLM, SquaredExponential, _family(family_name, settings["total_count"]), 1, settings)
        sim = truth.simulate(sizes["n"], seed=settings["seed"], dtype=torch.float64).data
        x, y, columns, where = sim["x"], sim["y"], ("y",), data
    else:
        path = Path(data)
        if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise UsageError(f"unknown --data {data!r} for model 'kglm'; valid: {_data_help('kglm')}")
        if settings["y_column"] is None:
            raise UsageError(f"--model kglm on a data file ({data}) needs --y-column (and optionally --x-columns)")
        if family_name is None:
            raise UsageError(f"--family is required for a data file ({data}); see `deqppl list`")
        x_columns = None if settings["x_columns"] is None else settings["x_columns"].split(",")
        try:
            ds = load_xy_table(path, y_column=settings["y_column"], x_columns=x_columns)
        except (ValueError, FileNotFoundError, ImportError) as err:
            raise UsageError(str(err)) from None
        x, y, columns, where = ds.x, ds.y, (settings["y_column"],), str(path)
    fam = _family(family_name, settings["total_count"])
    p = 1 if x.dim() == 1 else int(x.shape[1])
    model = _kglm(KernelGLM, SquaredExponential, fam, p, settings)
    description = f"{fam.describe()} kernel GLM, {model.kernel!r}, lam={model.lam:g}"
    return model, {"x": x, "y": y}, None, columns, where, description, None


def _kglm(cls, kernel_cls, fam, p: int, settings: dict):
    lengthscale = settings["lengthscale"] or math.sqrt(p)
    try:
        return cls(fam, kernel_cls(lengthscale=lengthscale), lam=settings["lam"])
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def build_problem(settings: dict) -> Problem:
    """Turn the resolved ``settings`` (``run.json``) into a model and a validated data split.

    Data errors (unknown names, missing/non-numeric cells, values outside the family's support)
    raise :class:`UsageError` naming the file, row and column, before anything is fitted. The
    data are validated once, here.
    """
    from deqppl.harness.sites import take_rows

    model_name = _check_model(settings["model"])
    builder = {"pca": _pca_problem, "hierarchical": _hierarchical_problem, "kglm": _kglm_problem}[model_name]
    model, data, labels, columns, where, description, comparison = builder(settings)
    data = _validate(model, data, where, columns)
    seed = settings["seed"]
    n = int(next(iter(data.values())).shape[0])
    keep = None
    if settings["small"]:
        keep = _subset(n, SMALL_ROWS, seed)
    elif settings["data"] == "digits" and not settings["full"]:
        keep = _subset(n, settings["rows"] or DIGITS_DEFAULT_ROWS, seed)
    if keep is not None:
        data = take_rows(data, keep)
        labels = None if labels is None else labels[keep]
        n = int(keep.numel())
    train, held = _split(n, settings["heldout_fraction"], seed)
    in_sample = held.numel() == 0
    if in_sample:
        # --heldout-fraction 0: every row is fitted, and the held-out stage re-infers the
        # training rows' latents under the shared globals (an in-sample amortisation check);
        # compare's own 20 % default must not apply.
        held = train
    return Problem(
        model=model,
        data=take_rows(data, train),
        heldout=take_rows(data, held),
        labels=None if labels is None else labels[train],
        heldout_labels=None if labels is None else labels[held],
        description=f"{where} ({n} rows{', none held out' if in_sample else ''}): {description}",
        encoder=_encoder(model_name),
        model_comparison=None if in_sample else comparison,
        in_sample=in_sample,
    )


def _one_based(message: str, columns: Sequence[str]) -> str:
    """Say a tensor error's 0-based ``row r, column c`` as the file's row and column name."""
    import re

    def repl(match: re.Match) -> str:
        row, col = int(match.group(1)), int(match.group(2))
        name = columns[col] if col < len(columns) else col
        return f"row {row + 1}, column {name!r}"

    return re.sub(r"\(?row (\d+), column (\d+)\)?", repl, message)


# --------------------------------------------------------------------------------------------
# sub-commands
# --------------------------------------------------------------------------------------------
def _cmd_list(args) -> int:
    import deqppl.models as zoo
    from deqppl.expfam import FAMILIES, NONLINEARITIES
    from deqppl.harness import METHODS

    datasets = sorted({d for names in BUILTIN_DATA.values() for d in names})
    sections = {
        "models": [n for n in zoo.__all__ if n != "Simulation"],
        "model names": list(MODELS),
        "families": sorted(FAMILIES),
        "nonlinearities": sorted(NONLINEARITIES),
        "methods": sorted(METHODS),
        "datasets": [*datasets, "simulate:FAMILY[,n=N,d=D,l=L,t=T]", "PATH.csv", "PATH.parquet"],
    }
    for title, names in sections.items():
        print(f"{title}: {', '.join(names)}")
    return 0


def _settings(args) -> dict:
    model = _check_model(args.model)
    return {
        "model": model,
        "data": args.data or DEFAULT_DATA[model],
        "family": args.family,
        "total_count": args.total_count,
        "nonlinearity": args.nonlinearity,
        "latent_dim": args.latent_dim,
        "widths": None if args.widths is None else list(_int_list(args.widths, "--widths")),
        "lengthscale": args.lengthscale,
        "x_columns": args.x_columns,
        "y_column": args.y_column,
        "lam": args.lam,
        "methods": args.methods,
        "seed": args.seed,
        "seeds": list(_seeds(args)),
        "heldout_fraction": args.heldout_fraction,
        "label_column": args.label_column,
        "rows": args.rows,
        "full": args.full,
        "model_comparison": not args.no_model_comparison,
        "small": args.small,
    }


def _model_comparison(problem: Problem, settings: dict, out: Path, *, progress: bool):
    """The digits' model comparison across families and latent sizes (cached in ``out``)."""
    import pandas as pd

    from deqppl.expfam import family
    from deqppl.harness import compare_models
    from deqppl.models import ExpFamPCA

    if problem.model_comparison is None or problem.heldout is None:
        return None
    path = out / "model_comparison.csv"
    if path.exists():
        return pd.read_csv(path)
    y_train = problem.data["y"]
    models = {}
    for name in problem.model_comparison["families"]:
        fam = family(name, total_count=DIGITS_TOTAL_COUNT) if name == "binomial" else family(name)
        for l in problem.model_comparison["latent_dims"]:
            models[f"{fam.describe()} l={l}"] = ExpFamPCA(
                family=fam, obs_dim=int(y_train.shape[1]), latent_dim=l, lam=settings["lam"]
            )
    # Globals by joint L-BFGS (compare_models' default): on the digits it reached the same
    # optimum as the DEQ's profiled fit in a quarter of the time (measured, 1 000 rows).
    # problem.data is validated by the compared model: an equal candidate does not check it again
    mc = compare_models(
        models, problem.data, problem.heldout, num_draws=MODEL_COMPARISON_DRAWS,
        seed=settings["seed"], progress=progress,
    )
    mc.table.to_csv(path, index=False)
    return mc


def _run(settings: dict, problem: Problem, out: Path, *, progress: bool):
    from deqppl.harness import RunStore, compare
    from deqppl.report import write_report

    methods = _methods(settings)
    if progress:
        print(f"deqppl: {problem.description}", file=sys.stderr)
    store = RunStore(out / "runs")
    try:
        comparison = compare(
            problem.model,
            problem.data,
            methods=methods,
            heldout=problem.heldout,
            labels=problem.labels,
            heldout_labels=problem.heldout_labels,
            seeds=tuple(settings["seeds"]),
            store=store,
            progress=progress,
        )
    finally:
        for moved in store.quarantined:
            original = moved.with_name(moved.name.rsplit(".corrupt-", 1)[0])
            print(
                f"deqppl: {original} was damaged or altered; moved it to {moved.name} and redid "
                f"the unit",
                file=sys.stderr,
            )
    for (seed, method, stage), error in comparison.failures.items():
        print(
            f"deqppl: method {method!r} failed in the {stage} stage of seed {seed} ({error}); "
            f"its rows in the table are NaN, the other methods' rows are complete",
            file=sys.stderr,
        )
    comparison.table.to_csv(out / "table.csv", index=False)
    comparison.summary.to_csv(out / "summary.csv")
    mc = _model_comparison(problem, settings, out, progress=progress)
    paths = write_report(
        comparison, out, title=f"deqppl: {problem.description}", model_comparison=mc,
        reference=comparison.reference,
    )
    return comparison, paths


def _cmd_compare(args) -> int:
    if not (args.lam > 0 and math.isfinite(args.lam)):
        raise UsageError(f"--lam must be positive and finite, got {args.lam}")
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.latent_dim is not None and args.latent_dim < 1:
        raise UsageError(f"--latent-dim must be a positive integer, got {args.latent_dim}")
    if args.lengthscale is not None and not (args.lengthscale > 0 and math.isfinite(args.lengthscale)):
        raise UsageError(f"--lengthscale must be positive and finite, got {args.lengthscale}")
    if args.rows is not None and args.rows < 2:
        raise UsageError(f"--rows must be an integer >= 2, got {args.rows}")
    if args.rows is not None and args.full:
        raise UsageError("give --rows N or --full, not both")
    settings = _settings(args)
    _methods(settings)  # names checked before the data
    # The data first (a missing file is named as such, whatever --out holds), then --out:
    # every error surfaces before anything is stored or fitted.
    problem = build_problem(settings)
    out = _prepare_out(Path(args.out), settings)
    comparison, paths = _run(settings, problem, out, progress=not args.no_progress)
    _print_summary(comparison, out, paths)
    return 0


def _prepare_out(out: Path, settings: dict) -> Path:
    """Check ``--out`` (a folder, creatable, holding no other run) and write ``run.json``."""
    from deqppl.harness.store import CorruptFileError, load_settings, quarantine, save_settings

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it is created if missing)")
    previous = out / "run.json"
    if previous.is_file():
        try:
            stored = load_settings(previous)
        except CorruptFileError as err:
            moved = quarantine(previous)
            print(f"deqppl: {err}; moved it to {moved.name} and wrote this run's settings", file=sys.stderr)
        else:
            if stored != settings:
                changed = sorted(k for k in settings if stored.get(k) != settings[k])
                raise UsageError(
                    f"{out} holds a run with different settings ({', '.join(changed)}); "
                    "use another --out or delete that folder"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_settings(previous, settings)
    except OSError as err:
        raise UsageError(f"--out {out} cannot be created or written: {err.strerror or err}") from None
    return out


def _cmd_report(args) -> int:
    from deqppl.harness.store import CorruptFileError, load_settings

    out = Path(args.out)
    path = out / "run.json"
    if not path.is_file():
        raise UsageError(f"{path} not found; run `deqppl compare --out {out}` first")
    try:
        settings = load_settings(path)
    except CorruptFileError as err:
        raise UsageError(
            f"{err}; the report cannot be rebuilt without the run's settings: run the same "
            f"`deqppl compare ... --out {out}` again (it moves the damaged file aside)"
        ) from None
    problem = build_problem(settings)
    comparison, paths = _run(settings, problem, out, progress=not args.no_progress)
    _print_summary(comparison, out, paths)
    return 0


def _print_summary(comparison, out: Path, paths: dict) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(comparison.summary.to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"\nwrote {out / 'table.csv'}, {out / 'summary.csv'}, {paths['html']}, {paths['markdown']}")


# --------------------------------------------------------------------------------------------
# deqppl encode (issue 16: out-of-core amortised encoding)
# --------------------------------------------------------------------------------------------
def _add_encode_parser(sub) -> None:
    from deqppl.io import DEFAULT_CHUNK_ROWS

    enc = sub.add_parser(
        "encode", help="encode a Parquet/CSV table with a fitted model file, chunk by chunk, resumably"
    )
    enc.add_argument("--model", required=True, help="model file written by deqppl.io.save")
    enc.add_argument("--data", required=True, help="PATH.parquet | PATH.csv with the model's observation columns")
    enc.add_argument("--out", required=True, help="the latents' Parquet file (written at the end)")
    enc.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
        help=f"rows per chunk: the memory bound and the unit of resumption (default {DEFAULT_CHUNK_ROWS})",
    )
    enc.add_argument("--no-laplace", action="store_true", help="do not write Laplace standard deviations")
    enc.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    enc.add_argument("--device", default=None, help="where to solve, e.g. cuda (default cpu)")
    enc.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _cmd_encode(args) -> int:
    from deqppl.io import encode

    try:
        result = encode(
            args.model,
            args.data,
            args.out,
            chunk_rows=args.chunk_rows,
            laplace=not args.no_laplace,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            device=args.device,
        )
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"deqppl encode: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ndeqppl encode: interrupted; finished chunks are kept next to {args.out} - run the "
            "same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"encoded {result.num_rows} rows in {result.num_chunks} chunks ({result.num_reused} reused, "
        f"{result.num_redone} redone) in {result.wall_time:.1f} s -> {result.out_path}"
    )
    if not result.converged:
        print(
            f"deqppl encode: warning: {result.num_rows - result.num_converged} rows did not converge "
            f"(column converged = false; largest residual {result.max_residual:.3g})",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# fit: the joint fit of an encoder's globals, one process or data-parallel under torchrun
# --------------------------------------------------------------------------------------------
#: Encoder optimisers of ``deqppl fit --optimizer`` (without it: the encoder's default,
#: :meth:`~deqppl.encoders.AbstractMAPEncoder.default_fit_optimizer`).
FIT_OPTIMIZERS = ("alternating", "lbfgs", "adam")
#: Models ``deqppl fit`` fits (those whose encoder the model file format saves).
FIT_MODELS = ("pca",)
#: ``--dtype`` names.
FIT_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _table_columns_and_rows(path: Path) -> tuple[list[str], int]:
    """The column names and the number of data rows of a Parquet or CSV file (streamed)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        meta = pq.ParquetFile(path)
        return list(meta.schema_arrow.names), int(meta.metadata.num_rows)
    reader = pacsv.open_csv(path)
    rows = sum(batch.num_rows for batch in reader)
    return list(reader.schema.names), rows


def _table_rows(path: Path, start: int, stop: int, columns: list[str], dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[start, stop)`` of a Parquet or CSV file as a ``(stop - start, columns)`` tensor.

    Streams the file by Arrow record batches, keeping only the batches that overlap the rows, so
    a rank holds its block of the rows only. Missing cells become NaN, which the model's
    validation then reports by row and column.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        batches = pq.ParquetFile(path).iter_batches(columns=columns)
    else:
        batches = pacsv.open_csv(path)
    parts, first = [], 0
    for batch in batches:
        last = first + batch.num_rows
        if last > start and first < stop:
            piece = batch.slice(max(start - first, 0), min(stop, last) - max(start, first))
            cols = []
            for name in columns:
                col = piece.column(piece.schema.get_field_index(name))
                if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                    raise UsageError(f"{path}: column {name!r} holds {col.type}, not numbers")
                cols.append(col.to_numpy(zero_copy_only=False).astype(np.float64))
            parts.append(np.stack(cols, axis=1))
        first = last
        if first >= stop:
            break
    return torch.as_tensor(np.concatenate(parts, axis=0), dtype=dtype)


def _fit_data(name: str, dtype: torch.dtype) -> tuple[list[str], int, Callable[[int, int], torch.Tensor]]:
    """Columns, number of rows and a reader of row blocks for ``--data`` (bundled or a file)."""
    from deqppl.data import load_digits

    if name == "digits":
        ds = load_digits(dtype=dtype)
        return list(ds.columns), int(ds.y.shape[0]), lambda a, b: ds.y[a:b]
    path = Path(name)
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise UsageError(f"unknown --data {name!r}; valid: digits, PATH.csv, PATH.parquet")
    if not path.is_file():
        raise UsageError(f"--data {name!r}: no such file")
    try:
        columns, rows = _table_columns_and_rows(path)
    except Exception as err:  # pyarrow's errors for unreadable files
        raise UsageError(f"--data {name!r}: cannot read it as {path.suffix[1:]} ({err})") from None
    if rows == 0:
        raise UsageError(f"--data {name!r} has no data rows")
    return columns, rows, lambda a, b: _table_rows(path, a, b, columns, dtype)


def _fit_settings(args):
    """Names -> objects for ``deqppl fit`` (every rank builds the same ones)."""
    from deqppl.expfam import nonlinearity
    from deqppl.models import ExpFamPCA
    from deqppl.encoders import PEDEncoder
    from deqppl.optim import LBFGS, Adam, AlternatingNewton

    if args.model not in FIT_MODELS:
        raise UsageError(f"deqppl fit supports --model {', '.join(FIT_MODELS)}; got {args.model!r}")
    if args.dtype not in FIT_DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r}; valid: {', '.join(FIT_DTYPES)}")
    if args.optimizer is not None and args.optimizer not in FIT_OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {args.optimizer!r}; valid: {', '.join(FIT_OPTIMIZERS)}")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {args.device!r}; valid: cpu, cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    dtype = FIT_DTYPES[args.dtype]
    total_count = args.total_count
    family_name = args.family
    if args.data == "digits":
        family_name = family_name or "binomial"
        if family_name == "binomial" and total_count is None:
            total_count = DIGITS_TOTAL_COUNT
    elif family_name is None:
        raise UsageError("--family is required for a data file; see `deqppl list`")
    columns, num_rows, read = _fit_data(args.data, dtype)
    fam = _family(family_name, total_count)
    try:
        model = ExpFamPCA(family=fam, obs_dim=len(columns), latent_dim=args.latent_dim,
                          nonlinearity=_lookup(nonlinearity, args.nonlinearity), lam=args.lam)
        if args.optimizer is None:
            # the encoder's own choice, as fit_encoder(optimizer=None) makes it
            optimizer = PEDEncoder(model).default_fit_optimizer()
        elif args.optimizer == "alternating":
            optimizer = AlternatingNewton()
        elif args.optimizer == "lbfgs":
            optimizer = LBFGS()
        else:
            optimizer = Adam(lr=args.lr, num_epochs=args.epochs, batch_size=args.batch_size)
        if args.max_steps is not None:
            if isinstance(optimizer, Adam):
                raise UsageError("--max-steps caps alternating and lbfgs; Adam runs --epochs")
            optimizer = dataclasses.replace(optimizer, max_steps=args.max_steps)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    return model, optimizer, dtype, columns, num_rows, read


def _cmd_fit(args) -> int:
    from deqppl import distributed
    from deqppl.encoders import PEDEncoder, fit_encoder
    from deqppl.io import save

    model, optimizer, dtype, columns, num_rows, read = _fit_settings(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    try:
        parallel = distributed.init_process_group(device=args.device, timeout_s=args.timeout)
    except ValueError as err:
        raise UsageError(str(err)) from None
    rank, size = distributed.rank(), distributed.world_size()
    try:
        if size > num_rows:
            raise UsageError(f"{size} ranks for {num_rows} rows: every rank needs at least one row")
        shard = distributed.Shard.even(num_rows) if parallel else None
        start, stop = (shard.start, shard.stop) if shard is not None else (0, num_rows)
        device = torch.device(args.device, int(__import__("os").environ.get("LOCAL_RANK", 0))) \
            if args.device == "cuda" else torch.device("cpu")
        rows: dict[str, torch.Tensor] = {}

        def load() -> torch.Tensor:
            from deqppl.validation import table_positions

            rows["y"] = read(start, stop).to(device)
            # errors name the file's row (0-based data row) and column
            with table_positions(first_row=start, columns={"y": tuple(columns)}):
                model.validate(rows)
            return torch.zeros(1)

        # a rank that cannot read its rows stops every rank, naming it
        distributed.checked_all_reduce_sum(load, like=torch.zeros(1), where="deqppl fit: reading the rows")
        y = rows["y"]
        encoder = PEDEncoder(model, seed=args.seed).to(dtype=dtype, device=device)
        fit = fit_encoder(encoder, {"y": y}, optimizer=optimizer, seed=args.seed,
                          progress=not args.no_progress and rank == 0, shard=shard)
        metadata = {
            "fitted_by": "deqppl fit", "data": str(args.data), "num_rows": num_rows, "ranks": size,
            "optimizer": repr(optimizer), "seed": args.seed, "status": fit.status.name,
            "loss": float(fit.loss_trace[-1]), "num_steps": fit.num_steps,
        }

        def write() -> torch.Tensor:
            # rank 0 writes (atomically); a failure there fails every rank, so that no rank
            # reports success for a file that was not written
            if rank == 0:
                save(out, encoder, metadata=metadata, columns={"y": tuple(columns)})
            return torch.zeros(1)

        distributed.checked_all_reduce_sum(write, like=torch.zeros(1), where="deqppl fit: writing --out")
    except (ValueError, TypeError) as err:  # bad data (one process) or disagreeing ranks
        raise UsageError(f"{args.data}: {err}") from None
    finally:
        if parallel:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(f"deqppl fit: {fit.status.name} after {fit.num_steps} steps ({fit.criterion}); "
              f"loss {float(fit.loss_trace[-1]):.10g} on {num_rows} rows over {size} rank(s); wrote {out}")
    return 0 if fit.converged else 1


def _add_fit_parser(sub) -> None:
    fit = sub.add_parser(
        "fit", help="fit a DEQ encoder's globals to a table and save it (data-parallel under torchrun)"
    )
    fit.add_argument("--model", default="pca", help=f"{' | '.join(FIT_MODELS)} (default pca)")
    fit.add_argument("--data", required=True, help="digits | PATH.csv | PATH.parquet")
    fit.add_argument("--out", required=True, help="the model file to write (deqppl.io.save)")
    fit.add_argument("--family", default=None, help="observation family (`deqppl list`); required for files")
    fit.add_argument("--total-count", type=int, default=None, help="binomial trials (digits: 16)")
    fit.add_argument("--nonlinearity", default="identity", help="canonical nonlinearity R (default identity)")
    fit.add_argument("--latent-dim", type=int, default=2, help="latent dimension (default 2)")
    fit.add_argument("--lam", type=float, default=1.0, help="latent prior precision (default 1)")
    fit.add_argument("--optimizer", default=None,
                     help="alternating (structured joint Newton, full batch) | lbfgs (profiled, full batch) | "
                          "adam (minibatches); default: the encoder's (alternating for R = identity, else lbfgs)")
    fit.add_argument("--max-steps", type=int, default=None,
                     help="alternating / lbfgs: iteration cap (default: the optimiser's)")
    fit.add_argument("--epochs", type=int, default=200, help="adam: epochs (default 200)")
    fit.add_argument("--batch-size", type=int, default=128, help="adam: global minibatch rows (default 128)")
    fit.add_argument("--lr", type=float, default=0.02, help="adam: learning rate (default 0.02)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the encoder's start and Adam's batches")
    fit.add_argument("--dtype", default="float64", help="float64 (default) | float32")
    fit.add_argument("--device", default="cpu", help="cpu (default; gloo) | cuda (NCCL, GPU LOCAL_RANK per rank)")
    fit.add_argument("--timeout", type=float, default=600.0,
                     help="seconds a rank waits for a silent peer before failing (default 600)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    fit.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deqppl`` command."""
    parser = argparse.ArgumentParser(
        prog="deqppl",
        description="MAP inference in the deqppl zoo: DEQ vs SVI vs L-BFGS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list zoo models, families, nonlinearities, methods and datasets")

    cmp_ = sub.add_parser("compare", help="compare MAP methods on a data set and write a report")
    cmp_.add_argument("--model", default="pca", help=f"{' | '.join(MODELS)} (default pca)")
    cmp_.add_argument(
        "--data", default=None,
        help="digits | diabetes | breast_cancer | simulate:FAMILY[,n=N,d=D,l=L,t=T] | PATH.csv | "
        "PATH.parquet (default: digits; diabetes for kglm)",
    )
    cmp_.add_argument(
        "--family", default=None,
        help="observation family (`deqppl list`); default binomial for digits, required for files",
    )
    cmp_.add_argument("--total-count", type=int, default=None, help="binomial trials (digits: 16)")
    cmp_.add_argument("--nonlinearity", default="identity", help="canonical nonlinearity R (default identity)")
    cmp_.add_argument(
        "--latent-dim", type=int, default=None,
        help=f"pca: latent dimension (default {DIGITS_LATENT_DIM} for digits, l of simulate:, 2 for files)",
    )
    cmp_.add_argument(
        "--widths", default=None,
        help=f"hierarchical: latent widths D1,D2,... (default {','.join(map(str, HIERARCHICAL_WIDTHS))})",
    )
    cmp_.add_argument("--lengthscale", type=float, default=None, help="kglm: kernel lengthscale (default sqrt(p))")
    cmp_.add_argument("--x-columns", default=None, help="kglm, data file: input columns A,B,... (default all but --y-column)")
    cmp_.add_argument("--y-column", default=None, help="kglm, data file: the response column")
    cmp_.add_argument("--lam", type=float, default=1.0, help="latent prior precision (default 1)")
    cmp_.add_argument(
        "--methods", default=None,
        help="comma-separated (default deq,svi,lbfgs)",
    )
    cmp_.add_argument("--seed", type=int, default=0, help="seed of the data split/simulation and fits")
    cmp_.add_argument("--seeds", default=None, help="comma-separated fit seeds (default: --seed)")
    cmp_.add_argument("--heldout-fraction", type=float, default=0.2, help="rows held out (default 0.2; 0: none, the held-out stage then re-infers the training rows)")
    cmp_.add_argument("--label-column", default=None, help="data file column of integer labels")
    cmp_.add_argument(
        "--rows", type=int, default=None,
        help=f"digits: rows of the seeded subset (default {DIGITS_DEFAULT_ROWS})",
    )
    cmp_.add_argument("--full", action="store_true", help="digits: all 1797 rows")
    cmp_.add_argument(
        "--no-model-comparison", action="store_true",
        help="digits: skip the comparison of families and latent sizes in the report",
    )
    cmp_.add_argument("--out", default="deqppl-out", help="output folder (default deqppl-out)")
    cmp_.add_argument("--small", action="store_true", help=f"at most {SMALL_ROWS} rows, fewer steps")
    cmp_.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp_.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: many small tensor operations, see tests/conftest.py)",
    )

    rep = sub.add_parser("report", help="rebuild tables and report from the runs stored in --out")
    rep.add_argument("--out", required=True, help="folder of a previous `deqppl compare`")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    rep.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _add_encode_parser(sub)
    _add_fit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deqppl`` command; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    commands = {
        "list": _cmd_list, "compare": _cmd_compare, "report": _cmd_report, "encode": _cmd_encode,
        "fit": _cmd_fit,
    }
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            print(f"deqppl {args.command}: error: --threads must be a positive integer, got {threads}", file=sys.stderr)
            return 2
        # The comparisons are dominated by many small tensor operations, for which torch's
        # intra-op thread pool only adds synchronisation (measured on a loaded 2-core machine:
        # a small backward pass 45 ms with two threads vs 1.4 ms with one; tests/conftest.py).
        torch.set_num_threads(threads)
    try:
        return commands[args.command](args)
    except UsageError as err:
        print(f"deqppl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RankFailedError as err:  # data-parallel: a rank failed (named in the message)
        print(f"deqppl {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "out", "OUT")
        print(
            f"\ndeqppl: interrupted; finished units are kept in {out}/runs - "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
