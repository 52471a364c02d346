"""Sources turn what the user points at (a folder, a dataset file, a dump) into a Catalogue.

Sources are registered in :data:`SOURCES`; :func:`catalens.ingest.open.open_catalogue` picks
the first whose ``detect`` accepts the path, or the one named explicitly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from catalens.ingest.catalogue import Catalogue
from catalens.registry import Registry

#: what counts as a photo by its name (listing folders, globs, file arguments)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".heic", ".avif"}


class Source(Protocol):
    """A kind of catalogue: ``detect`` says whether a path is one, ``load`` reads it."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def load(self, path: Path) -> Catalogue: ...


SOURCES: Registry[type] = Registry("source")
