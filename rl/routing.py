"""Routing replay (R3, "rollout routing replay"): train on the experts the rollout picked.

A MoE router's top-k is discontinuous: the trainer's forward (another batch shape, another kernel,
weights one update newer in async mode) can pick other experts than the rollout did for the same token,
and then the trainer's log-prob of that token is taken under a different sub-network than the one that
sampled it. The rollout records ``routed_experts`` per token; with ``algo.routing_replay`` the training
forward replays them (``model(..., routing=...)``: same experts, gate weights recomputed so gradients
still reach the router).

The metric ``train/routing_mismatch`` is the fraction of positions where the trainer's own top-k
differs (as a set, in any MoE layer) from the recorded one: how much replay changes.

Shapes: routing_btlk [B, T, n_moe_layers, k] expert ids; mask_bt [B, T] positions to count.
"""

from __future__ import annotations

import torch


def routing_mismatch(recorded_btlk: torch.Tensor, trainer_btlk: torch.Tensor, mask_bt: torch.Tensor) -> tuple[float, float]:
    """(differing positions, counted positions): a position differs when any layer's expert set differs."""
    same_btl = (recorded_btlk.sort(-1).values == trainer_btlk.sort(-1).values).all(-1)
    differs_bt = ~same_btl.all(-1)
    m = mask_bt.bool()
    return float((differs_bt & m).sum()), float(m.sum())


def routing_mismatch_naive(recorded_btlk, trainer_btlk, mask_bt) -> tuple[float, float]:
    differ = counted = 0
    b, t, n_layers, _ = recorded_btlk.shape
    for i in range(b):
        for j in range(t):
            if not mask_bt[i, j]:
                continue
            counted += 1
            differ += any(set(recorded_btlk[i, j, l].tolist()) != set(trainer_btlk[i, j, l].tolist()) for l in range(n_layers))
    return float(differ), float(counted)
