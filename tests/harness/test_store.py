"""The run store under damage: every corrupt record is named, moved aside and redone.

Each case damages one stored unit in one way, re-runs the same comparison on the same store and
checks that (a) only the damaged unit ran again, (b) the damaged file was moved aside, and (c)
the resumed table and latents equal those of an uninterrupted run without a store.
"""

import io
import pickle
import shutil
from dataclasses import dataclass, field

import pandas as pd
import pytest
import torch

from deqppl.expfam import family
from deqppl.harness import AbstractMethod, LBFGSMethod, RunStore, compare
from deqppl.harness.store import (
    CorruptFileError,
    Unit,
    content_checksum,
    load_settings,
    save_settings,
)
from deqppl.models import ExpFamPCA
from deqppl.optim import LBFGS

F64 = torch.float64
_TIMING = {"wall_time", "time_ratio_vs_deq"}


@dataclass(frozen=True, kw_only=True)
class Counting(AbstractMethod):
    """Wraps a method and counts the calls of each stage and seed."""

    name: str
    inner: AbstractMethod
    calls: dict = field(default_factory=dict, repr=False, compare=False)

    def fit_globals(self, model, y, *, seed, progress):
        self.calls[("fit", seed)] = self.calls.get(("fit", seed), 0) + 1
        return self.inner.fit_globals(model, y, seed=seed, progress=progress)

    def infer_locals(self, model, y, globals, *, seed, progress):
        self.calls[("heldout", seed)] = self.calls.get(("heldout", seed), 0) + 1
        return self.inner.infer_locals(model, y, globals, seed=seed, progress=progress)


def _methods():
    return [Counting(name="a", inner=LBFGSMethod()), Counting(name="b", inner=LBFGSMethod(optimizer=LBFGS(max_steps=5)))]


def _untimed(table):
    return table[~table.metric.isin(_TIMING)].reset_index(drop=True)


@pytest.fixture(scope="module")
def problem():
    model = ExpFamPCA(family=family("bernoulli"), obs_dim=6, latent_dim=1)
    y = model.simulate(40, seed=2, dtype=F64).data
    return model, y


@pytest.fixture(scope="module")
def plain(problem):
    model, y = problem
    return compare(model, y, methods=_methods(), seeds=(0,), progress=False)


@pytest.fixture(scope="module")
def stored(problem, tmp_path_factory):
    model, y = problem
    root = tmp_path_factory.mktemp("stored") / "run"
    compare(model, y, methods=_methods(), seeds=(0,), store=RunStore(root), progress=False)
    return root


# ---------------------------------------------------------------------------- the damages
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(b"\x00\xffnot a torch file at all" * 20)


def _altered(path):
    # What a hand edit looks like: the value changed, fingerprint and checksum left as found.
    payload = torch.load(path, weights_only=True)
    payload["result"]["log_joint"] = -2.9e71
    torch.save(payload, path)


def _foreign(path):
    torch.save({"weight": torch.ones(3)}, path)  # a valid torch file, but not a record


def _old_format(path):
    # format /1 had no checksum: it cannot be verified, so it is redone
    payload = torch.load(path, weights_only=True)
    payload["format"] = "deqppl.harness.StageResult/1"
    del payload["checksum"]
    torch.save(payload, path)


