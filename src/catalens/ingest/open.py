"""``open_catalogue(path)``: the registered source that detects ``path`` reads it."""
from __future__ import annotations

from pathlib import Path

from catalens.ingest.catalogue import Catalogue
from catalens.ingest.sources import SOURCES


def open_catalogue(path: str | Path, source: str | None = None) -> Catalogue:
    """Read a catalogue from ``path`` with the named source, or the one that detects it."""
    # import for registration side effects (each module registers its source)
    from catalens.ingest import bson_source, folder, table  # noqa: F401

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data path '{p}' does not exist; give a photo folder "
                                f"(one subfolder per class) or a dataset file (.yaml)")
    if source is not None:
        return SOURCES.create(source).load(p)
    for name in SOURCES.names():
        src = SOURCES.create(name)
        if src.detect(p):
            return src.load(p)
    raise ValueError(f"'{p}' is neither a photo folder (one subfolder per class, optionally under "
                     f"train/ val/ test/), a dataset file (.yaml/.yml), nor a BSON dump (.bson); "
                     f"known sources: {', '.join(SOURCES.names())}")
