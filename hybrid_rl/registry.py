"""Named choices in one place: a ``Registry`` per kind of variant, and one error for a name that is not there.

The variants a config picks by name (advantage estimators, KL estimators, policy losses, loss
aggregations, model presets) each live in a ``Registry``: functions register with a decorator, values
are given at construction, and a lookup of an unknown name fails with the one message every choice
uses (``check_name``, also for plain tuples of choices and ``Literal`` config fields): what was given,
the closest valid name, and every valid name.

    POLICY_LOSSES = Registry("policy loss")

    @POLICY_LOSSES.register("grpo")
    def grpo_loss(...): ...

    POLICY_LOSSES.get("gpso")  # UnknownNameError: unknown policy loss 'gpso'. Did you mean 'gspo'? Valid: 'grpo', ...
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterable, TypeVar

__all__ = ["Registry", "UnknownNameError", "check_name"]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not one of the choices; the message suggests the closest and lists them all."""


def check_name(kind: str, name: Any, choices: Iterable[Any]) -> None:
    """Raise ``UnknownNameError`` unless ``name`` is one of ``choices`` (``kind`` says what is being named)."""
    choices = list(choices)
    if name in choices:
        return
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1) if isinstance(name, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(map(repr, choices)) or 'none registered'}.")


class Registry(Generic[T]):
    """Name -> variant, in registration order. ``kind`` names the variants in errors ("policy loss")."""

    def __init__(self, kind: str, items: dict[str, T] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        for name, item in (items or {}).items():
            self.register(name)(item)

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that adds the decorated object under ``name``; a name is registered once."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        """The variant called ``name``; ``UnknownNameError`` (a ValueError) naming the closest one otherwise."""
        check_name(self.kind, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)
