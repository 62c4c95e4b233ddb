"""One registry shape for every pluggable kind (models, heads, readers, labelers, tasks), after timm's
`register_model` / `create_model`: a name maps to one entry, registered where the thing is defined, looked up by
name with an error that lists the choices. Nothing picks an implementation with an ``if name == ...`` branch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in errors: "model", "head", "reader", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a second registration of one name is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice; registry names must be unique.")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add` (for classes and functions)."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: str) -> T:
        """The entry of `name`; ValueError listing the registered names when there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of {self.names()}.") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
