"""``load_model(folder)``: a model folder → :class:`CatalensModel` or :class:`EnsembleModel`.

The choice between a single model and an ensemble is made here, from the typed description
(:mod:`catalens.model.format`); both are validated against their weights while loading
(:mod:`catalens.model.check`), so a broken folder fails now, with the file named.
"""
from __future__ import annotations

from pathlib import Path

from catalens.model.format import read_description


def load_model(folder: str | Path, lazy: bool = False):
    """The model in ``folder``: a :class:`~catalens.model.single.CatalensModel`, or an
    :class:`~catalens.model.ensemble.EnsembleModel` when model.json describes an ensemble.
    ``lazy`` (single models): the backbone network is built only when needed (``catalens predict --out``)."""
    desc = read_description(folder)
    if desc.is_ensemble:
        from catalens.model.ensemble import EnsembleModel

        return EnsembleModel.load(folder, desc)
    from catalens.model.single import CatalensModel

    return CatalensModel.load(folder, desc, lazy=lazy)
