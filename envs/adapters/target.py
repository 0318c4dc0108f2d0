"""What an adapter wraps, named in code or in a config: a class or factory, or the text ``"module:Name"``.

A wrong target fails when the environment is made, with what was wrong and how to write it; the
message names the adapter, so a config with several of them says which one is broken.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable


def resolve_target(target: Any, what: str) -> Callable[..., Any]:
    """``target`` itself when it is callable; ``"module:Name"`` imported; else ``ValueError`` naming the fix."""
    if callable(target):
        return target
    hint = f"give {what} a class or factory, or its import path as 'module:Name' (e.g. 'my_envs.wordle:WordleEnv')"
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"{what}={target!r} is not a target; {hint}.")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}={target!r}: cannot import {module_name!r} ({err}); install the package that "
                         f"provides it or put its folder on PYTHONPATH.") from None
    obj = getattr(module, attr, None)
    if obj is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        guess = f" Did you mean {module_name}:{close[0]}?" if close else ""
        raise ValueError(f"{what}={target!r}: module {module_name!r} has no {attr!r}.{guess}")
    if not callable(obj):
        raise ValueError(f"{what}={target!r} is a {type(obj).__name__}, not a class or factory; {hint}.")
    return obj
