"""Name -> implementation registries, one per plug-in point.

Each registry also reads a package entry-point group, so an outside package
adds an implementation by declaring, in its own ``pyproject.toml``::

    [project.entry-points."distrib.communicators"]
    myvendor = "myvendor_distrib:MyCommunicator"

Entry points are loaded only when a lookup needs them, so a plug-in's vendor
library is imported only when used.
"""
from __future__ import annotations

from importlib import metadata
from typing import Dict, Generic, Iterator, TypeVar

from .errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of named implementations of one kind."""

    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: Dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str, item: T | None = None, *, replace: bool = False):
        """Register ``item`` under ``name``; usable as a decorator without ``item``."""
        def add(value: T) -> T:
            if not name or not isinstance(name, str):
                raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")
            existing = self._items.get(name)
            if existing is not None and existing is not value and not replace:
                raise ConfigError(
                    f"a {self.kind} named {name!r} is already registered ({existing!r}); "
                    "pick another name or pass replace=True"
                )
            self._items[name] = value
            return value

        return add if item is None else add(item)

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The implementation registered as ``name`` (imports a plug-in on first use)."""
        if name not in self._items:
            self._load_entry_points()
        try:
            return self._resolve(name, self._items[name])
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {known}. An outside package registers "
                f"one through the {self.entry_point_group!r} entry-point group."
            ) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue  # an in-tree registration wins over a same-named plug-in
            self._items[ep.name] = _LazyEntryPoint(ep)  # type: ignore[assignment]

    def _resolve(self, name: str, item):
        """Import a plug-in registered through an entry point, on first use."""
        if isinstance(item, _LazyEntryPoint):
            try:
                loaded = item.entry_point.load()
            except Exception as exc:
                raise ConfigError(
                    f"{self.kind} {name!r} from entry point {item.entry_point.value!r} "
                    f"failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self._items[name] = loaded
            return loaded
        return item


class _LazyEntryPoint:
    def __init__(self, entry_point: metadata.EntryPoint):
        self.entry_point = entry_point

    def __repr__(self) -> str:
        return f"<entry point {self.entry_point.value}>"

