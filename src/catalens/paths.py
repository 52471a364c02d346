"""Guards on the files a command writes: an output never replaces or lands inside an input."""
from __future__ import annotations

from pathlib import Path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: str | Path, inputs, flag: str = "--out") -> None:
    """Refuse ``out`` when it is one of ``inputs`` (files) or lies inside one of them (folders:
    a model folder, a photo folder), naming both and the fix. Globs and missing inputs are skipped."""
    target = Path(out).expanduser().resolve()
    for item in inputs:
        src = Path(str(item)).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if target == src:
            raise ValueError(f"{flag} '{out}' is an input of this command ('{item}'); writing it would destroy the "
                             f"input: choose another file")
        if src.is_dir() and _inside(target, src):
            raise ValueError(f"{flag} '{out}' lies inside the input folder '{item}'; writing there would change that "
                             f"folder (a model folder, or photos that a later run reads as data): choose a path "
                             f"outside it")
