"""File modes: files catalens writes get the mode the user's umask gives, like any other program.

Some writers create files 0600 whatever the umask (``tempfile.mkstemp``, safetensors'
``save_file``), so another user or a server account could not read the weights. Call
:func:`apply_umask_mode` on such a file once it is written.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (from /proc where available: reading it there changes nothing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _LOCK:  # os.umask can only be read by setting it: do so briefly, once at a time
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask_mode(path: str | Path, executable: bool = False) -> None:
    """Set ``path`` to 0666 (0777 when ``executable``) less the umask, as ``open()`` would have."""
    os.chmod(path, (0o777 if executable else 0o666) & ~current_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace`` (never half a file).

    The folder is created when missing; the temporary file is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
