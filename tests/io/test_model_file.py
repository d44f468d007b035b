"""Model files (deqppl.io.save / load): round trips of every family and nonlinearity of the
table, and every bad file of issue 16 (not a deqppl file, another version, truncated,
corrupted, another kind)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from deqppl import io
from deqppl.deq import GMRES, Anderson, ImplicitAdjoint, Newton
from deqppl.encoders import AutoDEQ, DeepPEDEncoder, PEDEncoder
from deqppl.expfam import FAMILIES, NONLINEARITIES, compatible_nonlinearities, family, from_activation, nonlinearity
from deqppl.io import ModelFileError
from deqppl.models import ExpFamPCA, HierarchicalExpFamPCA

#: Parameters of the families that take one (a non-default value, so that it must round-trip).
FAMILY_PARAMS = {"gaussian": {"precision": 2.5}, "binomial": {"total_count": 16}}
#: Non-default parameters of the nonlinearities, chosen not to be short decimals (a name
#: printed with %g would lose them).
NONLINEARITY_PARAMS = {
    "smooth_relu": {"tau": 0.123456789},
    "leaky_smooth_relu": {"tau": 0.7, "slope": 0.0123456789},
    "neg_smooth_relu": {"tau": 1.3},
}
CASES = [
    (fam, nl)
    for fam in FAMILIES
    for nl in compatible_nonlinearities(family(fam, **FAMILY_PARAMS.get(fam, {})))
]


def _fitted_ped(fam_name: str, nl_name: str, *, dtype=torch.float64, seed=0) -> tuple[PEDEncoder, torch.Tensor]:
    model = ExpFamPCA(
        family=family(fam_name, **FAMILY_PARAMS.get(fam_name, {})),
        nonlinearity=nonlinearity(nl_name, **NONLINEARITY_PARAMS.get(nl_name, {})),
        obs_dim=6,
        latent_dim=2,
        lam=1.7,
        param_scale=0.5,
    )
    sim = model.simulate(10, seed=seed, dtype=dtype)
    enc = PEDEncoder.from_values(model, sim.truth, throw=False)
    return enc, sim.data["y"]


def test_cases_cover_every_family_and_nonlinearity():
    assert {f for f, _ in CASES} == set(FAMILIES)
    assert {n for _, n in CASES} == set(NONLINEARITIES)


@pytest.mark.parametrize(("fam", "nl"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_ped_round_trip_solves_exactly_alike(tmp_path, fam, nl):
    enc, y = _fitted_ped(fam, nl)
    path = io.save(tmp_path / "m.deqppl", enc)
    back = io.load(path, expect=PEDEncoder)
    assert type(back) is PEDEncoder and back.model == enc.model
    assert back.model.nonlinearity.params == enc.model.nonlinearity.params  # exact, not the %g name
    assert back.W.dtype == torch.float64
    assert torch.equal(back.W, enc.W) and torch.equal(back.B, enc.B)
    a, b = enc.solve(y), back.solve(y)
    assert torch.equal(a.value, b.value) and torch.equal(a.converged, b.converged)
    assert io.load(path, expect=ExpFamPCA).model == enc.model


@pytest.mark.parametrize(
    "adjoint",
    [ImplicitAdjoint(linear_solver=GMRES(restart=7, rtol=1e-9)), ImplicitAdjoint(solver=Newton(max_steps=3))],
    ids=["gmres", "fixed-point-newton"],
)
def test_solver_settings_and_dtype_round_trip(tmp_path, adjoint):
    model = ExpFamPCA(family=family("poisson"), obs_dim=5, latent_dim=3)
    solver = Anderson(rtol=1e-5, memory=4, safeguard=None, max_steps=77)
    enc = PEDEncoder(model, solver=solver, adjoint=adjoint, throw=False, seed=3)  # float32
    back = io.load(io.save(tmp_path / "m.deqppl", enc))
    assert back.solver == solver and back.adjoint == adjoint and back.throw is False
    assert back.W.dtype == torch.float32
    y = model.simulate(7, seed=1).data["y"]
    assert torch.equal(enc.solve(y).value, back.solve(y).value)


def test_deep_ped_round_trip(tmp_path):
    model = HierarchicalExpFamPCA(
        widths=(6, 3, 2),
        nonlinearities=(nonlinearity("smooth_relu", tau=0.3), nonlinearity("identity")),
        precisions=(2.0, 1.5, 0.5),
        param_scale=0.5,
    )
    sim = model.simulate(9, seed=2, dtype=torch.float64)
    enc = DeepPEDEncoder(model, sim.truth)
    back = io.load(io.save(tmp_path / "deep.deqppl", enc, metadata={"fit": "truth"}), expect=DeepPEDEncoder)
    assert back.model == model
    assert all(torch.equal(back.values()[k], v) for k, v in enc.values().items())
    assert torch.equal(back.solve(sim.data["y"]).value, enc.solve(sim.data["y"]).value)
    info = io.read_info(tmp_path / "deep.deqppl")
    assert (info.model_kind, info.encoder_kind, info.metadata) == ("HierarchicalExpFamPCA", "DeepPEDEncoder", {"fit": "truth"})
    assert info.columns == {"y": tuple(f"y_{j}" for j in range(6))}


def test_columns_are_stored_and_checked(tmp_path):
    enc, _ = _fitted_ped("poisson", "identity")
    cols = [f"gene{j}" for j in range(6)]
    assert io.read_info(io.save(tmp_path / "m.deqppl", enc, columns=cols)).columns == {"y": tuple(cols)}
    with pytest.raises(ValueError, match="6 non-empty strings"):
        io.save(tmp_path / "n.deqppl", enc, columns=cols[:5])
    with pytest.raises(ValueError, match="distinct"):
        io.save(tmp_path / "n.deqppl", enc, columns=["a"] * 6)
    assert not (tmp_path / "n.deqppl").exists()


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    enc, _ = _fitted_ped("poisson", "identity")
    io.save(tmp_path / "m.deqppl", enc)
    io.save(tmp_path / "m.deqppl", enc)  # replaced in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.deqppl"]


# ------------------------------------------------------------------ what cannot be saved
def test_autodeq_cannot_be_saved_and_says_why(tmp_path):
    model = ExpFamPCA(family=family("poisson"), obs_dim=4, latent_dim=2)
    enc = AutoDEQ(model, model.simulate(3, seed=0).truth)
    with pytest.raises(TypeError, match="AutoDEQ cannot be saved: .*user Python code.*never pickled code"):
        io.save(tmp_path / "a.deqppl", enc)
    assert not (tmp_path / "a.deqppl").exists()


def test_user_made_nonlinearity_and_unregistered_solver_cannot_be_saved(tmp_path):
    custom = from_activation(torch.sigmoid, torch.nn.functional.softplus, name="mine")
    model = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2, nonlinearity=custom)
    with pytest.raises(TypeError, match="from_activation\\(mine\\) is not a row of deqppl.expfam.NONLINEARITIES"):
        io.save(tmp_path / "a.deqppl", PEDEncoder(model))

    class MySolver(Anderson):
        pass

    ok = ExpFamPCA(family=family("gaussian"), obs_dim=4, latent_dim=2)
    with pytest.raises(TypeError, match="MySolver is not a registered settings class"):
        io.save(tmp_path / "a.deqppl", PEDEncoder(ok, solver=MySolver()))
    with pytest.raises(TypeError, match="JSON"):
        io.save(tmp_path / "a.deqppl", PEDEncoder(ok), metadata={"x": object()})
    with pytest.raises(TypeError, match="save writes an encoder"):
        io.save(tmp_path / "a.deqppl", ok)
    assert not (tmp_path / "a.deqppl").exists()


# ------------------------------------------------------------------ bad files
@pytest.fixture
def saved(tmp_path):
    enc, y = _fitted_ped("poisson", "identity")
    return io.save(tmp_path / "m.deqppl", enc), enc, y


def _header(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _with_metadata(raw: bytes, **changes) -> bytes:
    """The file with metadata fields changed (header re-encoded, same tensor bytes)."""
    n, header = _header(raw)
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.deqppl"):
        io.load(tmp_path / "nope.deqppl")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello", b"y_0,y_1\n1,2\n3,4\n", bytes(range(256)) * 4],
    ids=["empty", "short", "csv", "binary"],
)
def test_not_a_deqppl_file(tmp_path, content):
    path = tmp_path / "x.deqppl"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=f"{path} is not a deqppl model file"):
        io.load(path)


def test_safetensors_file_of_someone_else(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, path, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="metadata has format 'pt', expected 'deqppl-model'.*weight"):
        io.load(path)


def test_another_format_version(saved, tmp_path):
    path, _, _ = saved
    path.write_bytes(_with_metadata(path.read_bytes(), format_version="2", deqppl_version="9.9.9"))
    with pytest.raises(ModelFileError, match="format version 2 \\(written by deqppl 9.9.9\\); this deqppl reads format version 1"):
        io.load(path)


@pytest.mark.parametrize("keep", [4, 30, -1, -17], ids=["in-length", "in-header", "last-byte", "in-tensors"])
def test_truncated(saved, keep):
    path, _, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(ModelFileError, match=f"{path} is (truncated|not a deqppl model file)"):
        io.load(path)
    if keep < 0:  # cut inside the tensor bytes: reported as truncation, saying what is missing
        with pytest.raises(ModelFileError, match="truncated: its header lists \\d+ bytes of tensor data, the file holds"):
            io.load(path)


def test_corrupted_tensor_byte(saved):
    path, _, _ = saved
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # one bit of W or B
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="is corrupted: the checksum"):
        io.load(path)


def test_corrupted_configuration(saved):
    path, _, _ = saved
    raw = path.read_bytes()
    # one character of the JSON configuration, in place: the file stays well-formed and of the
    # same length, so only the checksum can tell
    old, new = b'\\"lam\\": 1.7', b'\\"lam\\": 1.9'
    assert raw.count(old) == 1
    bad = raw.replace(old, new)
    path.write_bytes(bad)
    with pytest.raises(ModelFileError, match="is corrupted"):
        io.load(path)


def test_another_kind_than_expected(saved):
    path, _, _ = saved
    with pytest.raises(ModelFileError, match="holds a PEDEncoder encoder of a ExpFamPCA model; expected the encoder DeepPEDEncoder"):
        io.load(path, expect=DeepPEDEncoder)
    with pytest.raises(ModelFileError, match="expected the model HierarchicalExpFamPCA"):
        io.load(path, expect=HierarchicalExpFamPCA)
    with pytest.raises(TypeError, match="AutoDEQ is not a saveable class"):
        io.load(path, expect=AutoDEQ)


def test_unknown_kind_lists_the_registered_names(saved):
    path, _, _ = saved
    raw = path.read_bytes()
    _, header = _header(raw)
    doc = json.loads(header["__metadata__"]["config"])
    doc["model"]["kind"] = "NoSuchModel"
    config = json.dumps(doc, sort_keys=True)
    tensors = {"W": io.load(path).W.detach(), "B": io.load(path).B.detach()}
    path.write_bytes(_with_metadata(raw, config=config, sha256=io.digest(config, tensors)))
    with pytest.raises(ValueError, match="no saveable class is registered under the name 'NoSuchModel'; registered: .*ExpFamPCA"):
        io.load(path)
