"""The catalogue of bad inputs: one table of cases, one clear error each (issue 12).

In the style of scikit-learn's parameter-validation checks: every case is a row of ``CASES``
(the class of failure, an id, a callable doing the bad thing, the exception type expected and
a regex that the message must match). The regex is written to require what a user needs from
the message: the bad value, where it is (file, row, column, argument) and what is allowed. Every
message must also be one line and must never suggest ``weights_only=False``.

A new class of bad input adds its cases here; ``test_every_class_has_cases`` keeps the table
honest about which classes it covers.
"""

from __future__ import annotations

import io
import math
import re
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from deqppl.expfam import family, gaussian
from deqppl.harness import AbstractMethod, LBFGSMethod, RunStore, StageResult, compare
from deqppl.harness.store import Unit, load_settings
from deqppl.inference import fit_map, load_map, save_map
from deqppl.inference.io import CorruptFileError
from deqppl.kernels import AbstractKernel, Linear, SquaredExponential, check_gram
from deqppl.data import load_table
from deqppl.models import ExpFamPCA
from deqppl.models.kernel_glm import KernelGLM

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(tmp_path)`` must raise ``exc`` with a message matching ``match``."""

    klass: str
    id: str
    call: Callable[[Path], object]
    exc: type[BaseException]
    match: str


CASES: list[Case] = []


def case(klass: str, id: str, exc: type[BaseException], match: str):
    """Decorator adding the decorated ``fn(tmp_path)`` to ``CASES``."""

    def add(fn: Callable[[Path], object]) -> Callable[[Path], object]:
        CASES.append(Case(klass, id, fn, exc, match))
        return fn

    return add


def _write(tmp: Path, name: str, text: str | bytes) -> Path:
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


# ------------------------------------------------------------------------------------ csv
# CSV quirks must not turn into data: each names the file, row and column.
for _id, _text, _kw, _exc, _match in [
    ("duplicated_column", "a,b,a\n1,2,3\n", {}, ValueError,
     r"t\.csv: the header names column 'a' twice \(columns 1 and 3\); column names must be unique"),
    ("duplicated_label_column", "y0,label,label\n1,0,1\n", {"label_column": "label"}, ValueError,
     r"t\.csv: .*column 'label' twice \(columns 2 and 3\)"),
    ("empty_header_name", ",b\n1,2\n", {}, ValueError,
     r"t\.csv: column 1 of the header has an empty name; every column needs a unique, non-empty"),
    ("blank_header_name", "a, ,c\n1,2,3\n", {}, ValueError, r"t\.csv: column 2 of the header has an empty name"),
    ("fractional_label", "a,label\n1,0\n2,1.5\n", {"label_column": "label"}, ValueError,
     r"t\.csv: row 2 \(line 3\), column 'label': label '1\.5' is not a whole number; class labels must be integers"),
    ("huge_label", "a,label\n1,1e300\n", {"label_column": "label"}, ValueError,
     r"row 1 \(line 2\), column 'label': label '1e300' is not a whole number"),
    ("nan_label", "a,label\n1,nan\n", {"label_column": "label"}, ValueError,
     r"row 1 \(line 2\), column 'label': missing value 'nan'; every cell must hold a number"),
    ("extra_field", "a,b\n1,2\n3,4,5\n", {}, ValueError,
     r"t\.csv: data row 2 \(line 3\) has 3 fields but the header has 2 \(a, b\); every row needs one field per column"),
    ("missing_field", "a,b\n1,2\n\n3\n", {}, ValueError,
     r"t\.csv: data row 2 \(line 4\) has 1 fields but the header has 2"),
    ("header_only", "a,b\n", {}, ValueError, r"t\.csv: no data rows below the header; at least one row is needed"),
    ("empty_file", "", {}, ValueError, r"t\.csv: the file is empty; a header row of column names is needed"),
    ("blank_lines_only", "\n\n\n", {}, ValueError, r"t\.csv: the file is empty"),
    ("non_numeric_cell", "a,b\n1,x\n", {}, ValueError, r"t\.csv: row 1 \(line 2\), column 'b': non-numeric value 'x'"),
    ("missing_cell", "a,b\n1,\n", {}, ValueError,
     r"t\.csv: row 1 \(line 2\), column 'b': missing value ''; every cell must hold a number"),
    ("infinite_cell", "a,b\n1,inf\n", {}, ValueError,
     r"row 1 \(line 2\), column 'b': non-finite value 'inf'; only finite numbers are allowed"),
    ("overflowing_cell", "a,b\n1,1e999\n", {}, ValueError, r"column 'b': non-finite value '1e999'"),
    ("label_column_absent", "a,b\n1,2\n", {"label_column": "c"}, ValueError,
     r"t\.csv: label column 'c' not in the header \['a', 'b'\]"),
    ("only_the_label_column", "label\n1\n", {"label_column": "label"}, ValueError, r"t\.csv: no data columns"),
    ("columns_mismatch", "a,b\n1,2\n", {"columns": ["b", "a"]}, ValueError,
     r"t\.csv: header mismatch: expected columns \['b', 'a'\], found \['a', 'b'\]"),
    ("not_utf8", b"a,b\n1,\xff\n", {}, ValueError, r"t\.csv: not UTF-8 text \(byte 6 is 0xff\); save the table as a UTF-8 CSV"),
    ("nul_byte", "a,b\n1,2\x00\n", {}, ValueError, r"t\.csv: row 1 \(line 2\), column 'b': non-numeric value '2\\x00'"),
    ("unterminated_quote", 'a,b\n1,"2\n', {}, ValueError, r"t\.csv: line 2 is not valid CSV \(unexpected end of data\)"),
    ("stray_quote", 'a,b\n1,"2"x\n', {}, ValueError, r"t\.csv: line 2 is not valid CSV \(',' expected after '\"'\)"),
    ("float16_dtype", "a,b\n1,2\n", {"dtype": torch.float16}, TypeError,
     r"load_table dtype must be one of \['torch\.float32', 'torch\.float64'\], got torch\.float16"),
]:
    case("csv", _id, _exc, _match)(
        lambda tmp, text=_text, kw=_kw: load_table(_write(tmp, "t.csv", text), **kw)
    )


@case("csv", "directory_as_path", ValueError, r"data file '.*d\.csv' is a directory; give a \.csv or \.parquet file")
def _(tmp):
    (tmp / "d.csv").mkdir()
    return load_table(tmp / "d.csv")


@case("csv", "missing_file", FileNotFoundError, r"data file '.*nope\.csv' does not exist")
def _(tmp):
    return load_table(tmp / "nope.csv")


@case("csv", "unknown_suffix", ValueError, r"data file '.*t\.txt' has suffix '\.txt'; allowed: \.csv, \.parquet")
def _(tmp):
    return load_table(_write(tmp, "t.txt", "a\n1\n"))


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


if not _has_pyarrow():  # with pyarrow installed, the same file is a damaged Parquet file instead

    @case("csv", "parquet_without_pyarrow", ImportError,
          r"reading the Parquet file '.*t\.parquet' needs pyarrow: pip install pyarrow")
    def _(tmp):
        return load_table(_write(tmp, "t.parquet", b"PAR1"))

else:

    @case("csv", "damaged_parquet", ValueError, r"t\.parquet: not a readable Parquet file")
    def _(tmp):
        return load_table(_write(tmp, "t.parquet", b"PAR1"))


# ----------------------------------------------------------------------------------- dtype
# Half precision is refused with the dtypes allowed, never fitted to a wrong optimum.
_HALF = r"has dtype torch\.(float16|bfloat16); deqppl computes in torch\.float32 or torch\.float64 only"


def _pca():
    return ExpFamPCA(family=family("poisson"), obs_dim=3, latent_dim=1)


for _dt in (torch.float16, torch.bfloat16):
    _name = str(_dt).removeprefix("torch.")
    case("dtype", f"validate_{_name}", TypeError, "^y " + _HALF)(
        lambda tmp, dt=_dt: _pca().validate({"y": torch.ones(4, 3, dtype=dt)})
    )
    case("dtype", f"fit_map_{_name}", TypeError, "^y " + _HALF)(
        lambda tmp, dt=_dt: fit_map(_pca(), {"y": torch.ones(4, 3, dtype=dt)}, progress=False)
    )
    case("dtype", f"compare_{_name}", TypeError, "^y " + _HALF)(
        lambda tmp, dt=_dt: compare(_pca(), {"y": torch.ones(6, 3, dtype=dt)}, methods=[LBFGSMethod()], progress=False)
    )
    case("dtype", f"kernel_inputs_{_name}", TypeError, "^x1 " + _HALF)(
        lambda tmp, dt=_dt: SquaredExponential()(torch.zeros(3, dtype=dt))
    )
    case("dtype", f"kernel_glm_{_name}", TypeError, "^x " + _HALF)(
        lambda tmp, dt=_dt: KernelGLM(gaussian(), SquaredExponential()).validate(
            {"x": torch.zeros(3, dtype=dt), "y": torch.zeros(3)}
        )
    )


@case("dtype", "integer_data_under_half_default", TypeError, "^y " + _HALF)
def _(tmp):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        return _pca().validate({"y": torch.ones(4, 3, dtype=torch.int64)})
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------- kernel
@dataclass(frozen=True)
class Skewed(AbstractKernel):
    """A user's kernel that is not symmetric: k(x, x') != k(x', x)."""

    def _matrix(self, x1, x2):
        return torch.exp(-(x1 - x2.T).clamp_min(0)) if x1.shape[1] == 1 else None


@dataclass(frozen=True)
class Indefinite(AbstractKernel):
    """Symmetric but not positive semi-definite: k(x, x') = 1 - (x - x')^2."""

    def _matrix(self, x1, x2):
        return 1.0 - (x1 - x2.T) ** 2


@dataclass(frozen=True)
class WrongShape(AbstractKernel):
    def _matrix(self, x1, x2):
        return torch.zeros(x1.shape[0])


_X = torch.linspace(-1.0, 1.0, 5, dtype=F64)

for _id, _fn, _match in [
    ("asymmetric_gram", lambda: Skewed()(_X),
     r"the matrix K\(x, x\) of kernel Skewed\(\) is not symmetric: K\[\d, \d\] = .* but K\[\d, \d\] = .* "
     r"\(difference .* > round-off tolerance .*\); a kernel must satisfy k\(x, x'\) = k\(x', x\)"),
    ("asymmetric_into_kernel_glm", lambda: KernelGLM(gaussian(), Skewed()).cholesky(_X),
     r"kernel Skewed\(\) is not symmetric"),
    ("asymmetric_into_deq_weights", lambda: KernelGLM(gaussian(), Skewed()).deq_weights(_X),
     r"kernel Skewed\(\) is not symmetric"),
    ("asymmetric_in_a_sum", lambda: (Skewed() + SquaredExponential())(_X),
     r"kernel Sum\(.*Skewed\(\).*\) is not symmetric"),
    ("indefinite_gram", lambda: Indefinite()(_X),
     r"kernel Indefinite\(\) is not positive semi-definite: its smallest eigenvalue is -\d.* < -.* "
     r"\(round-off tolerance\); a kernel must give positive semi-definite matrices \(Mercer's condition\)"),
    ("indefinite_into_kernel_glm", lambda: KernelGLM(gaussian(), Indefinite()).deq_weights(_X),
     r"Indefinite\(\) is not positive semi-definite"),
    ("overflowing_matrix", lambda: Linear(variance=1e300)(torch.tensor([1e10, 2e10], dtype=F64)),
     r"kernel Linear\(variance=1e\+300, offset=0\.0\) gives the non-finite value inf at row 0, column 0 of "
     r"its matrix \(4 non-finite entries\): its hyperparameters or inputs overflow torch\.float64"),
    ("wrong_shape_returned", lambda: WrongShape()(_X, _X[:2]),
     r"kernel WrongShape\(\) returned shape \(5,\), dtype torch\.float\d+ for inputs of 5 and 2 rows; "
     r"a kernel must return a floating tensor of shape \(n1, n2\) = \(5, 2\)"),
    ("non_tensor_returned", lambda: Skewed()(torch.zeros(3, 2)),
     r"kernel Skewed\(\) returned NoneType for inputs of 3 and 3 rows"),
    ("check_gram_not_square", lambda: check_gram(torch.zeros(2, 3)),
     r"K must be a square matrix \(n, n\), got shape \(2, 3\)"),
    ("check_gram_nan", lambda: check_gram(torch.tensor([[1.0, math.nan], [math.nan, 1.0]])),
     r"K contains a non-finite value nan at row 0, column 1"),
    ("lengthscale_nan", lambda: SquaredExponential(lengthscale=math.nan),
     r"SquaredExponential lengthscale must be positive and finite, got nan"),
    ("variance_bool", lambda: SquaredExponential(variance=True),
     r"SquaredExponential variance must be a number, got bool"),
    ("offset_negative", lambda: Linear(offset=-1.0), r"Linear offset must be non-negative and finite, got -1\.0"),
]:
    case("kernel", _id, ValueError if "bool" not in _id else TypeError, _match)(lambda tmp, fn=_fn: fn())


# ------------------------------------------------------------------------------ stored unit
def _stored_unit(tmp: Path) -> tuple[RunStore, Unit, Path]:
    store = RunStore(tmp / "runs")
    unit = Unit(model="m", method="lbfgs", seed=0, stage="fit")
    result = StageResult(values={"z": torch.zeros(2, 1)}, log_joint=-1.0, wall_time=0.1,
                         num_steps=3, num_grad_evals=4, status="converged", converged=True)
    store.save(unit, result, fingerprint="abc")
    return store, unit, store.record_path(unit)


def _altered(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    payload["result"]["log_joint"] = -2.9e71
    torch.save(payload, path)


class _Executes:
    def __reduce__(self):
        return (print, ("never runs",))


def _code(path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"obj": _Executes()}, buf, pickle_module=pickle)
    path.write_bytes(buf.getvalue())


_NOT_DEQPPL = r"'.*{name}' is not a readable deqppl file: "
for _id, _damage, _reason in [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:100]), r"it cannot be read as a torch file .*truncated, garbage or not a deqppl file"),
    ("emptied", lambda p: p.write_bytes(b""), r"the file is empty"),
    ("garbage", lambda p: p.write_bytes(b"\x80\x04garbage" * 10), r"it cannot be read as a torch file"),
    ("altered", _altered, r"its content does not match its checksum \(altered or damaged after writing\)"),
    ("foreign", lambda p: torch.save({"weight": torch.ones(2)}, p), r"it is not a unit record of format 'deqppl\.harness\.StageResult/2' \(found None\)"),
    ("executable_pickle", _code, r"it cannot be read as a torch file of tensors, numbers and strings"),
]:

    def _load_damaged(tmp, damage=_damage):
        store, unit, path = _stored_unit(tmp)
        damage(path)
        return store.load(unit)

    case("stored_unit", _id, CorruptFileError, _NOT_DEQPPL.format(name=r"fit\.pt") + _reason)(_load_damaged)


