"""Trajectories -> padded training tensors, and the split of a step's batch into micro-batches.

A trajectory is one flat token sequence (prompt, actions, observations); the model predicts token t+1
at position t, so a row of length T gives T-1 training positions:

    input_ids_bt      [B, T-1]  tokens 0..T-2 (right-padded with pad_id)
    target_ids_bt     [B, T-1]  tokens 1..T-1
    action_mask_bt    [B, T-1]  1 where the target was sampled by the policy (is_action), 0 elsewhere/padding
    rollout_logp_bt   [B, T-1]  the rollout's log-prob of each target action token (plain softmax)
    adv_b             [B]       the episode's advantage
    routing_btlk      [B, T-1, n_moe_layers, k]  experts the rollout used at each input position (or None)

Micro-batches hold whole episodes, longest first, so that rows of similar length share padding; each
holds at most ``micro_batch_tokens`` padded tokens (rows x longest row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids_bt: torch.Tensor
    target_ids_bt: torch.Tensor
    action_mask_bt: torch.Tensor
    rollout_logp_bt: torch.Tensor
    adv_b: torch.Tensor
    routing_btlk: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.input_ids_bt.shape[0]

    def rows(self, index) -> "Batch":
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Batch(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(trajectories, advantages, pad_id: int = 0, with_routing: bool = False) -> Batch:
    """Pad ``trajectories`` (each with ``token_ids``, ``is_action``, ``logprobs``, ``routed_experts``) to one batch."""
    t = max(len(tr.token_ids) for tr in trajectories) - 1
    b = len(trajectories)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    target_ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t)
    logp = torch.zeros(b, t)
    routing = None
    if with_routing:
        first = next(tr.routed_experts for tr in trajectories if tr.routed_experts)
        routing = torch.zeros(b, t, len(first[0]), len(first[0][0]), dtype=torch.long)
    for i, tr in enumerate(trajectories):
        n = len(tr.token_ids) - 1
        ids = torch.as_tensor(tr.token_ids, dtype=torch.long)
        input_ids[i, :n], target_ids[i, :n] = ids[:-1], ids[1:]
        mask[i, :n] = torch.as_tensor(tr.is_action[1:], dtype=torch.float32)
        logp[i, :n] = torch.as_tensor(tr.logprobs[1:], dtype=torch.float32)
        if routing is not None:
            if not tr.routed_experts:
                raise ValueError(f"routing replay is on but the trajectory of {tr.env_id} seed {tr.seed} has no routed_experts; "
                                 "the rollout must record routing (it does when algo.routing_replay=true)")
            routing[i, :n] = torch.as_tensor(tr.routed_experts[:n], dtype=torch.long)
    return Batch(input_ids, target_ids, mask, logp, torch.as_tensor(advantages, dtype=torch.float32), routing)


def micro_batches(lengths: list[int], micro_batch_tokens: int) -> list[list[int]]:
    """Indices of each micro-batch: longest first, greedily, rows x longest <= micro_batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= micro_batch_tokens:
            out[-1].append(i)
        else:
            if lengths[i] > micro_batch_tokens:
                raise ValueError(f"an episode of {lengths[i]} tokens does not fit in micro_batch_tokens={micro_batch_tokens}; "
                                 "raise train.micro_batch_tokens or lower rollout.max_episode_tokens")
            out.append([i])
    return out


def trim(batch: Batch) -> Batch:
    """Drop the columns after the last action token: a causal model's earlier positions do not see them,
    and no loss term reads them (the episode's closing observation, padding)."""
    keep = int(batch.action_mask_bt.nonzero()[:, 1].max()) + 1 if batch.action_mask_bt.any() else 1
    pick = lambda x: None if x is None or x.dim() < 2 else x[:, :keep]  # noqa: E731
    return Batch(pick(batch.input_ids_bt), pick(batch.target_ids_bt), pick(batch.action_mask_bt),
                 pick(batch.rollout_logp_bt), batch.adv_b, pick(batch.routing_btlk))
