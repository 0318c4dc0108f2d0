"""Shared builders for the rollout tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from hybrid_rl.model.tokenizer import ByteTokenizer
from rollout_fixtures import ToyLM

TOK = ByteTokenizer()


def make_model(kind: str, seed: int = 0):
    """'toy' (exact recurrent stand-in) or a model preset name ('micro', 'tiny'), fp32."""
    if kind == "toy":
        return ToyLM(vocab_size=TOK.vocab_size, seed=seed)
    from hybrid_rl.model import HybridConfig, HybridLM

    torch.manual_seed(seed)
    return HybridLM(HybridConfig.from_preset(kind)).float().eval()


def forced_close_positions(traj) -> set[int]:
    """Indices of <|end|> tokens the engine appended itself (turn cut at a limit or stop string)."""
    return {i for i, (t, a) in enumerate(zip(traj.token_ids, traj.is_action))
            if t == TOK.end_id and not a and i > 0 and traj.is_action[i - 1]}
