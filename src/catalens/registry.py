"""A small named registry with factories, as in timm's ``create_model``.

Every pluggable family (backbones, sources, heads, runtimes) is a :class:`Registry`.
An unknown name fails with the closest registered names, so a typo tells the user
what they meant.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a registry has no entry of the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """Registered names closest to ``name`` (case-insensitive, best first)."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    sub = [c for c in candidates if name.lower() in c.lower() and c not in hits]
    return [lowered[h] for h in hits] + sub[: max(0, n - len(hits))]


def unknown_name_message(kind: str, name: str, candidates: list[str]) -> str:
    """The text of an unknown-name error: what arrived, what exists, the fix."""
    matches = close_matches(name, candidates)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    listing = ", ".join(sorted(candidates)[:30]) + (" ..." if len(candidates) > 30 else "")
    return f"unknown {kind} '{name}'.{hint} Known {kind}s: {listing}"


class Registry(Generic[T]):
    """Maps names to factories. ``register`` is a decorator; ``create`` builds one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, list(self._entries))) from None

    def create(self, name: str, *args, **kwargs):
        """Call the factory registered as ``name``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