for _id, _text, _reason in [
    ("emptied", "", r"the file is empty"),
    ("garbage", "\x00\x01garbage", r"it is not JSON \(.*\)"),
    ("truncated", '{"data": "digits", "se', r"it is not JSON"),
    ("not_an_object", "[1, 2]", r"it holds a JSON list, not an object of settings"),
]:
    case("run_settings", _id, CorruptFileError, _NOT_DEQPPL.format(name=r"run\.json") + _reason)(
        lambda tmp, text=_text: load_settings(_write(tmp, "run.json", text))
    )


# -------------------------------------------------------------------------------- map file
def _saved_map(tmp: Path) -> Path:
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=3, latent_dim=1)
    fit = fit_map(model, model.simulate(6, seed=0, dtype=F64).data, progress=False)
    save_map(fit, tmp / "fit.pt")
    return tmp / "fit.pt"


def _retype(field: str, value: object) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        payload[field] = value
        torch.save(payload, path)

    return damage


def _drop(path: Path, field: str) -> None:
    payload = torch.load(path, weights_only=True)
    del payload[field]
    torch.save(payload, path)


for _id, _damage, _reason in [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:200]), r"it cannot be read as a torch file"),
    ("emptied", lambda p: p.write_bytes(b""), r"the file is empty"),
    ("garbage", lambda p: p.write_bytes(b"garbage" * 30), r"it cannot be read as a torch file"),
    ("executable_pickle", _code, r"it cannot be read as a torch file"),
    ("foreign", lambda p: torch.save({"weight": torch.ones(2)}, p), r"it is not a MAPResult written by save_map \(format None"),
    ("log_joint_a_string", _retype("log_joint", "-3.5"),
     r"field 'log_joint' of this MAPResult file is a str \('-3\.5'\), not a scalar floating tensor"),
    ("values_of_strings", _retype("values", {"z": "0.1"}), r"field 'values' .* is a dict .*, not a dict of site name -> tensor"),
    ("num_steps_a_float", _retype("num_steps", 3.0), r"field 'num_steps' .* is a float \(3\.0\), not a non-negative int"),
    ("unknown_status", _retype("status", "done"), r"field 'status' .* is a str \('done'\), not one of \['converged'"),
    ("missing_field", lambda p: _drop(p, "loss_trace"),
     r"this MAPResult file lacks the field 'loss_trace'"),
]:

    def _load_bad_map(tmp, damage=_damage):
        path = _saved_map(tmp)
        damage(path)
        return load_map(path)

    case("map_file", _id, CorruptFileError, _NOT_DEQPPL.format(name=r"fit\.pt") + _reason)(_load_bad_map)


