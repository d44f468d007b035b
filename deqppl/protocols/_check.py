r"""The contract check of the model protocol, a table of rules (as scikit-learn's ``check_estimator``).

:func:`check_model` simulates a small data set from the model and runs every rule of
:data:`MODEL_RULES` in order; the first rule that fails raises :class:`ProtocolError` naming
the rule, the site or data name and what is allowed. Every zoo model passes it (tests/models);
run it on your own model before handing it to the harness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.distributions import constraints

from ._model import Simulation

__all__ = ["MODEL_RULES", "ModelCheckReport", "ModelRule", "ProtocolError", "check_model"]


class ProtocolError(ValueError):
    """A model breaks a rule of the model protocol.

    Attributes
    ----------
    rule
        Name of the broken rule (a row of :data:`MODEL_RULES`).
    site
        The site or data name concerned, or ``None`` when the rule is about the model as a
        whole.
    detail
        What is wrong and what is allowed.
    model
        Description of the model, when known.
    """

    def __init__(self, rule: str, detail: str, *, site: str | None = None, model: str | None = None) -> None:
        self.rule = rule
        self.site = site
        self.detail = detail
        self.model = model
        who = f"{model} breaks the model protocol, rule" if model else "rule"
        where = f" at site {site!r}" if site is not None else ""
        super().__init__(f"{who} {rule!r}{where}: {detail}")


@dataclass(frozen=True)
class ModelRule:
    """One rule of the model protocol.

    Attributes
    ----------
    name
        Identifier used in :class:`ProtocolError` and :class:`ModelCheckReport`.
    description
        What the rule requires, in one sentence.
    check
        ``check(ctx)`` raises :class:`ProtocolError` if the rule is broken and returns a
        reason string if the rule does not apply to this model (``None`` when it passed).
    """

    name: str
    description: str
    check: Callable[[_Context], str | None]


@dataclass(frozen=True)
class ModelCheckReport:
    """What :func:`check_model` verified.

    Attributes
    ----------
    model
        The model's description.
    passed
        Names of the rules that passed.
    skipped
        ``(rule, reason)`` for the rules that do not apply (e.g. per-datum rules of a model
        whose locals are coupled).
    """

    model: str
    passed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


@dataclass
class _Context:
    model: object
    owner: str
    num_data: int
    seed: int
    dtype: torch.dtype
    rtol: float
    sim: Simulation | None = None
    trace: poutine.Trace | None = None
    total: torch.Tensor | None = None
    per_datum: torch.Tensor | None = None
    notes: dict = field(default_factory=dict)

    def plate(self) -> str | None:
        return getattr(self.model, "plate_name", "data")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
def _names(ctx: _Context, attr: str) -> tuple[str, ...]:
    return tuple(getattr(ctx.model, attr))


def _latents(ctx: _Context) -> tuple[str, ...]:
    return _names(ctx, "global_sites") + _names(ctx, "local_sites")


def _in_plate(site: dict, plate: str) -> bool:
    return any(frame.name == plate for frame in site["cond_indep_stack"])


def _expect_rejection(ctx: _Context, rule: str, site: str, data: object, errors, what: str) -> None:
    try:
        ctx.model.validate(data)
    except errors as err:
        if site not in str(err):
            raise ProtocolError(
                rule,
                f"validate rejected {what} but its message does not name {site!r}: {err}",
                site=site,
            ) from err
        return
    except Exception as err:  # noqa: BLE001 - reported as a protocol breach
        names = " or ".join(e.__name__ for e in (errors if isinstance(errors, tuple) else (errors,)))
        raise ProtocolError(
            rule, f"validate must raise {names} on {what}, raised {type(err).__name__}: {err}", site=site
        ) from err
    names = " or ".join(e.__name__ for e in (errors if isinstance(errors, tuple) else (errors,)))
    raise ProtocolError(rule, f"validate accepted {what}; it must raise {names} naming {site!r}", site=site)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0, 1.0)
    return bool(((a - b).abs() <= rtol * scale).all())


def _out_of_support_value(support: constraints.Constraint, dtype: torch.dtype) -> float | None:
    # Candidates outside the usual supports (counts, {0, 1}, {-1, 1}, [0, 1], positives,
    # negatives); the first the support rejects is used.
    for candidate in (-1.5, 0.5, 2.0, 1.5, -1.0, 1e6 + 0.5, 1.0):
        value = torch.tensor(candidate, dtype=dtype)
        try:
            ok = support.check(value)
        except (RuntimeError, ValueError, TypeError):
            return None
        if not bool(ok.all()):
            return candidate
    return None


# ------------------------------------------------------------------------------------------
# The rules, in the order they run
# ------------------------------------------------------------------------------------------
def _rule_declarations(ctx: _Context) -> None:
    rule, model = "declarations", ctx.model
    for attr in ("data_names", "observed_sites", "local_sites", "global_sites"):
        if not hasattr(model, attr):
            raise ProtocolError(
                rule, f"{ctx.owner} does not declare {attr}; a model declares data_names, observed_sites, "
                f"local_sites and global_sites (tuples of names; deqppl.protocols.AbstractModel)"
            )
        value = getattr(model, attr)
        if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise ProtocolError(rule, f"{attr} must be a tuple of non-empty strings, got {value!r}")
        if len(set(value)) != len(value):
            raise ProtocolError(rule, f"{attr} repeats a name: {list(value)}")
    if not model.data_names:
        raise ProtocolError(rule, "data_names is empty; a model needs at least one data name")
    if not model.observed_sites:
        raise ProtocolError(rule, "observed_sites is empty; a model observes at least one data name")
    stray = [n for n in model.observed_sites if n not in model.data_names]
    if stray:
        raise ProtocolError(rule, f"observed sites must be data names {list(model.data_names)}", site=stray[0])
    both = set(model.local_sites) & set(model.global_sites)
    if both:
        raise ProtocolError(rule, "a site is either local or global, not both", site=sorted(both)[0])
    clash = set(_latents(ctx)) & set(model.data_names)
    if clash:
        raise ProtocolError(rule, "a latent site cannot also be a data name", site=sorted(clash)[0])
    if not hasattr(model, "plate_name"):
        raise ProtocolError(rule, f"{ctx.owner} does not declare plate_name (a plate's name, or None if coupled)")
    plate = model.plate_name
    if plate is not None and (not isinstance(plate, str) or not plate):
        raise ProtocolError(rule, f"plate_name must be a plate's name or None (locals coupled), got {plate!r}")
    coupled = getattr(model, "locals_coupled", plate is None)
    if coupled != (plate is None):
        raise ProtocolError(rule, f"locals_coupled={coupled} disagrees with plate_name={plate!r}")
    for method in ("validate", "simulate", "log_joint", "__call__"):
        if not callable(getattr(model, method, None)):
            raise ProtocolError(rule, f"{ctx.owner} has no callable {method}")


def _rule_simulate(ctx: _Context) -> None:
    rule, model = "simulate", ctx.model
    try:
        sim = model.simulate(ctx.num_data, seed=ctx.seed, dtype=ctx.dtype)
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(
            rule, f"simulate({ctx.num_data}, seed={ctx.seed}, dtype={ctx.dtype}) raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(sim, Simulation):
        raise ProtocolError(rule, f"simulate must return a deqppl.protocols.Simulation, got {type(sim).__name__}")
    if set(sim.data) != set(model.data_names):
        raise ProtocolError(rule, f"simulate's data have keys {sorted(sim.data)}; allowed: data_names {list(model.data_names)}")
    if set(sim.truth) != set(_latents(ctx)):
        raise ProtocolError(
            rule, f"simulate's truth has keys {sorted(sim.truth)}; it must hold every latent site {list(_latents(ctx))}"
        )
    for group in (sim.data, sim.truth):
        for name, value in group.items():
            if not isinstance(value, torch.Tensor) or value.dtype != ctx.dtype:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise ProtocolError(rule, f"simulate returned {got}; it must return tensors of the asked dtype {ctx.dtype}", site=name)
            if not bool(torch.isfinite(value).all()):
                raise ProtocolError(rule, "simulate returned a non-finite value", site=name)
    if ctx.plate() is not None:
        for name in model.data_names + model.local_sites:
            value = sim.data.get(name, sim.truth.get(name))
            if value.dim() == 0 or value.shape[0] != ctx.num_data:
                raise ProtocolError(
                    rule, f"has shape {tuple(value.shape)}; data and local sites have one row per datum along "
                    f"their first dimension ({ctx.num_data} rows asked)", site=name,
                )
    again = model.simulate(ctx.num_data, seed=ctx.seed, dtype=ctx.dtype)
    for name, value in {**sim.data, **sim.truth}.items():
        other = again.data.get(name, again.truth.get(name))
        if not torch.equal(other, value):
            raise ProtocolError(rule, "simulate with the same seed gave a different value (seed the draw)", site=name)
    ctx.sim = sim


def _rule_validate_accepts_simulated(ctx: _Context) -> None:
    rule, model = "validate_accepts_simulated", ctx.model
    try:
        data = model.validate(ctx.sim.data)
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(rule, f"validate rejected the model's own simulated data: {type(err).__name__}: {err}") from err
    if not isinstance(data, Mapping) or set(data) != set(model.data_names):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ProtocolError(rule, f"validate returned {keys}; it must return a dict keyed by data_names {list(model.data_names)}")
    for name in model.data_names:
        value = data[name]
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(rule, f"validate returned a {type(value).__name__}, not a tensor", site=name)
        if value.shape != ctx.sim.data[name].shape or not torch.equal(value.to(ctx.dtype), ctx.sim.data[name]):
            raise ProtocolError(rule, "validate changed the values or the shape of valid data (it may only convert them)", site=name)


def _rule_sites_in_trace(ctx: _Context) -> None:
    rule, model = "sites_in_trace", ctx.model
    data = model.validate(ctx.sim.data)
    try:
        trace = poutine.trace(poutine.condition(model, data=dict(ctx.sim.truth))).get_trace(**data)
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(rule, f"the program failed on its simulated data and truth: {type(err).__name__}: {err}") from err
    for name in _latents(ctx):
        site = trace.nodes.get(name)
        if site is None or site["type"] != "sample":
            raise ProtocolError(rule, "is declared a latent site but is no sample site of the program's trace", site=name)
    for name in model.observed_sites:
        site = trace.nodes.get(name)
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            raise ProtocolError(
                rule, "is declared an observed site but is no observed sample site of the trace (a covariate "
                "belongs in data_names only, not in observed_sites)", site=name,
            )
        if not torch.equal(site["value"], data[name]):
            raise ProtocolError(rule, "the observed site's value is not the data passed under its name", site=name)
    declared = set(_latents(ctx)) | set(model.observed_sites)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in declared or type(site["fn"]).__name__ == "_Subsample":
            continue
        if site["infer"].get("_do_not_trace") or site["infer"].get("_deterministic"):
            continue  # pyro.deterministic records a value, not a random variable
        kind = "observed" if site["is_observed"] else "latent"
        raise ProtocolError(
            rule, f"the program has a {kind} sample site that is not declared; allowed: declare it in "
            f"{'observed_sites' if site['is_observed'] else 'local_sites or global_sites'}", site=name,
        )
    ctx.trace = trace


def _rule_locals_in_plate(ctx: _Context) -> str | None:
    rule, model, plate = "locals_in_plate", ctx.model, ctx.plate()
    if plate is None:
        return "the locals are declared coupled (plate_name=None)"
    frames = [f for s in ctx.trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.name == plate]
    if not frames:
        raise ProtocolError(
            rule, f"the program has no plate named {plate!r}; name the plate of the locals in plate_name, "
            f"or declare plate_name=None if the locals are coupled"
        )
    if any(f.size != ctx.num_data for f in frames):
        raise ProtocolError(rule, f"the plate {plate!r} has size {frames[0].size}, not the number of rows {ctx.num_data}")
    for name in model.local_sites + model.observed_sites:
        site = ctx.trace.nodes[name]
        if not _in_plate(site, plate):
            raise ProtocolError(
                rule, f"is outside the plate {plate!r}; allowed: local and observed sites inside it, or "
                f"plate_name=None if the locals are coupled", site=name,
            )
        value = site["value"]
        if value.dim() == 0 or value.shape[0] != ctx.num_data:
            raise ProtocolError(rule, f"value of shape {tuple(value.shape)} does not run over rows along dim 0", site=name)
    return None


def _rule_globals_outside_plate(ctx: _Context) -> str | None:
    rule, model, plate = "globals_outside_plate", ctx.model, ctx.plate()
    if plate is None:
        return "no data plate (plate_name=None)"
    for name in model.global_sites:
        if _in_plate(ctx.trace.nodes[name], plate):
            raise ProtocolError(
                rule, f"a global site is inside the data plate {plate!r}; allowed: globals outside it (a site "
                f"with one value per row is local)", site=name,
            )
    return None


def _rule_log_joint_equals_trace(ctx: _Context) -> None:
    rule, model = "log_joint_equals_trace", ctx.model
    try:
        total = model.log_joint(ctx.sim.data, ctx.sim.truth)
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(rule, f"log_joint(data, truth) raised {type(err).__name__}: {err}") from err
    if not isinstance(total, torch.Tensor) or total.shape != ():
        raise ProtocolError(rule, f"log_joint must return a scalar tensor, got {getattr(total, 'shape', type(total).__name__)}")
    if not math.isfinite(float(total)):
        raise ProtocolError(rule, f"log_joint at the simulated truth is {float(total)}; it must be finite")
    want = ctx.trace.log_prob_sum()
    if not _close(total.detach(), want.detach(), ctx.rtol):
        raise ProtocolError(
            rule, f"log_joint returned {float(total):.12g} but the program's trace gives {float(want):.12g}; the "
            f"density lives in the Pyro program (derive log_joint from it)"
        )
    ctx.total = total.detach()


def _rule_log_joint_differentiable(ctx: _Context) -> str | None:
    rule, model = "log_joint_differentiable", ctx.model
    values = {}
    for name, value in ctx.sim.truth.items():
        values[name] = value.clone().requires_grad_(value.is_floating_point())
    total = model.log_joint(ctx.sim.data, values)
    wrt = [n for n in _latents(ctx) if values[n].requires_grad]
    if not wrt:
        return "no floating-point latent sites"
    if not total.requires_grad:
        raise ProtocolError(rule, "log_joint does not depend differentiably on the latent values (detached?)")
    grads = torch.autograd.grad(total, [values[n] for n in wrt], allow_unused=True)
    for name, g in zip(wrt, grads, strict=True):
        if g is None:
            raise ProtocolError(rule, "the log joint does not depend on this latent site", site=name)
        if not bool(torch.isfinite(g).all()):
            raise ProtocolError(rule, "the gradient of the log joint is not finite at the simulated truth", site=name)
    return None


def _rule_per_datum_sums_to_total(ctx: _Context) -> str | None:
    rule, model, plate = "per_datum_sums_to_total", ctx.model, ctx.plate()
    if plate is None:
        try:
            model.log_joint(ctx.sim.data, ctx.sim.truth, per_datum=True)
        except ValueError:
            return "locals coupled: per_datum=True correctly raises ValueError"
        raise ProtocolError(
            rule, "the locals are declared coupled, but log_joint(per_datum=True) returned per-row terms; "
            "it must raise ValueError (there is no per-datum split)"
        )
    per = model.log_joint(ctx.sim.data, ctx.sim.truth, per_datum=True)
    if not isinstance(per, torch.Tensor) or tuple(per.shape) != (ctx.num_data,):
        raise ProtocolError(
            rule, f"log_joint(per_datum=True) must return shape ({ctx.num_data},), got {tuple(getattr(per, 'shape', ()))}"
        )
    if not bool(torch.isfinite(per).all()):
        raise ProtocolError(rule, "log_joint(per_datum=True) has non-finite entries at the simulated truth")
    trace = ctx.trace
    trace.compute_log_prob()
    outside = sum(
        float(site["log_prob_sum"])
        for site in trace.nodes.values()
        if site["type"] == "sample" and not _in_plate(site, plate)
    )
    if not _close(per.detach().sum() + outside, ctx.total, ctx.rtol):
        raise ProtocolError(
            rule, f"the per-datum terms sum to {float(per.sum()):.12g}, plus {outside:.12g} outside the plate "
            f"{plate!r}, which is not the total log joint {float(ctx.total):.12g}"
        )
    ctx.per_datum = per.detach()
    return None


def _rule_per_datum_factorises(ctx: _Context) -> str | None:
    rule, model, plate = "per_datum_factorises", ctx.model, ctx.plate()
    if plate is None:
        return "locals coupled: rows are not conditionally independent"
    rows = torch.arange(0, ctx.num_data, 2)
    data = {name: value[rows] for name, value in ctx.sim.data.items()}
    truth = {name: (value[rows] if name in model.local_sites else value) for name, value in ctx.sim.truth.items()}
    try:
        per = model.log_joint(data, truth, per_datum=True)
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(rule, f"log_joint on the rows {rows.tolist()} alone raised {type(err).__name__}: {err}") from err
    if tuple(per.shape) != (len(rows),) or not _close(per.detach(), ctx.per_datum[rows], ctx.rtol):
        raise ProtocolError(
            rule, f"the per-datum log joint of rows {rows.tolist()} computed alone differs from the same rows "
            f"of the full data: rows are not conditionally independent given the globals; allowed: "
            f"plate_name=None (locals coupled), or a program whose rows depend only on globals"
        )
    return None


def _rule_validate_rejects_nan(ctx: _Context) -> None:
    for name in ctx.model.data_names:
        bad = {k: v.clone() for k, v in ctx.sim.data.items()}
        bad[name].view(-1)[0] = float("nan")
        _expect_rejection(ctx, "validate_rejects_nan", name, bad, ValueError, f"a NaN in {name!r}")


def _rule_validate_rejects_wrong_shape(ctx: _Context) -> None:
    rule, model = "validate_rejects_wrong_shape", ctx.model
    for name in model.data_names:
        bad = dict(ctx.sim.data)
        bad[name] = ctx.sim.data[name][..., None, None]
        _expect_rejection(ctx, rule, name, bad, ValueError, f"{name!r} with two extra trailing dimensions")
    for name in model.observed_sites:
        value = ctx.sim.data[name]
        if value.dim() >= 2 and value.shape[-1] > 1:
            bad = {**ctx.sim.data, name: value[..., :-1]}
            _expect_rejection(ctx, rule, name, bad, ValueError, f"{name!r} with its last column dropped")
    if len(model.data_names) > 1:
        name = model.data_names[-1]
        bad = {**ctx.sim.data, name: ctx.sim.data[name][:-1]}
        _expect_rejection(ctx, rule, name, bad, ValueError, f"{name!r} with one row fewer than the other data")


def _rule_validate_rejects_wrong_keys(ctx: _Context) -> None:
    rule, model = "validate_rejects_wrong_keys", ctx.model
    first = model.data_names[0]
    missing = {k: v for k, v in ctx.sim.data.items() if k != first}
    _expect_rejection(ctx, rule, first, missing, ValueError, f"data without {first!r}")
    extra = {**ctx.sim.data, "not_a_data_name": ctx.sim.data[first]}
    _expect_rejection(ctx, rule, "not_a_data_name", extra, ValueError, "an unknown data name")
    try:
        model.validate(list(ctx.sim.data.values()))
    except TypeError:
        pass
    except Exception as err:  # noqa: BLE001
        raise ProtocolError(rule, f"validate must raise TypeError on a list instead of a mapping, raised {type(err).__name__}") from err
    else:
        raise ProtocolError(rule, "validate accepted a list; it must raise TypeError (data are a mapping of data names)")


def _rule_validate_rejects_non_numeric(ctx: _Context) -> None:
    for name in ctx.model.data_names:
        bad = {**ctx.sim.data, name: "not numbers"}
        _expect_rejection(ctx, "validate_rejects_non_numeric", name, bad, TypeError, f"a string as {name!r}")


def _rule_validate_rejects_outside_support(ctx: _Context) -> str | None:
    rule, model = "validate_rejects_outside_support", ctx.model
    checked = []
    for name in model.observed_sites:
        fn = ctx.trace.nodes[name]["fn"]
        support = fn.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        candidate = _out_of_support_value(support, ctx.dtype)
        if candidate is None:
            continue
        bad = {k: v.clone() for k, v in ctx.sim.data.items()}
        bad[name].view(-1)[0] = candidate
        _expect_rejection(ctx, rule, name, bad, ValueError, f"{name!r} = {candidate} outside the support {support}")
        checked.append(name)
    return None if checked else "every observed site's support is the real line"


#: The rules of the model protocol, in the order :func:`check_model` runs them.
MODEL_RULES: tuple[ModelRule, ...] = (
    ModelRule("declarations", "data_names, observed_sites, local_sites, global_sites are tuples of distinct "
              "names (observed within data, no latent is data or both local and global); plate_name is a "
              "name or None; validate, simulate and log_joint exist", _rule_declarations),
    ModelRule("simulate", "simulate(N, seed=, dtype=) returns a Simulation with exactly the data names and "
              "latent sites, finite tensors of the dtype, N rows (plate models), reproducible by seed", _rule_simulate),
    ModelRule("validate_accepts_simulated", "validate accepts simulated data and returns it unchanged as a dict "
              "of tensors keyed by data_names", _rule_validate_accepts_simulated),
    ModelRule("sites_in_trace", "every declared latent site is a sample site of the program, every observed "
              "site is observed with the data's value, and no sample site is undeclared", _rule_sites_in_trace),
    ModelRule("locals_in_plate", "local and observed sites lie in the plate plate_name, of one entry per row "
              "(unless the locals are declared coupled)", _rule_locals_in_plate),
    ModelRule("globals_outside_plate", "global sites lie outside the data plate", _rule_globals_outside_plate),
    ModelRule("log_joint_equals_trace", "log_joint(data, truth) is a finite scalar equal to the trace's "
              "log_prob_sum", _rule_log_joint_equals_trace),
    ModelRule("log_joint_differentiable", "the log joint has finite gradients in every latent site",
              _rule_log_joint_differentiable),
    ModelRule("per_datum_sums_to_total", "log_joint(per_datum=True) has one finite term per row which, with the "
              "sites outside the plate, sum to the total; coupled models raise ValueError instead",
              _rule_per_datum_sums_to_total),
    ModelRule("per_datum_factorises", "the per-datum terms of a subset of rows do not depend on the other rows "
              "(rows are conditionally independent given the globals)", _rule_per_datum_factorises),
    ModelRule("validate_rejects_nan", "validate raises ValueError naming the data on a NaN", _rule_validate_rejects_nan),
    ModelRule("validate_rejects_wrong_shape", "validate raises ValueError naming the data on extra dimensions, "
              "a dropped column of an observation or mismatched rows", _rule_validate_rejects_wrong_shape),
    ModelRule("validate_rejects_wrong_keys", "validate raises ValueError on a missing or unknown data name and "
              "TypeError on a non-mapping", _rule_validate_rejects_wrong_keys),
    ModelRule("validate_rejects_non_numeric", "validate raises TypeError naming the data on non-numeric input",
              _rule_validate_rejects_non_numeric),
    ModelRule("validate_rejects_outside_support", "validate raises ValueError naming the data on an observation "
              "outside its site's support", _rule_validate_rejects_outside_support),
)


def check_model(
    model: object, *, num_data: int = 6, seed: int = 0, dtype: torch.dtype = torch.float64
) -> ModelCheckReport:
    r"""Check that ``model`` follows the model protocol (:mod:`deqppl.protocols`).

    Simulates ``num_data`` rows from the model and runs every rule of :data:`MODEL_RULES`:
    declared names exist in the trace; locals inside the declared plate unless declared
    coupled, globals outside; simulated data pass ``validate`` with the declared names;
    ``log_joint`` is finite, differentiable and equal to the trace's; the per-datum log
    joint sums to the total and factorises over rows; ``validate`` rejects NaN, wrong shapes,
    wrong keys, non-numeric data and observations outside the support.

    Parameters
    ----------
    model
        The model to check (e.g. a zoo model or a :class:`~deqppl.protocols.PyroModel`).
    num_data
        Rows to simulate (at least 2, so that the row-factorisation rule has a subset).
    seed
        Seed of the simulation.
    dtype
        Floating dtype of the check; float64 keeps the equality rules at round-off.

    Returns
    -------
    ModelCheckReport
        The rules that passed and those that did not apply.

    Raises
    ------
    ProtocolError
        At the first broken rule, naming the rule, the site and what is allowed.
    ValueError
        If ``num_data`` < 2 or ``dtype`` is not floating.

    Examples
    --------
    >>> from deqppl.expfam import poisson
    >>> from deqppl.models import ExpFamPCA
    >>> report = check_model(ExpFamPCA(family=poisson(), obs_dim=3, latent_dim=1))
    >>> len(report.passed) == len(MODEL_RULES), report.skipped
    (True, ())
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 2:
        raise ValueError(f"num_data must be an integer >= 2, got {num_data!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    describe = getattr(model, "describe", None)
    owner = describe() if callable(describe) else type(model).__name__
    # Equality rules compare two evaluations of the same density, which differ only by the
    # order of floating-point sums: a few hundred ulps of the log joint's scale.
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    ctx = _Context(model=model, owner=owner, num_data=num_data, seed=seed, dtype=dtype, rtol=rtol)
    passed, skipped = [], []
    for rule in MODEL_RULES:
        try:
            reason = rule.check(ctx)
        except ProtocolError as err:
            raise ProtocolError(err.rule, err.detail, site=err.site, model=owner) from err.__cause__
        except Exception as err:  # noqa: BLE001 - a model that crashes a rule breaks it
            raise ProtocolError(
                rule.name, f"checking it raised {type(err).__name__}: {err} ({rule.description})", model=owner
            ) from err
        if reason is None:
            passed.append(rule.name)
        else:
            skipped.append((rule.name, reason))
    return ModelCheckReport(model=owner, passed=tuple(passed), skipped=tuple(skipped))
