"""Make the README figure: the default digits comparison's key figure.

Runs DEQ vs SVI vs L-BFGS on the built-in digits as Binomial(16) exponential-family PCA with
five latent dimensions (the ``deqppl compare`` defaults) on a random subset of rows, so that it
finishes in a few minutes on a laptop core, and saves the report's headline figure (convergence
traces, held-out latents against the reference, wall times with ratios to the DEQ; below, the
DEQ's latent space coloured by digit and held-out digits reconstructed by each method's MAP)
to ``docs/figures/digits_report.png``. The full report and tables go to ``--out``; finished
units are stored there, so an interrupted run resumes.

    python scripts/make_readme_figure.py [--rows 600] [--out digits-readme] [--no-progress]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deqppl.data import load_digits
from deqppl.expfam import binomial
from deqppl.harness import DEQMethod, LBFGSMethod, RunStore, SVIMethod, compare
from deqppl.models import ExpFamPCA
from deqppl.report import figure_png, key_figure, write_report

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "digits_report.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600, help="digits used (default 600 of 1797)")
    parser.add_argument("--out", default="digits-readme", help="folder for the report and runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    digits = load_digits()
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[: args.rows]
    num_held = len(order) // 5  # the CLI's default held-out fraction, 0.2
    train, held = order[num_held:], order[:num_held]
    model = ExpFamPCA(family=binomial(16), obs_dim=64, latent_dim=5)
    out = Path(args.out)
    comparison = compare(
        model,
        {"y": digits.y[train]},
        methods=[DEQMethod(), SVIMethod(), LBFGSMethod()],
        heldout={"y": digits.y[held]},
        labels=digits.labels[train],
        heldout_labels=digits.labels[held],
        store=RunStore(out / "runs"),
        progress=not args.no_progress,
    )
    paths = write_report(comparison, out, title=f"deqppl: {args.rows} digits, Binomial(16) PCA, l=5")
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    FIGURE.write_bytes(figure_png(key_figure(comparison), dpi=100))
    print(comparison.summary.to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"wrote {FIGURE} and {paths['html']}")


if __name__ == "__main__":
    main()
