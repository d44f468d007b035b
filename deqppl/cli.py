"""The ``deqppl`` command line: the one place where names become objects.

::

    deqppl list
    deqppl compare [--data digits|simulate:FAMILY[,n=N,d=D,l=L]|PATH.csv|PATH.parquet]
                   [--family NAME] [--total-count T] [--nonlinearity NAME] [--latent-dim L]
                   [--lam X] [--methods deq,svi,lbfgs] [--seed S] [--seeds S1,S2]
                   [--heldout-fraction F] [--label-column COL] [--out DIR] [--small]
                   [--no-progress]
    deqppl report --out DIR

``compare`` fits exponential-family PCA to the data by every method (:func:`deqppl.harness.compare`)
and writes into ``--out``: ``table.csv`` (tidy, one row per model x method x seed x stage x
metric), ``summary.csv`` (one row per method), ``report.html`` / ``report.md`` with figures, and
``run.json`` (the resolved settings). Each finished unit of work is stored at once under
``OUT/runs``, so an interrupted run resumes where it stopped when the same command is run
again; ``deqppl report --out DIR`` rebuilds the tables and report from those stored units.

Unknown names (family, nonlinearity, method, data) and bad data files are reported as one line on
stderr naming the bad value and the valid ones, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["main"]

#: The built-in digits are Binomial(16) pixel counts (8x8 images, values 0..16).
DIGITS_TOTAL_COUNT = 16
#: Default latent dimension for the digits: five dimensions already separate the ten classes
#: well enough for the downstream accuracy check, and keep a full comparison to minutes.
DIGITS_LATENT_DIM = 5
#: Defaults of ``simulate:FAMILY`` (rows, observed and latent dimension).
SIMULATE_DEFAULTS = {"n": 200, "d": 10, "l": 2}
#: ``--small``: at most this many rows, and fewer optimiser steps per method (a smoke run).
SMALL_ROWS = 240
SMALL_SETTINGS = {"deq": {"num_epochs": 20}, "svi": {"max_steps": 1000}, "lbfgs": {"max_steps": 100}}
DATA_HELP = "digits | simulate:FAMILY[,n=N,d=D,l=L,t=T] | PATH.csv | PATH.parquet"


class UsageError(Exception):
    """A bad name, value or data file given on the command line (exit status 2)."""


@dataclass(frozen=True)
class Problem:
    """What ``compare`` runs on: the model, the train/held-out split and optional labels."""

    model: object
    y: torch.Tensor
    heldout: torch.Tensor | None
    labels: torch.Tensor | None
    heldout_labels: torch.Tensor | None
    description: str


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


def _methods(text: str, small: bool) -> list:
    from deqppl.harness import method

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--methods is empty; give a comma-separated list, e.g. deq,svi,lbfgs")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods lists a method twice: {text!r}")
    out = []
    for name in names:
        m = _lookup(method, name)
        if small:
            fields = {f.name for f in dataclasses.fields(m)}
            m = dataclasses.replace(
                m, **{k: v for k, v in SMALL_SETTINGS.get(name, {}).items() if k in fields}
            )
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
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_held = int(round(fraction * n))
    if num_held > 0 and n - num_held < 2:
        raise UsageError(f"--heldout-fraction {fraction} leaves fewer than 2 training rows of {n}")
    return order[num_held:], order[:num_held]


def build_problem(settings: dict) -> Problem:
    """Turn the resolved ``settings`` (``run.json``) into a model and a data split.

    Data errors (unknown names, missing/non-numeric cells, values outside the family's support)
    raise :class:`UsageError` naming the file, row and column, before anything is fitted.
    """
    from deqppl.data import load_digits, load_table
    from deqppl.expfam import nonlinearity

    from deqppl.models import ExpFamPCA  # the CLI is the application edge; the library never imports the zoo

    data, seed, small = settings["data"], settings["seed"], settings["small"]
    total_count = settings["total_count"]
    labels = None
    where = data
    if data == "digits":
        ds = load_digits()
        y, labels = ds.y, ds.labels
        family_name = settings["family"] or "binomial"
        if family_name == "binomial" and total_count is None:
            total_count = DIGITS_TOTAL_COUNT
        latent_dim = settings["latent_dim"] or DIGITS_LATENT_DIM
        columns = ds.columns
    elif data.startswith("simulate:"):
        family_name, sizes = _simulate_spec(data.removeprefix("simulate:"))
        if settings["family"] not in (None, family_name):
            raise UsageError(
                f"--family {settings['family']!r} contradicts --data {data!r}; give the family once"
            )
        if family_name == "binomial" and total_count is None:
            total_count = sizes.get("t")
        truth = ExpFamPCA(
            family=_family(family_name, total_count),
            obs_dim=sizes["d"],
            latent_dim=sizes["l"],
            lam=settings["lam"],
        )
        y = truth.simulate(sizes["n"], seed=seed, dtype=torch.float64).data["y"]
        latent_dim = settings["latent_dim"] or sizes["l"]
        columns = tuple(f"y{j}" for j in range(sizes["d"]))
    else:
        path = Path(data)
        if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
            raise UsageError(f"unknown --data {data!r}; valid: {DATA_HELP}")
        try:
            ds = load_table(path, label_column=settings["label_column"])
        except (ValueError, FileNotFoundError, ImportError) as err:
            raise UsageError(str(err)) from None
        y, labels, columns = ds.y, ds.labels, ds.columns
        if settings["family"] is None:
            raise UsageError(f"--family is required for a data file ({data}); see `deqppl list`")
        family_name = settings["family"]
        latent_dim = settings["latent_dim"] or 2
        where = str(path)
    fam = _family(family_name, total_count)
    nl = _lookup(nonlinearity, settings["nonlinearity"])
    try:
        model = ExpFamPCA(
            family=fam, obs_dim=int(y.shape[1]), latent_dim=latent_dim, nonlinearity=nl,
            lam=settings["lam"],
        )
        y = model.validate({"y": y})["y"]
    except ValueError as err:
        # Rows are 1-based data rows as in load_table, i.e. the line below the CSV header.
        raise UsageError(f"{where}: {_one_based(str(err), columns)}") from None
    if small and y.shape[0] > SMALL_ROWS:
        keep = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))[:SMALL_ROWS]
        y = y[keep]
        labels = None if labels is None else labels[keep]
    train, held = _split(int(y.shape[0]), settings["heldout_fraction"], seed)
    return Problem(
        model=model,
        y=y[train],
        heldout=y[held] if held.numel() else None,
        labels=None if labels is None else labels[train],
        heldout_labels=None if labels is None or not held.numel() else labels[held],
        description=f"{where}: {tuple(y.shape)} {fam.describe()}, latent_dim={latent_dim}",
    )


def _one_based(message: str, columns: Sequence[str]) -> str:
    """Say a tensor error's 0-based ``row r, column c`` as the file's row and column name."""
    import re

    def repl(match: re.Match) -> str:
        row, col = int(match.group(1)), int(match.group(2))
        return f"row {row + 1}, column {columns[col]!r}"

    return re.sub(r"\(?row (\d+), column (\d+)\)?", repl, message)


# --------------------------------------------------------------------------------------------
# sub-commands
# --------------------------------------------------------------------------------------------
def _cmd_list(args) -> int:
    import deqppl.models as zoo
    from deqppl.expfam import FAMILIES, NONLINEARITIES
    from deqppl.harness import METHODS

    sections = {
        "models": [n for n in zoo.__all__ if n != "Simulation"],
        "families": sorted(FAMILIES),
        "nonlinearities": sorted(NONLINEARITIES),
        "methods": sorted(METHODS),
        "datasets": ["digits", "simulate:FAMILY[,n=N,d=D,l=L,t=T]", "PATH.csv", "PATH.parquet"],
    }
    for title, names in sections.items():
        print(f"{title}: {', '.join(names)}")
    return 0


def _settings(args) -> dict:
    return {
        "data": args.data,
        "family": args.family,
        "total_count": args.total_count,
        "nonlinearity": args.nonlinearity,
        "latent_dim": args.latent_dim,
        "lam": args.lam,
        "methods": args.methods,
        "seed": args.seed,
        "seeds": list(_seeds(args)),
        "heldout_fraction": args.heldout_fraction,
        "label_column": args.label_column,
        "small": args.small,
    }


def _run(settings: dict, out: Path, *, progress: bool, store_only: bool = False):
    from deqppl.harness import RunStore, compare
    from deqppl.report import write_report

    methods = _methods(settings["methods"], settings["small"])  # names checked before the data
    problem = build_problem(settings)
    if progress:
        print(f"deqppl: {problem.description}", file=sys.stderr)
    comparison = compare(
        problem.model,
        problem.y,
        methods=methods,
        heldout=problem.heldout,
        labels=problem.labels,
        heldout_labels=problem.heldout_labels,
        seeds=tuple(settings["seeds"]),
        store=RunStore(out / "runs"),
        progress=progress,
    )
    comparison.table.to_csv(out / "table.csv", index=False)
    comparison.summary.to_csv(out / "summary.csv")
    paths = write_report(comparison, out, title=f"deqppl: {problem.description}")
    return comparison, paths


def _cmd_compare(args) -> int:
    if args.lam <= 0:
        raise UsageError(f"--lam must be positive, got {args.lam}")
    if args.latent_dim is not None and args.latent_dim < 1:
        raise UsageError(f"--latent-dim must be a positive integer, got {args.latent_dim}")
    settings = _settings(args)
    out = Path(args.out)
    previous = out / "run.json"
    if previous.exists():
        stored = json.loads(previous.read_text())
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise UsageError(
                f"{out} holds a run with different settings ({', '.join(changed)}); "
                "use another --out or delete that folder"
            )
    build_problem(settings)  # data errors surface here, before anything is stored or fitted
    _methods(settings["methods"], settings["small"])
    out.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(settings, indent=2) + "\n")
    comparison, paths = _run(settings, out, progress=not args.no_progress)
    _print_summary(comparison, out, paths)
    return 0


def _cmd_report(args) -> int:
    out = Path(args.out)
    path = out / "run.json"
    if not path.exists():
        raise UsageError(f"{path} not found; run `deqppl compare --out {out}` first")
    settings = json.loads(path.read_text())
    comparison, paths = _run(settings, out, progress=not args.no_progress)
    _print_summary(comparison, out, paths)
    return 0


def _print_summary(comparison, out: Path, paths: dict) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(comparison.summary.to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"\nwrote {out / 'table.csv'}, {out / 'summary.csv'}, {paths['html']}, {paths['markdown']}")


# --------------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deqppl`` command."""
    parser = argparse.ArgumentParser(
        prog="deqppl",
        description="MAP inference in exponential-family latent-variable models: DEQ vs SVI vs L-BFGS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list zoo models, families, nonlinearities, methods and datasets")

    cmp_ = sub.add_parser("compare", help="compare MAP methods on a data set and write a report")
    cmp_.add_argument("--data", default="digits", help=f"{DATA_HELP} (default: digits)")
    cmp_.add_argument(
        "--family", default=None,
        help="observation family (`deqppl list`); default binomial for digits, required for files",
    )
    cmp_.add_argument("--total-count", type=int, default=None, help="binomial trials (digits: 16)")
    cmp_.add_argument("--nonlinearity", default="identity", help="canonical nonlinearity R (default identity)")
    cmp_.add_argument(
        "--latent-dim", type=int, default=None,
        help=f"latent dimension (default {DIGITS_LATENT_DIM} for digits, l of simulate:, 2 for files)",
    )
    cmp_.add_argument("--lam", type=float, default=1.0, help="latent prior precision (default 1)")
    cmp_.add_argument("--methods", default="deq,svi,lbfgs", help="comma-separated (default deq,svi,lbfgs)")
    cmp_.add_argument("--seed", type=int, default=0, help="seed of the data split/simulation and fits")
    cmp_.add_argument("--seeds", default=None, help="comma-separated fit seeds (default: --seed)")
    cmp_.add_argument("--heldout-fraction", type=float, default=0.2, help="rows held out (default 0.2)")
    cmp_.add_argument("--label-column", default=None, help="data file column of integer labels")
    cmp_.add_argument("--out", default="deqppl-out", help="output folder (default deqppl-out)")
    cmp_.add_argument("--small", action="store_true", help=f"at most {SMALL_ROWS} rows, fewer steps")
    cmp_.add_argument("--no-progress", action="store_true", help="no progress bars")

    rep = sub.add_parser("report", help="rebuild tables and report from the runs stored in --out")
    rep.add_argument("--out", required=True, help="folder of a previous `deqppl compare`")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``deqppl`` command; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    commands = {"list": _cmd_list, "compare": _cmd_compare, "report": _cmd_report}
    try:
        return commands[args.command](args)
    except UsageError as err:
        print(f"deqppl {args.command}: error: {err}", file=sys.stderr)
        return 2
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
