"""Data checked once by a model's ``validate``, so inner calls do not check it again.

Examples
--------
>>> import torch
>>> from deqppl.expfam import family
>>> from deqppl.models import ExpFamPCA
>>> model = ExpFamPCA(family=family("poisson"), obs_dim=2, latent_dim=1)
>>> data = validated(model, {"y": [[0, 1], [2, 3]]})
>>> data["y"].dtype, validated(model, data) is data
(torch.float32, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

__all__ = ["ValidatedData", "validated"]


class ValidatedData(Mapping):
    """A read-only data mapping returned by ``model.validate``, tagged with that model.

    Public entries that receive it for an equal model skip validating it again
    (:func:`validated`); anything else is validated.
    """

    __slots__ = ("_data", "_model")

    def __init__(self, model, data: Mapping[str, torch.Tensor]) -> None:
        self._model = model
        self._data = dict(data)

    @property
    def model(self):
        """The model whose ``validate`` produced the data."""
        return self._model

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._data.items()}
        return f"ValidatedData({type(self._model).__name__}, {shapes})"


def validated(model, data: Mapping[str, object]) -> ValidatedData:
    """``data`` validated by ``model.validate``, or ``data`` itself if it already was.

    Data validated by an equal model (frozen dataclass models compare by their
    hyperparameters) is returned as is; anything else is passed to ``model.validate`` once.
    """
    if isinstance(data, ValidatedData) and (data.model is model or data.model == model):
        return data
    return ValidatedData(model, model.validate(data))
