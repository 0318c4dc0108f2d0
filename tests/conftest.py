"""Fixtures every test folder can use."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts on the thread count the session started with: benchmarks run in-process set it (bench grpo,
    bench model), and a later test's float sums would follow it (a pipeline run's SFT losses parted at step 20)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


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