@case("map_file", "save_not_a_result", TypeError, r"save_map needs a MAPResult \(from fit_map\), got dict")
def _(tmp):
    return save_map({"values": {}}, tmp / "x.pt")


@case("map_file", "missing_file", FileNotFoundError, r"nope\.pt")
def _(tmp):
    return load_map(tmp / "nope.pt")


# ---------------------------------------------------------------------------- model params
# Hyperparameters are checked when the object is built: type (no strings, no bools) and range.
from deqppl.expfam import binomial, leaky_smooth_relu, smooth_relu  # noqa: E402
from deqppl.models import HierarchicalExpFamPCA  # noqa: E402

_POIS = family("poisson")
for _id, _fn, _exc, _match in [
    ("lam_string", lambda: ExpFamPCA(family=_POIS, obs_dim=3, latent_dim=1, lam="1"), TypeError,
     r"^lam \(latent prior precision\) must be a real number, got str '1'$"),
    ("lam_nan", lambda: ExpFamPCA(family=_POIS, obs_dim=3, latent_dim=1, lam=math.nan), ValueError,
     r"^lam \(latent prior precision\) must be positive and finite, got nan$"),
    ("lam_bool", lambda: ExpFamPCA(family=_POIS, obs_dim=3, latent_dim=1, lam=True), TypeError,
     r"must be a real number, got bool True"),
    ("obs_dim_fractional", lambda: ExpFamPCA(family=_POIS, obs_dim=2.5, latent_dim=1), TypeError,
     r"^obs_dim must be an integer, got float 2\.5$"),
    ("latent_dim_zero", lambda: ExpFamPCA(family=_POIS, obs_dim=3, latent_dim=0), ValueError,
     r"^latent_dim must be an integer >= 1, got 0$"),
    ("param_scale_inf", lambda: ExpFamPCA(family=_POIS, obs_dim=3, latent_dim=1, param_scale=math.inf), ValueError,
     r"^param_scale must be positive and finite, got inf$"),
    ("total_count_nan", lambda: binomial(math.nan), ValueError, r"^binomial total_count must be a positive integer, got nan$"),
    ("total_count_bool", lambda: binomial(True), TypeError, r"^binomial total_count must be a positive integer, got bool True$"),
    ("total_count_string", lambda: family("binomial", total_count="16"), TypeError,
     r"family 'binomial': binomial total_count must be a positive integer, got str '16'"),
    ("total_count_fractional", lambda: binomial(2.5), ValueError, r"^binomial total_count must be a positive integer, got 2\.5$"),
    ("gaussian_precision_string", lambda: gaussian("1"), TypeError, r"^gaussian precision must be a real number, got str '1'$"),
    ("tau_nan", lambda: smooth_relu(math.nan), ValueError, r"smooth ReLU temperature tau must be"),
    ("slope_out_of_range", lambda: leaky_smooth_relu(slope=2.0), ValueError,
     r"^leaky smooth ReLU slope must be a finite number >= 0 and <= 1, got 2\.0$"),
    ("exponential_with_identity", lambda: ExpFamPCA(family=family("exponential"), obs_dim=3, latent_dim=1), ValueError,
     r"nonlinearity identity takes values in \(-inf, inf\), which leaves the natural-parameter domain \(-inf, 0\) of exponential\(\); pair exponential\(\) with a nonlinearity whose range lies in \(-inf, 0\)"),
    ("kernel_glm_lam_string", lambda: KernelGLM(gaussian(), SquaredExponential(), lam="1"), TypeError,
     r"^lam must be a real number, got str '1'$"),
    ("kernel_glm_jitter_negative", lambda: KernelGLM(gaussian(), SquaredExponential(), jitter=-1e-3), ValueError,
     r"^jitter must be non-negative and finite, got -0\.001$"),
    ("hierarchical_precision_string", lambda: HierarchicalExpFamPCA(widths=(3, 2), precisions=("1", 1.0)), ValueError,
     r"precisions must be 2 positive finite numbers"),
]:
    case("model_params", _id, _exc, _match)(lambda tmp, fn=_fn: fn())


