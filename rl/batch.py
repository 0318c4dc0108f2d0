"""Trajectories -> padded training tensors, and the split of a step's batch into micro-batches.

A trajectory is one flat token sequence (prompt, actions, observations); the model predicts token t+1
at position t, so a row of length T gives T-1 training positions:

    input_ids_bt      [B, T-1]  tokens 0..T-2 (right-padded with pad_id)
    target_ids_bt     [B, T-1]  tokens 1..T-1
    action_mask_bt    [B, T-1]  1 where the target was sampled by the policy (is_action), 0 elsewhere/padding
    rollout_logp_bt   [B, T-1]  the rollout's log-prob of each target action token under the distribution
                                it sampled from (``Trajectory.sample_logprobs``: temperature, banned ids,
                                top-k/top-p), which the trainer scores the same way (``hybrid_rl.rl.losses.policy_logprobs``)
    adv_bt            [B, T-1]  the advantage of each target action token (its episode's or its turn's)
    routing_btlk      [B, T-1, n_moe_layers, k]  experts the rollout used at each input position (or None)

``norm_tokens`` / ``norm_seqs`` are the loss normalisers of the whole step: the action tokens and the
episodes of *every* valid episode the step played, including the advantage-0 ones left out of the
batch to save compute, so that the step size does not depend on how many groups were informative.

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
    adv_bt: torch.Tensor
    routing_btlk: torch.Tensor | None = None
    norm_tokens: float = 0.0  # 0 = this batch's own action tokens / rows
    norm_seqs: float = 0.0

    def __post_init__(self):
        self.norm_tokens = self.norm_tokens or float(self.action_mask_bt.sum())
        self.norm_seqs = self.norm_seqs or float(self.num_rows)

    @property
    def num_rows(self) -> int:
        return self.input_ids_bt.shape[0]

    def rows(self, index) -> "Batch":
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Batch(*(pick(getattr(self, f)) for f in TENSOR_FIELDS), norm_tokens=self.norm_tokens, norm_seqs=self.norm_seqs)


TENSOR_FIELDS = ("input_ids_bt", "target_ids_bt", "action_mask_bt", "rollout_logp_bt", "adv_bt", "routing_btlk")


def collate(trajectories, advantages, pad_id: int = 0, with_routing: bool = False,
            norm_tokens: float = 0.0, norm_seqs: float = 0.0) -> Batch:
    """Pad ``trajectories`` (each with ``token_ids``, ``is_action``, ``sample_logprobs``, ``routed_experts``)
    to one batch. ``advantages[i]`` is a number (the episode's, on each of its action tokens) or a list
    aligned with ``token_ids`` (one per token)."""
    t = max(len(tr.token_ids) for tr in trajectories) - 1
    b = len(trajectories)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    target_ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros(b, t)
    logp = torch.zeros(b, t)
    adv = torch.zeros(b, t)
    routing = None
    if with_routing:
        first = next(tr.routed_experts for tr in trajectories if tr.routed_experts)
        routing = torch.zeros(b, t, len(first[0]), len(first[0][0]), dtype=torch.long)
    for i, tr in enumerate(trajectories):
        n = len(tr.token_ids) - 1
        ids = torch.as_tensor(tr.token_ids, dtype=torch.long)
        input_ids[i, :n], target_ids[i, :n] = ids[:-1], ids[1:]
        mask[i, :n] = torch.as_tensor(tr.is_action[1:], dtype=torch.float32)
        logp[i, :n] = torch.as_tensor(tr.sample_logprobs[1:], dtype=torch.float32)
        a = advantages[i]
        adv[i, :n] = torch.as_tensor(a[1:], dtype=torch.float32) if isinstance(a, (list, tuple)) else mask[i, :n] * float(a)
        if routing is not None:
            if not tr.routed_experts:
                raise ValueError(f"routing replay is on but the trajectory of {tr.env_id} seed {tr.seed} has no routed_experts; "
                                 "the rollout must record routing (it does when algo.routing_replay=true)")
            routing[i, :n] = torch.as_tensor(tr.routed_experts[:n], dtype=torch.long)
    return Batch(input_ids, target_ids, mask, logp, adv, routing, norm_tokens=norm_tokens, norm_seqs=norm_seqs)


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
                 pick(batch.rollout_logp_bt), pick(batch.adv_bt), pick(batch.routing_btlk),
                 norm_tokens=batch.norm_tokens, norm_seqs=batch.norm_seqs)
