"""What streams between the stages of answering: blocks of probabilities of catalogue rows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalens.ingest.catalogue import Catalogue


def catalogue_titles(cat: Catalogue, rows: np.ndarray):
    """The titles of ``rows`` (None where a row has none), or None when the catalogue has no
    title column."""
    if "text" not in cat.frame or cat.frame["text"].isna().all():
        return None
    return cat.frame["text"].to_numpy(dtype=object)[rows]


@dataclass
class ProbabilityBlock:
    """Fused probabilities of consecutive catalogue rows (``ok``: the photo decoded)."""

    rows: np.ndarray
    ok: np.ndarray
    probs: dict[str, np.ndarray]
    problems: dict[int, str]