# -------------------------------------------------------------------------- encoder params
from deqppl.encoders import DeepPEDEncoder, PEDEncoder  # noqa: E402

for _id, _fn, _exc, _match in [
    ("ped_W_nan", lambda: PEDEncoder(_pca(), W=torch.full((3, 1), math.nan)), ValueError,
     r"^W contains a non-finite value nan at row 0, column 0 \(3 non-finite entries in all\); only finite numbers are allowed$"),
    ("ped_B_inf", lambda: PEDEncoder(_pca(), B=torch.tensor([0.0, math.inf, 0.0])), ValueError,
     r"^B contains a non-finite value inf at position 1"),
    ("ped_W_wrong_shape", lambda: PEDEncoder(_pca(), W=torch.zeros(2, 1)), ValueError, r"^W must have shape \(3, 1\), got \(2, 1\)$"),
    ("ped_W_string", lambda: PEDEncoder(_pca(), W="a"), TypeError, r"^W must have a real or integer dtype|^W must be numeric"),
    ("ped_W_half", lambda: PEDEncoder(_pca(), W=torch.zeros(3, 1, dtype=torch.float16)), TypeError, "^W " + _HALF),
    ("ped_solve_nan_y", lambda: PEDEncoder(_pca()).solve(torch.full((2, 3), math.nan)), ValueError,
     r"^y contains a non-finite value nan at row 0, column 0"),
    ("deep_values_nan", lambda: DeepPEDEncoder(
        HierarchicalExpFamPCA(widths=(3, 2)), {"W1": torch.full((3, 2), math.nan), "b1": torch.zeros(3)}),
     ValueError, r"^W1 contains a non-finite value nan at row 0, column 0"),
]:
    case("encoder_params", _id, _exc, _match)(lambda tmp, fn=_fn: fn())


