"""Packing documents into fixed-size rows, micro-batches, and the token-normalised loss. Pure functions.

Legend: B rows in a micro-batch, T = data.max_seq_tokens tokens per row, V vocab.

A row holds whole documents back to back, then padding. ``doc_ids [B, T]`` numbers the documents of
a row (0, 1, ...; the padding gets the next number), and the model resets its state at every change
(Mamba conv/SSM state, attention mask), so a packed document sees exactly what it would see alone.
Targets are shifted *within* a document: position j predicts token j+1 of the same document, trained
where that token's assistant mask is 1; a document's last position and padding predict nothing.

Loss normalisation: the loss of an optimizer step is sum(CE over trained tokens of every micro-batch
on every process) / (trained tokens of the step on all processes). Each micro-batch backpropagates
``loss_sum_mb * world_size / n_tokens_step`` (DDP averages gradients over processes, hence the
world_size), so packing, micro-batching and the process count change neither the loss nor the gradient
(tests/sft/test_packing.py checks this against ``reference_loss``, one document at a time).

The stream of micro-batches is a pure function of (samples, seed, global index): documents are packed
once (in a seeded shuffled order), each epoch visits the rows in a seeded permutation, and global
micro-batch i of the run is ``micro_batch_at(i)``. The data cursor of a checkpoint is that index.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100  # target of a position that is not trained (cross_entropy's ignore_index)

__all__ = [
    "IGNORE", "pack_rows", "shift_targets", "build_micro_batch", "loss_sum", "MicroBatchStream", "reference_loss",
]


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit: document k goes into the first row with room for it, else a new row. Order is kept."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k, n in enumerate(lengths):
        if n > row_tokens:
            raise ValueError(f"document {k} has {n} tokens, more than a row ({row_tokens}); filter it out first")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(k)
                room[r] -= n
                break
        else:
            rows.append([k])
            room.append(row_tokens - n)
    return rows


def shift_targets(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """targets[j] = ids[j+1] where mask[j+1] == 1, else IGNORE; the last position predicts nothing."""
    return [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


def build_micro_batch(docs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: Sequence[Sequence[int]],
                      row_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``targets``, ``doc_ids`` (all [B, T] int64) and ``valid`` ([B, T] bool: not padding) for
    ``rows`` of (ids, mask) documents."""
    B = len(rows)
    input_ids = torch.full((B, row_tokens), pad_id, dtype=torch.long)
    targets = torch.full((B, row_tokens), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((B, row_tokens), dtype=torch.long)
    valid = torch.zeros((B, row_tokens), dtype=torch.bool)
    for b, row in enumerate(rows):
        t = 0
        for d, k in enumerate(row):
            ids, mask = docs[k]
            n = len(ids)
            input_ids[b, t:t + n] = torch.as_tensor(ids)
            targets[b, t:t + n] = torch.as_tensor(shift_targets(ids, mask))
            doc_ids[b, t:t + n] = d
            t += n
        doc_ids[b, t:] = len(row)  # padding is a document of its own
        valid[b, :t] = True
    return {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids, "valid": valid}


def loss_sum(logits_btv: torch.Tensor, targets_bt: torch.Tensor) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over trained positions, in fp32."""
    return F.cross_entropy(logits_btv.flatten(0, 1).float(), targets_bt.flatten(), ignore_index=IGNORE, reduction="sum")


def model_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss_sum`` of the model on a micro-batch, with lm_head and the cross-entropy at the trained
    positions only (inside the model's forward, as a sharded model needs): a multi-turn conversation is
    mostly user and tool tokens, whose logits no loss reads."""
    targets = batch["targets"]
    where = (targets != IGNORE).nonzero(as_tuple=True)

    def head(h_btd, w_vd):
        logits_nv = F.linear(h_btd[where], w_vd).float()
        return F.cross_entropy(logits_nv, targets[where], reduction="sum")

    # padding is left out of the MoE load (the balance update would push the experts it routes to away)
    return model(batch["input_ids"], doc_ids=batch["doc_ids"], head=head, load_mask=batch.get("valid")).head


class MicroBatchStream:
    """Global micro-batch i of a run, deterministically, for any i (the resumable data cursor)."""

    def __init__(self, docs: Sequence[tuple[Sequence[int], Sequence[int]]], row_tokens: int, rows_per_micro_batch: int,
                 seed: int, pad_id: int):
        self.docs, self.row_tokens, self.pad_id = docs, row_tokens, pad_id
        self.rows_per_micro_batch, self.seed = rows_per_micro_batch, seed
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        packed = pack_rows([len(docs[k][0]) for k in order], row_tokens)
        self.rows = [[order[j] for j in row] for row in packed]  # doc indices per row
        self.micro_batches_per_epoch = -(-len(self.rows) // rows_per_micro_batch)
        self._epoch, self._perm = -1, []

    def fill(self) -> float:
        """Fraction of row tokens that are document tokens (1 - padding)."""
        used = sum(len(self.docs[k][0]) for row in self.rows for k in row)
        return used / (len(self.rows) * self.row_tokens)

    def micro_batch_at(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(index, self.micro_batches_per_epoch)
        if epoch != self._epoch:
            self._perm = list(range(len(self.rows)))
            random.Random(self.seed * 100_003 + epoch).shuffle(self._perm)
            self._epoch = epoch
        picked = self._perm[i * self.rows_per_micro_batch:(i + 1) * self.rows_per_micro_batch]
        return build_micro_batch(self.docs, [self.rows[r] for r in picked], self.row_tokens, self.pad_id)


def reference_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor],
                   docs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> torch.Tensor:
    """The naive twin: every document alone, unpadded, no doc ids; mean CE over all trained tokens."""
    total, count = 0.0, 0
    for ids, mask in docs:
        ids_t = torch.as_tensor([list(ids)])
        targets = torch.as_tensor([shift_targets(ids, mask)])
        total = total + loss_sum(logits_fn(ids_t), targets)
        count += int((targets != IGNORE).sum())
    return total / count
