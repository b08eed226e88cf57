"""One name → object registry (timm's ``@register_model`` pattern), shared by every registry in the project.

Backbones, benchmarks, tasks, strategies and weights builders are all picked by name from a
:class:`Registry`; each keeps its old public names (``BACKBONES``, ``register_task``, ``get_task``, …) as the
registry itself or a thin alias, so ``name in R``, ``sorted(R)``, ``R[name]`` and ``R.items()`` keep working.
Stdlib only: the torch-free controller imports registries too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, in registration order.

    Args:
        kind: What the objects are, for error messages (``"backbone"`` → "unknown backbone 'x'").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` as ``name`` (a later registration of the same name replaces it); returns ``obj``."""
        self._items[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@R.register("name")``."""

        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``.

        Raises:
            KeyError: for an unknown name, listing the registered ones.
        """
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` pairs in registration order."""
        return list(self._items.items())

    def values(self) -> list[T]:
        """Registered objects in registration order."""
        return list(self._items.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))  # a copy: registering while iterating is allowed

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._items)})"
