"""The time budget of a preset: ``--time-limit`` parsed, and a :class:`Clock` that learns this machine's
speeds as the run goes and estimates what the next step costs."""
from __future__ import annotations

import math
import time

import numpy as np

from catalens.config import Config
from catalens.train.presets.recipes import rel_cost

PRESETS = ("fast", "medium", "best")
#: seconds of ``--time-limit`` when not given
DEFAULT_LIMIT = {"medium": 600.0, "best": 1200.0}
#: seconds of one title model fit per train + val photo, before one is measured (fashion-products: 20 s / 5,289)
FIRST_GUESS_TITLE = 0.005
_FIRST_GUESS_SPI = 1 / 40.0     # seconds per image of Lite0@224, decode included, before anything is measured
#: seconds of one head fit per (train + val photo x feature), before one is measured: clothing-small, 5-fold CV,
#: AMD EPYC with AVX-512 (2026-12-02 16:15): the plain recipe's linear head 4.9e-7, ``logreg`` on Lite1@272
#: multilevel 1.9e-7; a slower machine (11:36) ran the plain recipe 2.2x slower. It was 4e-6: it estimated the
#: plain recipe at 150 s (took 32 s) and the first multilevel recipe at ~250 s, past a 3-minute budget
_FIRST_GUESS_FIT = 1e-6
#: a last-stage fine-tuning (probe, 3 precomputed views, 6 epochs, on the fold's training photos) costs
#: about this many Lite0@224 embeddings per training photo, before one is measured in the run
_FIRST_GUESS_FT_REL = 8.0
#: a TTA pass costs this many plain passes per view, the identity included, when its views are all pixel
#: views (``catalens.embed.engine.PIXEL_VIEWS``: the plain network once per view; ``bench_tta``: 1.85x and
#: 1.97x for ``hflip``, Lite2@300 on clothing-small, decode included); with another view (``zoom``), the
#: graph with the views inside it: :data:`TTA_GRAPH_VIEW_COST` (3.17x and 3.36x there for ``hflip``; the
#: preset's TTA recipe, estimated at 2x, took 134 s against 108 s before the engine ran a pass per view)
TTA_VIEW_COST = 1.0
TTA_GRAPH_VIEW_COST = 1.7