# ---------------------------------------------------------------------------------- naming
# Messages name arguments by their public names: the model's data names, the caller's keywords.
_KGLM = KernelGLM(gaussian(), SquaredExponential())
for _id, _fn, _match in [
    ("kglm_log_joint_names_x", lambda: _KGLM.log_joint({"x": torch.tensor([0.0, math.nan]), "y": torch.zeros(2)}, {"u": torch.zeros(2)}),
     r"^x contains a non-finite value nan at position 1"),
    ("kglm_log_joint_checks_shapes", lambda: _KGLM.log_joint({"x": torch.zeros(3), "y": torch.zeros(2)}, {"u": torch.zeros(3)}),
     r"^y must have shape \(3,\) to match x, got \(2,\)$"),
    ("kglm_program_names_x", lambda: _KGLM(torch.tensor([0.0, math.nan])), r"^x contains a non-finite value nan"),
    ("kglm_predict_names_x_new", lambda: _KGLM.predict(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.tensor([math.nan])),
     r"^x_new contains a non-finite value nan"),
    ("compare_names_heldout", lambda: compare(_pca(), {"y": _y()}, heldout={"y": -torch.ones(2, 3, dtype=F64)}, methods=["lbfgs"], progress=False),
     r"^heldout: y has value -1\.0 at row 0, column 0, outside the allowed values"),
]:
    case("naming", _id, ValueError, _match)(lambda tmp, fn=_fn: fn())


# ----------------------------------------------------------------------- stopping settings
# A stopping rule that cannot be met honestly (an infinite tolerance) is a settings error.
from deqppl.deq import Anderson, Broyden, FixedPointIteration, Newton  # noqa: E402

for _id, _fn, _match in [
    ("anderson_rtol_inf", lambda: Anderson(rtol=math.inf),
     r"^Anderson rtol must be a finite number in \[0, 1\) \(rtol >= 1 accepts z = 0 for any f\), got inf$"),
    ("newton_rtol_nan", lambda: Newton(rtol=math.nan), r"^Newton rtol must be a finite number in \[0, 1\) .*got nan$"),
    ("fixed_point_atol_1e300", lambda: FixedPointIteration(atol=1e300),
     r"^FixedPointIteration atol must be a finite number in \[0, 1e\+100\] \(a larger atol accepts any finite residual\), got 1e\+300$"),
    ("broyden_atol_negative", lambda: Broyden(atol=-1.0), r"^Broyden atol must be a finite number in \[0, 1e\+100\].*got -1\.0$"),
    ("anderson_max_steps_zero", lambda: Anderson(max_steps=0), r"max_steps must be an integer >= 1, got 0"),
]:
    case("stopping_settings", _id, ValueError, _match)(lambda tmp, fn=_fn: fn())


# ---------------------------------------------------------------------------- fit_map data
from deqppl.optim import LBFGS, SVI  # noqa: E402


def _y(n=10):
    return _pca().simulate(n, seed=0, dtype=F64).data["y"]


for _id, _fn, _exc, _match in [
    ("empty_y", lambda: fit_map(_pca(), {"y": torch.zeros(0, 3, dtype=F64)}, progress=False), ValueError,
     r"^data\['y'\] has no rows \(shape \(0, 3\)\); fit_map needs at least one row of data$"),
    ("subsample_too_large", lambda: fit_map(_pca(), {"y": _y()}, optimizer=SVI(subsample_size=100, max_steps=2), progress=False),
     ValueError, r"^SVI\(subsample_size=100\) exceeds the 10 rows of the data; use subsample_size <= 10, or None"),
    ("subsample_zero", lambda: SVI(subsample_size=0), ValueError, r"SVI\.subsample_size = 0 is not allowed; subsample_size must be an integer >= 1"),
    ("subsample_negative", lambda: SVI(subsample_size=-3), ValueError, r"SVI\.subsample_size = -3 is not allowed"),
    ("seed_fractional", lambda: fit_map(_pca(), {"y": _y()}, seed=1.5, progress=False), TypeError, r"seed must be an integer, got 1\.5"),
    ("seed_string", lambda: fit_map(_pca(), {"y": _y()}, seed="1", progress=False), TypeError, r"seed must be an integer, got '1'"),
    ("simulate_seed_fractional", lambda: _pca().simulate(5, seed=1.5), TypeError, r"^seed must be an integer, got float 1\.5$"),
    ("compare_seed_fractional", lambda: compare(_pca(), {"y": _y()}, seeds=(0, 1.5), methods=["lbfgs"], progress=False),
     TypeError, r"^seeds\[1\] must be an integer, got float 1\.5$"),
    ("y_wrong_width", lambda: fit_map(_pca(), {"y": torch.zeros(4, 2, dtype=F64)}, progress=False), ValueError,
     r"y must have shape \(\*, 3\), got \(4, 2\)"),
    ("y_out_of_support", lambda: fit_map(_pca(), {"y": torch.tensor([[0.0, 1.0, -2.0]], dtype=F64)}, progress=False),
     ValueError, r"y has value -2\.0 at row 0, column 2, outside the allowed values \(poisson\(\) needs non-negative integer counts"),
    # 2**53 + 2 is a float64 integer, but its neighbours 2**53 + 1 and 2**53 + 3 round onto it:
    # the count is no longer the one observed.
    ("y_count_not_exact", lambda: fit_map(_pca(), {"y": torch.tensor([[0.0, 2.0**53 + 2, 1.0]], dtype=F64)}, progress=False),
     ValueError, r"y has value 9007199254740994\.0 at row 0, column 1, outside the allowed values .*<= 2\*\*53 in float64"),
]:
    case("fit_map_data", _id, _exc, _match)(lambda tmp, fn=_fn: fn())


