"""Name -> object registries for the extension points (adapters, utilities, priors, methods).

Registration is explicit: each extension module decorates its entry and ``__init__`` imports
the module by name. A duplicate name fails at import time; an unknown name lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from bonsai_prune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small named registry, e.g. ``UTILITIES.register("perplexity")(cls)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            for name in names:
                if name in self._entries:
                    raise RuntimeError(f"{self.kind} {name!r} is registered twice")
                self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names())
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
