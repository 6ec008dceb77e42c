"""The one decorator pattern behind every per-kind handler table in `graph` (rules, serialisers, FLOP counters)."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

Handler = TypeVar("Handler", bound=Callable)


def registers_in(table: dict[Any, Callable]) -> Callable[..., Callable[[Handler], Handler]]:
    """A decorator factory: ``@registers(key, ...)`` stores the decorated function in ``table`` under each key."""

    def registers(*keys: Any) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            for key in keys:
                table[key] = handler
            return handler

        return register

    return registers
