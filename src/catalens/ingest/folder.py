"""Photo folder source: one subfolder per class, optionally under train/ val/ test/."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from catalens.ingest.catalogue import SPLIT_ALIASES, Catalogue, class_tasks_from_frame
from catalens.ingest.images import PROBLEM_FIXES
from catalens.ingest.sources import IMAGE_SUFFIXES, SOURCES

TASK = "label"
log = logging.getLogger(__name__)


def _split_dirs(root: Path) -> dict[str, Path]:
    return {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir())
            if d.is_dir() and d.name.lower() in SPLIT_ALIASES}


def _is_image_name(p: Path) -> bool:
    """Every non-hidden file, broken links included (reported as ``missing``, not skipped)."""
    return (p.is_file() or p.is_symlink()) and not p.name.startswith(".")


@SOURCES.register("folder")
class FolderSource:
    """``ROOT/<class>/<image>`` or ``ROOT/<split>/<class>/<image>``.

    Every file below a class folder is listed (not only known image suffixes), so a
    stray non-image is reported by validation instead of silently ignored.
    """

    name = "folder"

    def detect(self, path: Path) -> bool:
        return path.is_dir()

    def load(self, path: Path) -> Catalogue:
        splits = _split_dirs(path)
        roots = splits.items() if splits else [(None, path)]
        rows, empty = [], []
        for split, sdir in roots:
            for cdir in sorted(d for d in sdir.iterdir() if d.is_dir() and not d.name.startswith(".")):
                files = sorted(filter(_is_image_name, cdir.rglob("*")))
                if not files:
                    empty.append(cdir)
                for f in files:
                    rel = f.relative_to(path).as_posix()
                    rows.append({"id": rel, "product_id": rel, "path": str(f), "split": split,
                                 "text": None, TASK: cdir.name})
        if not rows:
            images = [f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
            hint = (f" It holds {len(images)} images directly: put each class in its own subfolder."
                    if images else "")
            raise ValueError(f"photo folder '{path}' has no class subfolders with files; expected "
                             f"{path}/<class>/<image> or {path}/train/<class>/<image>.{hint}")
        frame = pd.DataFrame(rows)
        frame.insert(5, "row", range(len(frame)))
        tasks = class_tasks_from_frame(frame, [(TASK, None)])
        for d in empty:
            log.warning("class folder '%s' holds no files: class '%s' gets no images from it", d, d.name)
        return Catalogue(frame=frame, tasks=tasks, root=path, source=self.name,
                         meta={"splits_from": "folders" if splits else None,
                               "source_problems": [_empty_folder(d) for d in empty]})


def _empty_folder(d: Path) -> dict:
    """An empty class folder as a problems.csv line (no row: it holds none)."""
    return {"row": None, "id": "", "path": str(d), "problem": "empty_folder",
            "detail": f"class folder '{d.name}' holds no files",
            "fix": PROBLEM_FIXES["empty_folder"]}
