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

Shared prompts (``train.share_prefixes``, with packing): the samples of a group start with the same prompt,
which ``share_units`` / ``pack`` store once per row, its episodes' remaining positions after it as documents
that continue it (``doc_parents_bt``, model/shared.py): the token-wise layers see the prompt once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_rl.model.shared import PADDING


@dataclass
class Batch:
    input_ids_bt: torch.Tensor
    target_ids_bt: torch.Tensor
    action_mask_bt: torch.Tensor
    rollout_logp_bt: torch.Tensor
    adv_bt: torch.Tensor
    routing_btlk: torch.Tensor | None = None
    doc_ids_bt: torch.Tensor | None = None
    doc_parents_bt: torch.Tensor | None = None  # shared prompts: the document each position's document continues
    real_bt: torch.Tensor | None = None  # [B, T] bool: the positions holding an episode's token, not padding (MoE load)
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


TENSOR_FIELDS = ("input_ids_bt", "target_ids_bt", "action_mask_bt", "rollout_logp_bt", "adv_bt", "routing_btlk", "doc_ids_bt",
                 "doc_parents_bt", "real_bt")


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
    real = torch.zeros(b, t, dtype=torch.bool)
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
        real[i, :n] = True
        logp[i, :n] = torch.as_tensor(tr.sample_logprobs[1:], dtype=torch.float32)
        a = advantages[i]
        adv[i, :n] = torch.as_tensor(a[1:], dtype=torch.float32) if isinstance(a, (list, tuple)) else mask[i, :n] * float(a)
        if routing is not None:
            if not tr.routed_experts:
                raise ValueError(f"routing replay is on but the trajectory of {tr.env_id} seed {tr.seed} has no routed_experts; "
                                 "the rollout must record routing (it does when algo.routing_replay=true)")
            routing[i, :n] = torch.as_tensor(tr.routed_experts[:n], dtype=torch.long)
    return Batch(input_ids, target_ids, mask, logp, adv, routing, real_bt=real, norm_tokens=norm_tokens, norm_seqs=norm_seqs)


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


def share_units(batch: Batch, lengths: list[int], cap: int) -> list:
    """What ``packed_plan`` packs when episodes share their prompt (``train.share_prefixes``): an episode index
    alone, or ``(s, [episodes])``, episodes whose first ``s`` input positions are the same tokens and hold no
    action target, stored once in the row (model/shared.py). ``s`` stops before the position that predicts an
    episode's first action token, so every trained position stays in its own episode's part. A unit is at most
    ``cap`` positions long (the micro-batch's tokens): a larger group is cut into several units, each with its
    copy of the prompt."""
    groups: dict[tuple, list[int]] = {}
    units: list = []
    for i, mask in enumerate(batch.action_mask_bt):
        s = int(mask.nonzero()[0]) if mask.any() else 0
        if s >= 2:
            groups.setdefault((s, tuple(batch.input_ids_bt[i, :s].tolist())), []).append(i)
        else:
            units.append(i)
    for (s, _), members in groups.items():
        cur, size = [], s
        for i in sorted(members, key=lambda i: (-lengths[i], i)):
            if cur and size + lengths[i] - s > cap:
                units.append((s, cur) if len(cur) > 1 else cur[0])
                cur, size = [], s
            cur.append(i)
            size += lengths[i] - s
        units.append((s, cur) if len(cur) > 1 else cur[0])
    return units


def unit_length(unit, lengths: list[int]) -> int:
    """Positions a packing unit takes in a row: an episode's trained length, or a shared prompt once plus the rest
    of each of its episodes."""
    if isinstance(unit, int):
        return lengths[unit]
    s, members = unit
    return s + sum(lengths[i] - s for i in members)


def packed_plan(lengths: list[int], micro_batch_tokens: int, units: list | None = None) -> tuple[list[list[list]], int]:
    """(micro-batches of packed rows of units, the row length). A unit is an episode index (the default: every
    episode alone) or a ``share_units`` group. Rows are as long as the longest episode (with shared prompts:
    ``micro_batch_tokens``, one row per micro-batch); units go longest first into the first row with room
    (first-fit decreasing); a micro-batch holds as many rows as fit in ``micro_batch_tokens``."""
    if max(lengths) > micro_batch_tokens:
        raise ValueError(f"an episode of {max(lengths)} tokens does not fit in micro_batch_tokens={micro_batch_tokens}; "
                         "raise train.micro_batch_tokens or lower rollout.max_episode_tokens")
    units = list(range(len(lengths))) if units is None else units
    size = [unit_length(u, lengths) for u in units]
    row_len = max(size)
    if any(not isinstance(u, int) for u in units):
        # shared prompts: the sequence layers run on each document's own sequence whatever the rows, so a
        # micro-batch is one row as long as micro_batch_tokens, and the only filler is at its end
        row_len = max(row_len, micro_batch_tokens)
    rows: list[list] = []
    room: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: (-size[u], u)):
        k = next((k for k, r in enumerate(room) if r >= size[u]), None)
        if k is None:
            rows.append([])
            room.append(row_len)
            k = len(rows) - 1
        rows[k].append(units[u])
        room[k] -= size[u]
    per_mb = max(micro_batch_tokens // row_len, 1)
    return [rows[j:j + per_mb] for j in range(0, len(rows), per_mb)], row_len


def pack(batch: Batch, rows: list[list], lengths: list[int], pad_id: int = 0) -> Batch:
    """The micro-batch of packed ``rows`` (lists of ``packed_plan`` units): each episode's first ``lengths[i]``
    positions back to back, a shared prompt once before the rest of its episodes (``doc_parents_bt``), then
    padding (a document of its own, masked out)."""
    width = max(sum(unit_length(u, lengths) for u in row) for row in rows)
    out = {}
    for f in TENSOR_FIELDS:
        x = getattr(batch, f)
        if f in ("doc_ids_bt", "doc_parents_bt") or x is None:
            continue
        fill = pad_id if f in ("input_ids_bt", "target_ids_bt") else 0
        out[f] = torch.full((len(rows), width, *x.shape[2:]), fill, dtype=x.dtype)
    doc = torch.empty(len(rows), width, dtype=torch.long)
    parent = torch.full((len(rows), width), -1, dtype=torch.long)
    shared = False
    for r, row in enumerate(rows):
        at, d = 0, 0

        def put(i, start, stop, of=-1):  # positions [start, stop) of episode i as document d
            nonlocal at, d
            n = stop - start
            for f, x in out.items():
                x[r, at:at + n] = getattr(batch, f)[i, start:stop]
            doc[r, at:at + n] = d
            parent[r, at:at + n] = of
            at, d = at + n, d + 1

        for unit in row:
            if isinstance(unit, int):
                put(unit, 0, lengths[unit])
                continue
            s, members = unit
            prompt, shared = d, True
            put(members[0], 0, s)
            for i in members:
                put(i, s, lengths[i], of=prompt)
        doc[r, at:] = d
        parent[r, at:] = PADDING  # nothing reads the filler: the shared path's sequence layers skip it
    return Batch(**out, doc_ids_bt=doc, doc_parents_bt=parent if shared else None, norm_tokens=batch.norm_tokens,
                 norm_seqs=batch.norm_seqs)
