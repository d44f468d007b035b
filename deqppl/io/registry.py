"""The saved-model protocol: classes that can be written to a model file, by a stable name.

A model or encoder class takes part by implementing two methods and registering itself:

* models: ``config(self) -> dict`` (JSON-able hyperparameters) and the classmethod
  ``from_config(config) -> model``;
* encoders: ``config(self) -> dict`` (JSON-able settings, without the model) and the
  classmethod ``from_config(model, config, tensors) -> encoder``; the tensors written are the
  encoder's ``state_dict()``.

``@register("Name")`` records the class under a name that never changes (the file stores the
name, never code). :func:`lookup` finds a class by that name. The solver and adjoint objects of
:mod:`deqppl.deq` (frozen dataclasses of numbers) are written field by field by
:func:`settings_config`; a user's own solver joins with :func:`register_settings`.

Examples
--------
>>> from deqppl.deq import Anderson
>>> cfg = settings_config(Anderson(rtol=1e-9, memory=5))
>>> cfg["class"], cfg["fields"]["memory"]
('Anderson', 5)
>>> settings_from_config(cfg) == Anderson(rtol=1e-9, memory=5)
True
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "PROVIDERS",
    "lookup",
    "name_of",
    "register",
    "register_settings",
    "registered",
    "settings_config",
    "settings_from_config",
]

C = TypeVar("C", bound=type)

_SAVEABLE: dict[str, type] = {}
_SETTINGS: dict[str, type] = {}

#: Modules that register saveable classes when imported, imported by :func:`lookup` before it
#: gives up on a name: the zoo (``deqppl.models``, shipped in the same distribution) registers
#: ``ExpFamPCA`` and ``HierarchicalExpFamPCA``; ``deqppl.encoders`` registers the encoders.
#: Named here as strings so that the library keeps no import of the zoo.
PROVIDERS: tuple[str, ...] = ("deqppl.encoders", "deqppl.models")


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a model or encoder class saveable under the stable ``name``.

    Raises
    ------
    TypeError
        If the class lacks ``config`` or ``from_config``.
    ValueError
        If ``name`` is empty or already taken by another class.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a saveable class needs a non-empty name, got {name!r}")

    def decorate(cls: C) -> C:
        missing = [m for m in ("config", "from_config") if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"{cls.__name__} cannot be registered as saveable: it lacks {missing}")
        other = _SAVEABLE.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"the saveable name {name!r} is taken by {other.__module__}.{other.__qualname__}")
        # The same class imported twice under two module names (the zoo as deqppl.models and
        # as a top-level models package, e.g. by doctest collection): both copies can be
        # saved, and loading builds the one under deqppl, else the first registered.
        if other is None or (cls.__module__.startswith("deqppl.") and not other.__module__.startswith("deqppl.")):
            _SAVEABLE[name] = cls
        cls.saved_name = name
        return cls

    return decorate


def registered() -> dict[str, type]:
    """A copy of the table name -> saveable class (after importing :data:`PROVIDERS`)."""
    _import_providers()
    return dict(_SAVEABLE)


def name_of(cls: type) -> str:
    """The stable name a saveable class was registered under.

    Raises
    ------
    TypeError
        If the class is not registered.
    """
    for name, other in _SAVEABLE.items():
        if other is cls:
            return name
    if isinstance(cls, type) and "saved_name" in cls.__dict__:  # a second copy of a registered class
        return cls.__dict__["saved_name"]
    raise TypeError(
        f"{cls.__name__} is not a saveable class: a model file stores only classes registered "
        f"with @deqppl.io.register(name) that implement config() and from_config() "
        f"(registered: {', '.join(sorted(_SAVEABLE)) or 'none'})"
    )


def _import_providers() -> None:
    for module in PROVIDERS:
        importlib.import_module(module)


def lookup(name: str) -> type:
    """The saveable class registered under ``name``.

    Raises
    ------
    ValueError
        If no class is registered under ``name``, listing the registered names.
    """
    if name not in _SAVEABLE:
        _import_providers()
    try:
        return _SAVEABLE[name]
    except KeyError:
        raise ValueError(
            f"no saveable class is registered under the name {name!r}; registered: "
            f"{', '.join(sorted(_SAVEABLE))} (a class registers itself with "
            f"@deqppl.io.register(name) when its module is imported)"
        ) from None


# --------------------------------------------------------------------------------------------
# solver / adjoint settings objects
# --------------------------------------------------------------------------------------------
def register_settings(cls: C) -> C:
    """Make a frozen dataclass of settings (e.g. a user's solver) writable by class name.

    Its fields must be numbers, booleans, strings, ``None``, tuples of these, or other
    registered settings objects.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"settings classes must be dataclasses, got {cls!r}")
    other = _SETTINGS.get(cls.__name__)
    if other is not None and other is not cls:
        raise ValueError(f"the settings name {cls.__name__!r} is taken by {other.__module__}.{other.__qualname__}")
    _SETTINGS[cls.__name__] = cls
    return cls


def _register_deq() -> None:
    if "Anderson" in _SETTINGS:
        return
    from deqppl import deq

    for cls in (
        deq.FixedPointIteration,
        deq.Anderson,
        deq.Broyden,
        deq.Newton,
        deq.ImplicitAdjoint,
        deq.UnrolledAdjoint,
        deq.OneStepAdjoint,
        deq.NoAdjoint,
        deq.DirectLinearSolver,
        deq.GMRES,
        deq.FixedPointLinearSolver,
    ):
        register_settings(cls)


def _value_config(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no inf/nan; written as strings so the file stays standard JSON
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_value_config(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings_config(value, where=where)
    raise TypeError(
        f"{where} = {value!r} cannot be written to a model file: settings fields must be numbers, "
        f"booleans, strings, None, tuples or registered settings objects"
    )


def _value_from_config(value: Any) -> Any:
    if isinstance(value, dict):
        if "float" in value:
            return float(value["float"])
        if "tuple" in value:
            return tuple(_value_from_config(v) for v in value["tuple"])
        return settings_from_config(value)
    return value


def settings_config(obj: Any, *, where: str = "settings") -> dict | None:
    """A solver/adjoint settings object as JSON-able ``{"class": name, "fields": {...}}``.

    ``None`` stays ``None`` (the encoder's default is used).

    Raises
    ------
    TypeError
        If the object's class is not registered (:func:`register_settings`) or a field
        cannot be written.
    """
    if obj is None:
        return None
    _register_deq()
    cls = type(obj)
    if _SETTINGS.get(cls.__name__) is not cls:
        raise TypeError(
            f"{where} {obj!r} cannot be written to a model file: {cls.__name__} is not a "
            f"registered settings class (deqppl.io.register_settings; registered: "
            f"{', '.join(sorted(_SETTINGS))})"
        )
    fields = {
        f.name: _value_config(getattr(obj, f.name), f"{where}.{f.name}")
        for f in dataclasses.fields(obj)
        if f.init
    }
    return {"class": cls.__name__, "fields": fields}


def settings_from_config(config: dict | None) -> Any:
    """Rebuild the object of :func:`settings_config` (``None`` for ``None``).

    Raises
    ------
    ValueError
        If the class name is not registered.
    """
    if config is None:
        return None
    _register_deq()
    name = config["class"]
    try:
        cls = _SETTINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown settings class {name!r} in the model file; registered: {', '.join(sorted(_SETTINGS))}"
        ) from None
    return cls(**{k: _value_from_config(v) for k, v in config["fields"].items()})