class _Executes:
    """An object whose unpickling would run code; weights_only loading refuses it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _code(path):
    buf = io.BytesIO()
    torch.save({"format": "x", "obj": _Executes()}, buf, pickle_module=pickle)
    path.write_bytes(buf.getvalue())


def _retyped(path):
    # checksum recomputed by the forger, but a field holds the wrong type: still refused
    payload = torch.load(path, weights_only=True)
    payload["result"]["num_steps"] = "12"
    payload["checksum"] = content_checksum(payload)
    torch.save(payload, path)


DAMAGES = {
    "truncated": _truncate,
    "emptied": _empty,
    "garbage": _garbage,
    "altered": _altered,
    "foreign": _foreign,
    "old_format": _old_format,
    "code": _code,
    "retyped": _retyped,
}


def _record(root, method, stage):
    (path,) = [p for p in root.rglob("*.pt") if p.parent.parent.name == method and p.stem == stage]
    return path


@pytest.mark.parametrize("stage", ["fit", "heldout"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_unit_is_moved_aside_and_redone(problem, plain, stored, tmp_path, damage, stage):
    model, y = problem
    root = tmp_path / "run"
    shutil.copytree(stored, root)
    path = _record(root, "b", stage)
    DAMAGES[damage](path)

    store = RunStore(root)
    methods = _methods()
    resumed = compare(model, y, methods=methods, seeds=(0,), store=store, progress=False)

    assert methods[0].calls == {}  # the intact method was not touched
    assert methods[1].calls == {(stage, 0): 1}  # only the damaged unit ran again
    assert [p.name for p in store.quarantined] == [f"{stage}.pt.corrupt-1"]
    assert (path.parent / f"{stage}.pt.corrupt-1").exists() and path.exists()
    assert (path.parent / f"{stage}.json.corrupt-1").exists()  # its sidecar went with it
    assert len(store.units()) == 4
    pd.testing.assert_frame_equal(_untimed(resumed.table), _untimed(plain.table))
    for name in ("a", "b"):
        torch.testing.assert_close(resumed.latents[name], plain.latents[name], rtol=0, atol=0)

    # a second re-run finds everything intact and runs nothing
    again = _methods()
    compare(model, y, methods=again, seeds=(0,), store=RunStore(root), progress=False)
    assert again[0].calls == {} and again[1].calls == {}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_load_names_the_damaged_file(stored, tmp_path, damage):
    root = tmp_path / "run"
    shutil.copytree(stored, root)
    path = _record(root, "a", "fit")
    DAMAGES[damage](path)
    store = RunStore(root)
    unit = Unit(**torch.load(_record(stored, "a", "fit"), weights_only=True)["unit"])
    with pytest.raises(CorruptFileError, match="is not a readable deqppl file") as info:
        store.load(unit)
    assert info.value.path == path and str(path) in str(info.value)
    assert "weights_only" not in str(info.value)  # never invite turning the protection off
    assert path.exists()  # load names it; moving aside is for `in` (the resume path)


def test_quarantine_numbers_repeated_damage(stored, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(stored, root)
    path = _record(root, "a", "heldout")
    unit = Unit(**torch.load(path, weights_only=True)["unit"])
    store = RunStore(root)
    for n in (1, 2):
        shutil.copy(_record(stored, "a", "heldout"), path)
        _garbage(path)
        assert unit not in store
        assert store.quarantined[-1].name == f"heldout.pt.corrupt-{n}" and not path.exists()
    shutil.copy(_record(stored, "a", "heldout"), path)
    assert unit in store  # an intact record is accepted again


def test_checksum_covers_every_field(stored):
    payload = torch.load(_record(stored, "a", "fit"), weights_only=True)
    assert payload["checksum"] == content_checksum(payload)
    for key, value in payload["result"].items():
        changed = dict(payload, result=dict(payload["result"]))
        if isinstance(value, torch.Tensor):
            changed["result"][key] = value + 1 if value.numel() else torch.ones(1)
        elif isinstance(value, dict):
            changed["result"][key] = {**value, "__new__": torch.zeros(1)}
        elif isinstance(value, bool):
            changed["result"][key] = not value
        elif isinstance(value, (int, float)):
            changed["result"][key] = value + 1
        elif isinstance(value, str):
            changed["result"][key] = value + "x"
        elif value is None:
            changed["result"][key] = torch.zeros(1)
        assert content_checksum(changed) != payload["checksum"], key
    # and the dtype alone counts: the same numbers in float32 are other content
    x = {"t": torch.ones(3, dtype=torch.float64)}
    assert content_checksum(x) != content_checksum({"t": torch.ones(3, dtype=torch.float32)})


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ('{"data": "digits", "se', "not JSON"),
        ("\xff\xfe garbage", "not JSON"),
        ("[1, 2]", "JSON list, not an object"),
    ],
    ids=["emptied", "truncated", "garbage", "not_an_object"],
)
def test_load_settings_names_a_damaged_file(tmp_path, text, reason):
    path = tmp_path / "run.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptFileError, match=reason) as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_settings_round_trip(tmp_path):
    settings = {"data": "digits", "seed": 3, "seeds": [3], "lam": 1.0, "family": None}
    save_settings(tmp_path / "run.json", settings)
    assert load_settings(tmp_path / "run.json") == settings
    assert not list(tmp_path.glob("*.tmp"))
