"""The ``catalens`` command: a thin layer over the library API.

Each sub-command lives in its own module under :mod:`catalens.commands` and exposes
``register(subparsers)``; modules are discovered, so a stage adds a command by adding a file.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from catalens import commands
from catalens.runtime import MALLOC_ENV, tune_malloc_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalens", description="Product photos to categories and tags.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"catalens.commands.{info.name}").register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"catalens {version('catalens')}"
    except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not pip-installed
        from catalens import __version__

        return f"catalens {__version__} (source tree, not installed)"


def _reexec_with_malloc_tuning(argv: list[str]) -> None:
    """glibc reads MALLOC_* only at start-up: re-run once with them set (1.3-2.7x faster)."""
    if os.environ.get("CATALENS_NO_MALLOC_TUNING") or all(k in os.environ for k in MALLOC_ENV):
        return
    if sys.platform != "linux":
        return
    os.execve(sys.executable, [sys.executable, "-m", "catalens", *argv], tune_malloc_env())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message (not the stream of the
    moment the handler was made: tests and embedding applications replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """The CLI's handler: catalens' messages to stderr as plain lines (the library itself only
    logs; a library user configures logging as they like)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("catalens")
    for h in list(root.handlers):
        if getattr(h, "_catalens_cli", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._catalens_cli = True
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (tests pass argv and stay in-process)
        argv = sys.argv[1:]
        _reexec_with_malloc_tuning(argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # OSError: missing, permission, disk full
        if os.environ.get("CATALENS_DEBUG"):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2


def _message(e: Exception) -> str:
    """One line for the user: OS errors say the file and the fix, not ``[Errno 13]``."""
    if isinstance(e, PermissionError) and e.filename:
        return (f"permission denied: '{e.filename}' (check the owner and mode of it and of its folder, "
                f"or choose another path); set CATALENS_DEBUG=1 for the traceback")
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.strerror.lower()}: '{e.filename}'; set CATALENS_DEBUG=1 for the traceback"
    return str(e)