def parse_duration(text: str | float | int) -> float:
    """``"20m"``, ``"90s"``, ``"1h"``, ``"1h30m"``, ``"1200"`` → seconds (ValueError naming the form)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        import re

        s = str(text).strip().lower()
        m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s?)?", s)
        if not s or m is None or not any(m.groups()):
            raise ValueError(f"--time-limit {text!r}: expected a duration such as 20m, 90s, 1h30m or 1200 (seconds)")
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + se
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--time-limit {text!r}: must be more than 0 seconds")
    return value


class Clock:
    """The budget: measured speeds and estimates of what the next step costs."""

    def __init__(self, limit: float) -> None:
        self.t0 = time.time()
        self.limit = limit
        self.spi = _FIRST_GUESS_SPI          # seconds per image of Lite0@224 (uncached)
        self.fit_unit = _FIRST_GUESS_FIT     # seconds per (row x feature) of one head fit
        self.ft_unit: float | None = None    # seconds of a fine-tuning per training photo, once measured
        self.measured_embed = False
        self.spec_spi: dict[str, float] = {}  # seconds per image of each backbone spec embedded in this run

    def left(self) -> float:
        return self.limit - (time.time() - self.t0)

    def per_image(self, spec: str) -> float:
        """Seconds per image of embedding with backbone ``spec`` (``a@s+b@t``: the multi-backbone), ``rel``
        (:func:`~catalens.train.presets.recipes.rel_cost` of ``spec``) times as costly as Lite0@224. Measured in this run when
        every part of ``spec`` was (a multi-backbone: the sum of its parts, each with its own decode, an upper
        bound: it decodes once). Else, with two single backbones of different ``rel`` measured, the line
        ``decode + net x rel`` through this run's measured ones (:meth:`speed_line`); with one, that speed scaled
        by ``rel``, which misplaces the decode (it does not grow with the net): on clothing-small Lite2@300 took
        12.4 ms per photo against 6.4 ms for Lite0@224 (1.9x; rel 2.8), and the plain Lite0@224 scaled down
        from Lite2@300 was estimated at 4.2 ms per photo (21 s for its recipe, which took 28 s)."""
        parts = spec.split("+")
        if all(p in self.spec_spi for p in parts):
            return sum(self.spec_spi[p] for p in parts)
        rel = rel_cost(spec)
        line = self.speed_line()
        if line is not None:
            decode, net = line
            return decode + net * rel
        return self.spi * rel

    def speed_line(self) -> tuple[float, float] | None:
        """``(decode, net)``: seconds per image = ``decode + net x rel``, least squares through the single
        backbones measured in this run; None with fewer than two distinct ``rel`` or a line that does not
        rise with ``rel`` or starts below 0 (then the speed is scaled by ``rel``)."""
        pts = [(rel_cost(k), v) for k, v in self.spec_spi.items() if "+" not in k]
        if len({r for r, _ in pts}) < 2:
            return None
        rels, secs = np.array([r for r, _ in pts]), np.array([v for _, v in pts])
        net, decode = np.polyfit(rels, secs, 1)
        if net <= 0 or decode < 0:
            return None
        return float(decode), float(net)

    def embed_cost(self, n_uncached: int, spec: str) -> float:
        """Seconds of embedding ``n_uncached`` photos with backbone ``spec`` (:meth:`per_image`)."""
        return n_uncached * self.per_image(spec)

    def fit_cost(self, rows: int, dim: int) -> float:
        return rows * dim * self.fit_unit

    def finetune_cost(self, n_train: int, spec: str) -> float:
        """Seconds of one last-stage fine-tuning of backbone ``spec`` on ``n_train`` photos (+ embedding its
        held-out rows): measured once one ran, else a first guess from the embedding speed."""
        unit = self.ft_unit if self.ft_unit is not None else self.spi * rel_cost(spec) * _FIRST_GUESS_FT_REL
        return n_train * unit

    def learn_finetune(self, seconds: float, n_train: int) -> None:
        if n_train and seconds > 0:
            self.ft_unit = seconds / n_train

    def learn_embed(self, seconds: float, n: int, spec: str) -> None:
        """``n`` photos embedded in ``seconds`` by backbone ``spec``."""
        if n >= 8 and seconds > 0:
            self.spi = seconds / (n * rel_cost(spec))
            self.measured_embed = True
            self.spec_spi[spec] = seconds / n

    def learn_fit(self, seconds: float, fits: int, rows: int, dim: int) -> None:
        if fits and rows and dim and seconds > 0:
            self.fit_unit = seconds / (fits * rows * dim)


def calibration_sizes(batch_size: int) -> tuple[int, int]:
    """Photos of a calibration (:func:`calibrate_embed`): one batch embedded first, untimed (the runtime's
    start and its first full batch), then two full batches timed. A runtime prepares each new batch shape
    on its first call: started on 32 photos and timed on 96 (a batch of 64, a new shape, and one of 32),
    Lite1@272 measured 32 img/s on one core of this machine against 52 for the next 96 photos; started on a
    full batch of 64, the two timed ones measured 47 against 51."""
    batch = max(1, int(batch_size))
    return batch, 2 * batch


def calibrate_embed(clock: Clock, pool, backbone, cfg: Config, spec: str) -> tuple[float, int, int]:
    """Learn this machine's embedding speed before the first estimate that needs it: embed an evenly spread
    sample of ``pool`` through ``backbone`` (into the cache: the recipe reads them from there) and time the
    second part (:func:`calibration_sizes`). ``_FIRST_GUESS_SPI`` is about twice as slow as this 2-core
    machine, which under a short ``--time-limit`` skipped even the plain recipe (clothing-small, 3 minutes:
    needs ~198 s, 167 s left; it took 55 s). A few seconds, the runtime's start included. Returns
    ``(images per second measured, photos timed, photos embedded before)``."""
    from catalens.embed.features import catalogue_features

    warm, timed = calibration_sizes(cfg.engine.batch_size)
    n = min(len(pool), warm + timed)
    rows = np.linspace(0, len(pool) - 1, n).astype(int)
    first = np.zeros(len(pool), bool)
    first[rows[:warm]] = True
    second = np.zeros(len(pool), bool)
    second[rows[warm:]] = True
    catalogue_features(pool.subset(first), backbone, cfg)
    t = time.time()
    catalogue_features(pool.subset(second), backbone, cfg)
    took = time.time() - t
    clock.learn_embed(took, int(second.sum()), spec)
    return (int(second.sum()) / took if took > 0 else float("inf")), int(second.sum()), int(first.sum())


def uncached_share(cat, backbone, cfg: Config, sample: int = 24) -> float:
    """Share of ``cat``'s photos whose features for ``backbone`` are not in the cache (from a sample)."""
    from catalens.embed.cache import EmbeddingCache, content_hash

    try:
        cache = EmbeddingCache(cfg.cache_dir, backbone.fingerprint(), backbone.feature_dim)
        keys = cache.keys()
    except Exception:  # no cache yet, unreadable part: count everything as to embed
        return 1.0
    if not keys or len(cat) == 0:
        return 1.0
    idx = np.linspace(0, len(cat) - 1, min(sample, len(cat))).astype(int)
    miss = 0
    for i in idx:
        try:
            miss += content_hash(cat.read_bytes(int(i))) not in keys
        except Exception:
            miss += 1
    return miss / len(idx)