for _id, _fn, _match in [
    ("lbfgs_gtol_inf", lambda: LBFGS(gtol=math.inf), r"^LBFGS\.gtol = inf is not allowed; gtol must be a finite number in \[0, inf\) or None$"),
    ("lbfgs_rtol_nan", lambda: LBFGS(rtol=math.nan), r"^LBFGS\.rtol = nan is not allowed"),
    ("svi_lr_nan", lambda: SVI(lr=math.nan), r"^SVI\.lr = nan is not allowed; lr must be a finite number in \(0, inf\)$"),
    ("svi_gtol_inf", lambda: SVI(gtol=math.inf), r"^SVI\.gtol = inf is not allowed"),
]:
    case("stopping_settings", _id, ValueError, _match)(lambda tmp, fn=_fn: fn())


# -------------------------------------------------------------------------- silent results
# Bad numbers that are valid input must not come back as a converged fit or a lost one.
@dataclass(frozen=True)
class StatusCase:
    id: str
    call: Callable[[], object]
    check: Callable[[object], bool]
    says: str


def _with_value(value: float, optimizer=None):
    # Gaussian observations: any finite real is valid input (Poisson counts above 2**53 are
    # refused up front, see "y_count_not_exact"), yet y**2 / 2 overflows at 1e200.
    model = ExpFamPCA(family=family("gaussian"), obs_dim=3, latent_dim=1)
    y = model.simulate(10, seed=0, dtype=F64).data["y"].clone()
    y[3, 1] = value
    return fit_map(model, {"y": y}, optimizer=optimizer, progress=False)


STATUS_CASES = [
    StatusCase("value_1e300_not_converged", lambda: _with_value(1e300), lambda r: not r.converged,
               "a loss that overflowed is not convergence"),
    StatusCase("value_1e200_not_converged", lambda: _with_value(1e200), lambda r: not r.converged,
               "a loss that overflowed is not convergence"),
    # a few steps suffice to show the fit comes back (its line searches at 1e100 are slow)
    StatusCase("value_1e100_returns_its_fit", lambda: _with_value(1e100, LBFGS(max_steps=3)),
               lambda r: r.values["z"].shape == (10, 1) and not r.converged,
               "the fit comes back (a status, never a crash after fitting)"),
]


@pytest.mark.parametrize("c", STATUS_CASES, ids=[c.id for c in STATUS_CASES])
def test_bad_numbers_are_never_a_silent_success(c: StatusCase):
    result = c.call()
    assert c.check(result), f"{c.says}: got {result!r}"


# ------------------------------------------------------------------------------- the tests
CLASSES = {
    "csv", "dtype", "kernel", "stored_unit", "run_settings", "map_file", "model_params", "encoder_params",
    "naming", "stopping_settings", "fit_map_data",
}


@pytest.mark.parametrize("c", CASES, ids=[f"{c.klass}-{c.id}" for c in CASES])
def test_bad_input_gives_one_clear_error(c: Case, tmp_path):
    with pytest.raises(c.exc) as info:
        c.call(tmp_path)
    message = str(info.value)
    assert type(info.value) is c.exc or issubclass(type(info.value), c.exc)
    assert re.search(c.match, message), f"{message!r} does not match {c.match!r}"
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert "weights_only" not in message


