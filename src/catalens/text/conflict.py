"""Title–image conflicts: a photo whose title says something else (a shoe photo titled "striped shirt").

Per class task the image-only answer (the head's probabilities) and the title-only answer (the
title model's) are compared; the **conflict score** is 0 when they pick the same class, and
otherwise grows with how sure both sides are:

- ``tv`` (default): the total variation distance ``0.5 * sum |p_image - p_title|`` between the
  two distributions;
- ``min_conf``: ``min(max p_image, max p_title)``: both sides confident in their own, different,
  answer.

The method was chosen by measurement (``benchmarks/bench_conflicts.py``, docs/benchmarks.md): on
fashion-products val, at 1% of genuine photo + title pairs flagged, ``tv`` flags 89% of photos
given another articleType's title, ``min_conf`` 78%.
A task conflicts when its score exceeds ``threshold``; a photo conflicts when any class task
does. One threshold for every class task, chosen on the validation photos (genuine photo +
title pairs) so that at most ``max_genuine`` of them (default 1%) are flagged; stored in the
title model's ``fusion.json`` (``conflict``). Models trained before it get
:data:`DEFAULT_CONFLICT`. numpy only.
"""
from __future__ import annotations

import numpy as np

DEFAULT_METHOD = "tv"
DEFAULT_MAX_GENUINE = 0.01
#: for title models trained before conflicts were measured (threshold measured on fashion-products)
DEFAULT_CONFLICT = {"method": DEFAULT_METHOD, "threshold": 0.985, "max_genuine": DEFAULT_MAX_GENUINE,
                    "source": "default"}


def _min_conf(p_image: np.ndarray, p_title: np.ndarray) -> np.ndarray:
    return np.minimum(p_image.max(axis=1), p_title.max(axis=1))


def _tv(p_image: np.ndarray, p_title: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p_image - p_title).sum(axis=1)


METHODS = {"min_conf": _min_conf, "tv": _tv}


def conflict_scores(p_image: np.ndarray, p_title: np.ndarray, method: str = DEFAULT_METHOD) -> np.ndarray:
    """``(n,)`` float64 conflict score of one class task (0 where both sides pick the same class or
    a row has no title: NaN title probabilities)."""
    if method not in METHODS:
        raise ValueError(f"conflict method {method!r} is not one of {sorted(METHODS)}")
    pi = np.asarray(p_image, dtype=np.float64)
    pt = np.asarray(p_title, dtype=np.float64)
    if not len(pi):
        return np.zeros(0)
    has = ~np.isnan(pt).any(axis=1)
    pt = np.where(has[:, None], pt, pi)  # no title: no disagreement
    differ = pi.argmax(axis=1) != pt.argmax(axis=1)
    return np.where(differ & has, METHODS[method](pi, pt), 0.0)


def photo_scores(p_image: dict, p_title: dict, tasks: list[str], method: str = DEFAULT_METHOD) -> np.ndarray:
    """``(n,)`` the highest conflict score over the class tasks ``tasks`` (what ``conflict`` tests)."""
    scores = [conflict_scores(p_image[t], p_title[t], method) for t in tasks]
    return np.max(scores, axis=0) if scores else np.zeros(0)


def choose_threshold(genuine_scores: np.ndarray, max_genuine: float = DEFAULT_MAX_GENUINE) -> float:
    """The lowest threshold flagging (``score > threshold``) at most ``max_genuine`` of the genuine
    photo + title pairs' scores."""
    s = np.asarray(genuine_scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no validation photo with a title to set the conflict threshold on")
    k = int(np.floor(max_genuine * s.size + 1e-9))       # genuine pairs allowed above the threshold
    return float(np.sort(s)[max(s.size - 1 - k, 0)])


def describe(p_image_val: dict, p_title_val: dict, tasks: list[str], method: str = DEFAULT_METHOD,
             max_genuine: float = DEFAULT_MAX_GENUINE) -> dict:
    """``fusion.json``'s ``conflict`` entry from validation photos that have a title."""
    s = photo_scores(p_image_val, p_title_val, tasks, method)
    thr = choose_threshold(s, max_genuine)
    return {"method": method, "threshold": thr, "max_genuine": float(max_genuine),
            "source": f"val ({s.size} photos with a title)", "val_flagged": float((s > thr).mean())}
