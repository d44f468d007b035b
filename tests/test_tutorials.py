"""Execute every tutorial notebook (small sizes) and fail if one is not covered.

The kernel is this interpreter (``sys.executable``) through a private kernelspec, so the
notebooks import the same deqppl as the tests, also from a fresh virtual environment whose
``python3`` kernelspec might point elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
#: Every notebook the suite must execute; a notebook added to tutorials/ must be listed here.
EXPECTED = [
    "01_expfam_pca_svi_vs_deq.ipynb",
    "02_amortised_encoders_and_finetuning.ipynb",
    "03_hierarchical_latents.ipynb",
    "04_model_comparison_report.ipynb",
    "05_deqs_with_guarantees.ipynb",
    "06_what_a_random_deq_computes.ipynb",
    "07_your_own_model_amortised.ipynb",
    "08_kernel_glms_are_deqs.ipynb",
    "09_a_million_rows.ipynb",
]
FOUND = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
#: Seconds per cell: the slowest small-mode cell takes well under a minute on an idle core;
#: the margin covers a loaded 2-core machine.
CELL_TIMEOUT = 900
#: A private kernelspec name: a ``python3`` spec installed elsewhere (pointing at whatever
#: ``python`` is first on PATH) would otherwise shadow ours.
KERNEL = "deqppl-tests-python3"


def test_every_notebook_is_covered():
    assert FOUND == EXPECTED


def test_notebooks_are_generated_without_outputs():
    check = subprocess.run(
        [sys.executable, str(TUTORIALS / "build.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    for name in FOUND:
        nb = nbformat.read(TUTORIALS / name, as_version=4)
        assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
        assert "SMALL" in nb.cells[1].source  # sizes are picked in the first code cell


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec running this interpreter with small sizes, found first on JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "deqppl tests",
                "language": "python",
                "env": {"DEQPPL_TUTORIAL_SMALL": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
            }
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]))
        assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
        yield KERNEL


@pytest.mark.slow
# jupyter_client leaves its zmq sockets to the garbage collector, which may close them during a
# later test; the resulting ResourceWarning says nothing about the notebook.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", FOUND)
def test_notebook_runs(name, kernel, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError if a cell (e.g. a final assertion) fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
