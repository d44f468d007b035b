"""The built wheel installs the zoo as ``deqppl.models`` and ships the bundled data."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_zoo_and_imports_from_it(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("deqppl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "deqppl/models/__init__.py",
        "deqppl/models/expfam_pca.py",
        "deqppl/expfam.py",
        "deqppl/deq/__init__.py",
        "deqppl/data/digits.npz",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith("models/") for n in names), "zoo must install as deqppl.models"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import deqppl, deqppl.models as m; from deqppl.models import ExpFamPCA; "
        "from deqppl.data import load_digits; "
        "print(deqppl.__file__); print(m.__file__); print(load_digits().y.shape[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout.split()
    # Imported from the unpacked wheel, not from the source tree (editable install).
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)), out
    assert out[2] == "1797"
