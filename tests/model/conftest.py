"""Fixtures for the model tests (helpers live in model_test_utils.py: a unique module name)."""

import pytest
import torch

from hybrid_rl.model import HybridLM
from model_test_utils import randomize, small_config


@pytest.fixture
def make_model():
    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return randomize(HybridLM(small_config(**overrides)), seed).eval()

    return make
