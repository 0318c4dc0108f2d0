"""Fixtures every test folder can use."""

from __future__ import annotations

import pytest


@pytest.fixture
def record_splits(monkeypatch):
    """``record_splits(module, name)``: wraps the eval function ``module.name`` so that each call's ``split``
    argument is appended to the returned list (the call itself goes through)."""

    def install(module, name: str) -> list[str]:
        splits, real = [], getattr(module, name)

        def spy(*args, split, **kwargs):
            splits.append(split)
            return real(*args, split=split, **kwargs)

        monkeypatch.setattr(module, name, spy)
        return splits

    return install