def test_every_class_has_cases():
    found = {c.klass for c in CASES}
    assert found == CLASSES, f"classes without cases: {CLASSES - found}; unlisted: {found - CLASSES}"
    ids = [(c.klass, c.id) for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"


# ------------------------------------------------------------------------------------ cli
@dataclass(frozen=True)
class CLICase:
    """``deqppl ARGV`` (built from tmp_path) must exit 2 with one stderr line matching ``match``."""

    id: str
    argv: Callable[[Path], list[str]]
    match: str


CLI_CASES: list[CLICase] = []


def cli_case(id: str, match: str, *, files: dict[str, str | bytes] | None = None, args: list[str]):
    """Add a CLI case; ``files`` are written into tmp_path and ``{tmp}`` in ``args`` replaced."""

    def argv(tmp: Path) -> list[str]:
        for name, text in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith("/"):
                (tmp / name).mkdir()
            else:
                _write(tmp, name, text)
        argv = [a.replace("{tmp}", str(tmp)) for a in args]
        return argv if "--out" in argv else [*argv, "--out", str(tmp / "out")]

    CLI_CASES.append(CLICase(id, argv, match))


_SIM = ["--data", "simulate:poisson,n=30,d=4,l=1"]
for _id, _files, _args, _match in [
    ("duplicated_column", {"t.csv": "a,a\n1,2\n3,4\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"t\.csv: the header names column 'a' twice"),
    ("empty_header_name", {"t.csv": ",b\n1,2\n3,4\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"t\.csv: column 1 of the header has an empty name"),
    ("fractional_label", {"t.csv": "a,b,label\n1,2,0\n3,4,0.5\n"},
     ["--data", "{tmp}/t.csv", "--family", "poisson", "--label-column", "label"],
     r"t\.csv: row 2 \(line 3\), column 'label': label '0\.5' is not a whole number"),
    ("extra_field", {"t.csv": "a,b\n1,2\n3,4,5\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"t\.csv: data row 2 \(line 3\) has 3 fields but the header has 2"),
    ("header_only", {"t.csv": "a,b\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"t\.csv: no data rows below the header"),
    ("directory_as_data", {"d.csv/": ""}, ["--data", "{tmp}/d.csv", "--family", "poisson"],
     r"data file '.*d\.csv' is a directory"),
    ("non_utf8", {"t.csv": b"a,b\n1,\xff\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"t\.csv: not UTF-8 text"),
    ("unknown_family", {}, ["--data", "simulate:poison"], r"'poison'.*poisson"),
    ("unknown_method", {}, [*_SIM, "--methods", "deq,newton"], r"'newton'.*lbfgs"),
    ("empty_methods", {}, [*_SIM, "--methods", ","], r"--methods is empty"),
    ("fractional_seeds", {}, [*_SIM, "--seeds", "1.5"], r"--seeds must be comma-separated integers, got '1\.5'"),
    ("heldout_fraction_one", {}, [*_SIM, "--heldout-fraction", "1"], r"--heldout-fraction must lie in \[0, 1\), got 1\.0"),
    ("heldout_fraction_nan", {}, [*_SIM, "--heldout-fraction", "nan"], r"--heldout-fraction must lie in \[0, 1\), got nan"),
    ("simulate_zero_rows", {}, ["--data", "simulate:poisson,n=0"], r"n=0 .* must be positive"),
    ("binomial_zero_trials", {}, ["--data", "simulate:binomial,n=30", "--total-count", "0"],
     r"binomial total_count must be a positive integer, got 0"),
]:
    cli_case(_id, _match, files=_files, args=_args)

for _id, _files, _args, _match in [
    ("one_row_csv", {"t.csv": "a,b\n1,2\n"}, ["--data", "{tmp}/t.csv", "--family", "poisson"],
     r"the data have 1 row; a comparison needs at least 2"),
    ("one_simulated_row", {}, ["--data", "simulate:poisson,n=1"], r"the data have 1 row; a comparison needs at least 2"),
    ("heldout_leaves_one_training_row", {}, ["--data", "simulate:poisson,n=3", "--heldout-fraction", "0.5"],
     r"--heldout-fraction 0\.5 of 3 rows holds out 2, leaving fewer than 2 training rows"),
    ("simulate_exponential", {}, ["--data", "simulate:exponential"],
     r"--data simulate:exponential: nonlinearity identity .* exponential\(\); pair exponential\(\) with .*neg_smooth_relu"),
    ("lam_nan", {}, [*_SIM, "--lam", "nan"], r"--lam must be positive and finite, got nan"),
    ("lam_inf", {}, [*_SIM, "--lam", "inf"], r"--lam must be positive and finite, got inf"),
    ("lam_zero", {}, [*_SIM, "--lam", "0"], r"--lam must be positive and finite, got 0\.0"),
    ("negative_seed", {}, [*_SIM, "--seed", "-1"], r"--seed must be a non-negative integer, got -1"),
    ("out_is_a_file", {"afile": "keep me"}, [*_SIM, "--out", "{tmp}/afile"],
     r"--out .*afile is a file; give a folder"),
    ("out_cannot_be_created", {"afile": "keep me"}, [*_SIM, "--out", "{tmp}/afile/sub"],
     r"--out .*afile/sub cannot be created or written: Not a directory"),
    ("missing_data_before_out", {"o/run.json": '{"data": "another run"}'},
     ["--data", "{tmp}/nope.csv", "--family", "poisson", "--out", "{tmp}/o"],
     r"data file '.*nope\.csv' does not exist"),
    ("data_directory_before_out", {"o/run.json": '{"data": "another run"}', "d.csv/": ""},
     ["--data", "{tmp}/d.csv", "--family", "poisson", "--out", "{tmp}/o"], r"d\.csv' is a directory"),
]:
    cli_case(_id, _match, files=_files, args=_args)

if not _has_pyarrow():
    cli_case("parquet_without_pyarrow", r"needs pyarrow: pip install pyarrow",
             files={"t.parquet": b"PAR1"}, args=["--data", "{tmp}/t.parquet", "--family", "poisson"])


@pytest.mark.parametrize("c", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_command_line_exits_2_with_one_line_and_fits_nothing(c: CLICase, tmp_path, capsys, monkeypatch):
    import deqppl.harness
    from deqppl.cli import main

    def no_fitting(*args, **kwargs):
        raise AssertionError("a bad command line reached the comparison")

    monkeypatch.setattr(deqppl.harness, "compare", no_fitting)
    argv = c.argv(tmp_path)
    out = Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["compare", *argv, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deqppl compare: error: "), err
    assert re.search(c.match, lines[0]), f"{lines[0]!r} does not match {c.match!r}"
    assert "Traceback" not in err
    # nothing fitted (compare refused above), nothing stored: the folder is as it was
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (out / "runs").exists()


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]"], ids=["emptied", "garbage", "not_an_object"])
def test_report_with_a_damaged_run_json_exits_2_naming_it(tmp_path, capsys, text):
    from deqppl.cli import main

    (tmp_path / "run.json").write_text(text)
    code = main(["report", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(r"run\.json' is not a readable deqppl file: .*run the same `deqppl compare", err[0])


# ------------------------------------------------------------------ cli: what must still work
_TINY = ["--data", "simulate:poisson,n=30,d=4,l=1", "--methods", "lbfgs", "--no-progress"]


def _spy_compare(monkeypatch):
    """Record the arguments each ``compare`` call of the command line receives."""
    import deqppl.harness

    calls = []
    real = deqppl.harness.compare

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(deqppl.harness, "compare", spy)
    return calls


@pytest.mark.slow  # a few seconds: whole command-line runs / several comparisons
def test_heldout_fraction_zero_is_honoured(tmp_path, capsys, monkeypatch):
    from deqppl.cli import main
    from deqppl.harness.store import load_settings

    calls = _spy_compare(monkeypatch)
    assert main(["compare", *_TINY, "--heldout-fraction", "0", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    ((_, data), kwargs), = calls
    # every row is fitted and the held-out stage re-infers those same rows: no 20 % default
    assert data["y"].shape[0] == 30
    assert torch.equal(kwargs["heldout"]["y"], data["y"])
    assert load_settings(tmp_path / "o" / "run.json")["heldout_fraction"] == 0.0


def test_a_damaged_run_json_is_moved_aside_and_the_run_proceeds(tmp_path, capsys):
    from deqppl.cli import main
    from deqppl.harness.store import load_settings

    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"data": "simulate:poi')  # truncated
    assert main(["compare", *_TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"run\.json' is not a readable deqppl file: it is not JSON .*moved it to run\.json\.corrupt-1", err)
    assert (out / "run.json.corrupt-1").read_text() == '{"data": "simulate:poi'
    assert load_settings(out / "run.json")["data"] == "simulate:poisson,n=30,d=4,l=1"


@pytest.mark.slow  # a few seconds: whole command-line runs / several comparisons
def test_cli_redoes_a_damaged_unit_and_reports_it(tmp_path, capsys):
    import pandas as pd

    from deqppl.cli import main

    plain, damaged = tmp_path / "plain", tmp_path / "damaged"
    assert main(["compare", *_TINY, "--out", str(plain)]) == 0
    assert main(["compare", *_TINY, "--out", str(damaged)]) == 0
    capsys.readouterr()
    (unit,) = [p for p in (damaged / "runs").rglob("fit.pt")]
    unit.write_bytes(unit.read_bytes()[:64])  # truncated
    assert main(["compare", *_TINY, "--out", str(damaged)]) == 0
    err = capsys.readouterr().err
    assert f"{unit} was damaged or altered; moved it to fit.pt.corrupt-1 and redid the unit" in err
    timing = {"wall_time", "time_ratio_vs_deq"}
    a, b = (pd.read_csv(d / "table.csv") for d in (plain, damaged))
    a, b = (t[~t.metric.isin(timing)].reset_index(drop=True) for t in (a, b))
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------- a failing method loses nothing
@dataclass(frozen=True, kw_only=True)
class Failing(AbstractMethod):
    """L-BFGS, except that the chosen stage raises (as a DEQ whose first solve diverges)."""

    name: str = "failing"
    stage: str = "fit"

    def fit_globals(self, model, data, *, seed, progress):
        if self.stage in ("fit", "both"):
            raise FloatingPointError("the first forward solve diverged")
        return LBFGSMethod().fit_globals(model, data, seed=seed, progress=progress)

    def infer_locals(self, model, data, globals, *, seed, progress):
        if self.stage in ("heldout", "both"):
            raise RuntimeError("no fixed point")
        return LBFGSMethod().infer_locals(model, data, globals, seed=seed, progress=progress)


@pytest.mark.slow  # a few seconds: whole command-line runs / several comparisons
@pytest.mark.parametrize("stage", ["fit", "heldout", "both"])
def test_a_failing_method_records_its_failure_and_the_others_rows_appear(stage):
    model = _pca()
    sim = model.simulate(30, seed=0, dtype=F64)
    labels = (sim.truth["z"][:, 0] > 0).long()
    methods = [Failing(stage=stage), LBFGSMethod()]
    result = compare(model, sim.data, labels=labels, methods=methods, progress=False)
    alone = compare(model, sim.data, labels=labels, methods=[LBFGSMethod()], progress=False)
    expected = {
        "fit": {(0, "failing", "fit"): "FloatingPointError: the first forward solve diverged"},
        "heldout": {(0, "failing", "heldout"): "RuntimeError: no fixed point"},
    }
    want = {**expected["fit"], **expected["heldout"]} if stage == "both" else expected[stage]
    assert result.failures == want
    t = result.table.set_index(["method", "stage", "metric"])["value"]
    for failed_stage in {"fit", "heldout"} if stage == "both" else {stage}:
        assert t["failing", failed_stage, "converged"] == 0.0
        assert math.isnan(t["failing", failed_stage, "log_joint"])
    # the working method's rows are exactly those of a run without the failing one
    timing = {"wall_time", "time_ratio_vs_deq", "log_joint_gap", "amortization_gap"}
    mine = result.table[(result.table.method == "lbfgs") & ~result.table.metric.isin(timing)]
    ref = alone.table[(alone.table.method == "lbfgs") & ~alone.table.metric.isin(timing)]
    pd.testing.assert_frame_equal(mine.reset_index(drop=True), ref.reset_index(drop=True))


def test_every_method_failing_is_one_clear_error():
    with pytest.raises(RuntimeError, match=r"every method failed in the 'fit' stage of seed 0 \(failing: FloatingPointError"):
        compare(_pca(), {"y": _y(20)}, methods=[Failing()], progress=False)


@pytest.mark.parametrize(
    "option, value",
    [("--seed", "1.5"), ("--total-count", "nan"), ("--latent-dim", "2.5"), ("--lam", "one")],
)
def test_unparsable_numbers_exit_2_naming_the_option(option, value, tmp_path, capsys):
    # argparse's own refusal: exit status 2, usage plus one error line naming option and value
    from deqppl.cli import main

    with pytest.raises(SystemExit) as info:
        main(["compare", "--data", "simulate:poisson,n=30", option, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert re.search(rf"error: argument {option}: invalid (int|float) value: '{value}'", err[-1])
    assert not (tmp_path / "o").exists()
