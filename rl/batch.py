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
    doc_ids_bt        [B, T]  which episode of a packed row each position belongs to (None: one per row)

``norm_tokens`` / ``norm_seqs`` are the loss normalisers of the whole step: the action tokens and the
episodes of *every* valid episode the step played, including the advantage-0 ones left out of the
batch to save compute, so that the step size does not depend on how many groups were informative.

Micro-batches hold whole episodes, longest first, so that rows of similar length share padding; each
holds at most ``micro_batch_tokens`` padded tokens (rows x longest row).

Packed micro-batches (``train.pack_sequences``, the default with a token-level loss): multi-turn episodes
differ in length by 10x (a FrozenLake episode ends after 1 to 20 turns), so padding every row to the
longest wastes a third of the update's compute. ``packed_plan`` puts whole episodes, cut after their
last action token, back to back into rows as long as the longest one (first-fit, longest first), and
``pack`` builds those rows with ``doc_ids_bt``; the model resets its Mamba state and masks attention at
every episode boundary (as in SFT packing), so each episode's log-probs are those it has alone.
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
    doc_ids_bt: torch.Tensor | None = None
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


TENSOR_FIELDS = ("input_ids_bt", "target_ids_bt", "action_mask_bt", "rollout_logp_bt", "adv_bt", "routing_btlk", "doc_ids_bt")


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
    return Batch(*(pick(getattr(batch, f)) for f in TENSOR_FIELDS), norm_tokens=batch.norm_tokens, norm_seqs=batch.norm_seqs)


def trained_lengths(batch: Batch) -> list[int]:
    """Per row, the positions up to and including its last action target (1 for a row without one)."""
    return [int(m.nonzero().max()) + 1 if m.any() else 1 for m in batch.action_mask_bt]


def packed_plan(lengths: list[int], micro_batch_tokens: int) -> tuple[list[list[list[int]]], int]:
    """(micro-batches of packed rows of episode indices, the row length). Rows are as long as the longest
    episode; episodes go longest first into the first row with room (first-fit decreasing); a micro-batch
    holds as many rows as fit in ``micro_batch_tokens``."""
    row_len = max(lengths)
    if row_len > micro_batch_tokens:
        raise ValueError(f"an episode of {row_len} tokens does not fit in micro_batch_tokens={micro_batch_tokens}; "
                         "raise train.micro_batch_tokens or lower rollout.max_episode_tokens")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            rows.append([])
            room.append(row_len)
            k = len(rows) - 1
        rows[k].append(i)
        room[k] -= lengths[i]
    per_mb = max(micro_batch_tokens // row_len, 1)
    return [rows[j:j + per_mb] for j in range(0, len(rows), per_mb)], row_len


def pack(batch: Batch, rows: list[list[int]], lengths: list[int], pad_id: int = 0) -> Batch:
    """The micro-batch of packed ``rows`` (lists of ``batch`` row indices): each episode's first
    ``lengths[i]`` positions back to back, then padding (a document of its own, masked out)."""
    width = max(sum(lengths[i] for i in row) for row in rows)
    out = {}
    for f in TENSOR_FIELDS:
        x = getattr(batch, f)
        if f == "doc_ids_bt" or x is None:
            continue
        fill = pad_id if f in ("input_ids_bt", "target_ids_bt") else 0
        out[f] = torch.full((len(rows), width, *x.shape[2:]), fill, dtype=x.dtype)
    doc = torch.empty(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            n = lengths[i]
            for f, x in out.items():
                x[r, at:at + n] = getattr(batch, f)[i, :n]
            doc[r, at:at + n] = d
            at += n
        doc[r, at:] = len(row)
    return Batch(**out, doc_ids_bt=doc, norm_tokens=batch.norm_tokens, norm_seqs=batch.norm_seqs)
