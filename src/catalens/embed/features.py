"""Features of a catalogue through the embedding cache, with ingest problems collected."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catalens.config import Config
from catalens.embed.backbones import Backbone
from catalens.embed.cache import EmbeddingCache
from catalens.embed.engine import EngineConfig, embed_catalogue
from catalens.ingest.catalogue import Catalogue


def engine_config(cfg: Config) -> EngineConfig:
    e = cfg.engine
    return EngineConfig(batch_size=e.batch_size, workers=e.workers, decode=e.decode, runtime=e.runtime,
                        threads=e.threads, progress=e.progress, max_pixels=cfg.data.max_pixels)


@dataclass
class CatalogueFeatures:
    """Features of every row of a catalogue; ``ok`` is False for images that failed."""

    features: np.ndarray
    ok: np.ndarray
    problems: list[dict]
    notes: list[dict]


def catalogue_features(cat: Catalogue, backbone: Backbone, cfg: Config) -> CatalogueFeatures:
    """Embed ``cat`` (cached per image content + backbone fingerprint)."""
    cache = EmbeddingCache(cfg.cache_dir, backbone.fingerprint(), backbone.feature_dim,
                           jpeg=backbone.preprocess.decoder())
    emb = embed_catalogue(cat, backbone, cache, engine_config(cfg))
    return CatalogueFeatures(emb.features, emb.ok, emb.problems, emb.notes)
