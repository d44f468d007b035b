r"""Why UMAP wins no dataset of Figure 7 here: the PED and PCA backbones frozen, as UMAP's is.

In the paper's Figure 7 the UMAP backbone won 16 Poisson and 11 rectified-Gaussian datasets of
100; in ``experiments/fig7.py`` it has won none. Two differences between the backbones could
explain it, and this script separates them on the columns where the paper's UMAP won:

* UMAP's features are *frozen* -- it is not differentiable, so only the head is trained on
  them -- while the PED and PCA backbones are fine-tuned end to end with the head;
* UMAP's embedding may be a worse function of the latents $z$ than PED's or PCA's, whatever
  is trained on it.

Each dataset's PED backbone (fitted exactly as in Figure 7) and PCA projection are frozen here,
their features standardised per column as UMAP's are, and the same head is trained on them
alone with the same settings and seed (``run_ped_frozen``, ``run_pca_frozen`` in ``fig7.py``).
The fine-tuned and UMAP rows are read from the Figure 7 row store, not recomputed. If frozen
PED and PCA fall to UMAP's level, fine-tuning is what UMAP lacks; if they stay ahead, UMAP's
embedding is.

Run (resumable, the same row store as Figure 7's, two processes may share ``--out``):
``python experiments/fig7_frozen.py --num-datasets 8 --columns poisson,relu
[--shard K/M] [--docs docs/fig7.md]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- BEGIN fig7 frozen (experiments/fig7_frozen.py) -->", "<!-- END fig7 frozen -->"
DIAGNOSTICS = ("ped_frozen", "pca_frozen")


def _fig7():
    spec = importlib.util.spec_from_file_location("fig7", ROOT / "fig7.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fig7"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def comparison_markdown(fig7, main_rows: list[dict], frozen_rows: list[dict]) -> str:
    """Per column: median test MSE of each backbone, and who beats UMAP, on the datasets that
    have every row (fine-tuned PED and PCA, their frozen copies, UMAP)."""
    by = {(r["column"], r["dataset"], r["method"]): r["test_mse"] for r in [*main_rows, *frozen_rows]}
    methods = ("ped", "ped_frozen", "pca", "pca_frozen", "umap")
    lines = [
        "| column | datasets | median test MSE: PED fine-tuned / PED frozen / PCA fine-tuned / PCA frozen / UMAP "
        "| frozen PED beats UMAP | frozen PCA beats UMAP | fine-tuned PED beats frozen PED |",
        "|---|---|---|---|---|---|",
    ]
    for column in fig7.COLUMNS:
        datasets = sorted({d for (c, d, m) in by if c == column and m in DIAGNOSTICS})
        datasets = [d for d in datasets if all((column, d, m) in by for m in methods)]
        if not datasets:
            continue
        mse = {m: [by[(column, d, m)] for d in datasets] for m in methods}
        med = " / ".join(f"{statistics.median(mse[m]):.4g}" for m in methods)

        def beats(a, b):
            return f"{sum(x < y for x, y in zip(mse[a], mse[b]))} of {len(datasets)}"

        lines.append(f"| {fig7.COLUMNS[column].label} | {len(datasets)} | {med} | {beats('ped_frozen', 'umap')} "
                     f"| {beats('pca_frozen', 'umap')} | {beats('ped', 'ped_frozen')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fig7_frozen")
    parser.add_argument("--figure7", type=Path, default=ROOT / "results" / "fig7",
                        help="the Figure 7 row store (fine-tuned and UMAP rows)")
    parser.add_argument("--num-datasets", type=int, default=8)
    parser.add_argument("--columns", default="poisson,relu")
    parser.add_argument("--shard", default="0/1", metavar="K/M")
    parser.add_argument("--docs", type=Path, default=None, help="update this markdown file's section")
    parser.add_argument("--summarise", action="store_true", help="only compare the stored rows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    fig7 = _fig7()
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    bad = sorted(set(columns) - set(fig7.COLUMNS))
    if bad:
        parser.error(f"unknown columns {bad}; valid: {', '.join(fig7.COLUMNS)}")
    try:
        k, m = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < m:
            raise ValueError
    except ValueError:
        parser.error(f"--shard must be K/M with integers 0 <= K < M, got {args.shard!r}")
    if not args.summarise:
        fig7.run(args.out, fig7.Protocol(), num_datasets=args.num_datasets, columns=columns,
                 methods=DIAGNOSTICS, show_progress=not args.no_progress, shard=(k, m))
    text = comparison_markdown(fig7, fig7.RowStore(args.figure7).load(), fig7.RowStore(args.out).load())
    sys.stdout.write(text)
    if args.docs is not None:
        doc = args.docs.read_text()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{args.docs} has no section {BEGIN} ... {END} to update")
        head, rest = doc.split(BEGIN, 1)
        args.docs.write_text(f"{head}{BEGIN}\n\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
