"""Shared prefixes in a packed training batch: a prompt stored once, its continuations reading it.

The G samples of a GRPO group start with the same prompt. A packed row can hold that prompt once as a
document of its own and then each sample's continuation as a document that *continues* it
(``doc_parents``: the doc id, in the same row, of the document a position's document continues; -1 for
none). The layers that work token by token (projections, MoE and MLP, norms, lm_head) then see the
prompt's tokens once instead of G times. The layers that mix along the sequence (the Mamba scan and
attention) need each continuation preceded by its prompt: ``SharedPrefixes.apply`` gathers, for every
document, its *virtual sequence* (the parent's positions, then its own) into batches of similar length,
runs the layer's sequence body on them as plain causal sequences, and writes back to each position the
output of the one sequence that owns it (a continuation's own part; the prompt's positions from its first
continuation's sequence, as causal layers give a prefix the same outputs whatever follows it). Every step is an
indexing op, so gradients reach the shared prompt from all its continuations through PyTorch's autograd.

What is computed again per continuation is the prompt's part of the sequence bodies (the Mamba conv and
scan, attention scores), a small share of a layer; the projections around them, the experts and the
lm_head run on each token once. The values equal those of the unshared rows (each continuation's
tokens after its prompt, one sequence) up to float summation order.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch


PADDING = -2  # ``doc_parents`` of a packed row's filler positions


class SharedPrefixes:
    """The virtual sequences of one packed batch, built once per forward and used by every sequence layer.

    ``doc_ids_bt`` [B, T]: document ids (a document is a run of equal ids, as in packing);
    ``parents_bt`` [B, T]: per position, the id of the document (same row) its document continues, -1 for
    none, or ``PADDING`` (-2): a row's filler, which the sequence layers skip (their output there is 0).
    A parent must come before its child in the row and continue nothing itself."""

    def __init__(self, doc_ids_bt: torch.Tensor, parents_bt: torch.Tensor, min_fill: float = 0.85):
        if parents_bt.shape != doc_ids_bt.shape:
            raise ValueError(f"doc_parents shape {tuple(parents_bt.shape)} must equal doc_ids shape {tuple(doc_ids_bt.shape)}")
        b, t = doc_ids_bt.shape
        self.shape = (b, t)
        device = doc_ids_bt.device
        starts = torch.ones(b, t, dtype=torch.bool, device=device)
        starts[:, 1:] = doc_ids_bt[:, 1:] != doc_ids_bt[:, :-1]
        first_t = starts.flatten().nonzero().squeeze(1)
        first = first_t.tolist()
        length = torch.diff(first_t, append=first_t.new_tensor([b * t])).tolist()
        doc = doc_ids_bt.flatten()[first_t].tolist()
        parent = parents_bt.flatten()[first_t].tolist()
        run_of = {(p // t, d): i for i, (p, d) in enumerate(zip(first, doc))}
        seqs = []  # (pieces [(start, length)], where its own part begins)
        self.padding = []  # (start, length) of the fillers
        has_child = {run_of.get((p // t, par)) for p, par in zip(first, parent) if par >= 0}
        owned = set()  # parents whose positions a child's sequence writes
        for i, (p, n, par) in enumerate(zip(first, length, parent)):
            if i in has_child:
                continue  # a parent needs no sequence of its own: its first child's starts with it
            if par == PADDING:
                self.padding.append((p, n))
                continue
            if par < 0:
                seqs.append(([(p, n)], 0))
                continue
            j = run_of.get((p // t, par))
            if j is None or j >= i or parent[j] != -1:
                raise ValueError(f"doc_parents: document {doc[i]} of row {p // t} continues document {par}, which is not an "
                                 "earlier document of that row that continues nothing itself")
            seqs.append(([(first[j], length[j]), (p, n)], length[j] if j in owned else 0))
            owned.add(j)  # the parent's positions are written by its first child's sequence
        self.batches = []  # (positions [n, W], own flat indices into the [n*W] outputs)
        where = []
        for members, width in _length_batches([sum(n for _, n in s[0]) for s in seqs], min_fill):
            idx = torch.empty(len(members), width, dtype=torch.long)
            own = []
            for r, m in enumerate(members):
                pieces, own_from = seqs[m]
                pos = torch.cat([torch.arange(p, p + n) for p, n in pieces])
                idx[r, :len(pos)] = pos
                idx[r, len(pos):] = pos[-1]  # padding after the end: causal layers never read it from a real position
                own.append(torch.arange(r * width + own_from, r * width + len(pos)))
            own_t = torch.cat(own)
            idx = idx.to(device)
            own_t = own_t.to(device)
            self.batches.append((idx, own_t))
            where.append(idx.flatten().index_select(0, own_t))
        if self.padding:
            where.append(torch.cat([torch.arange(p, p + n) for p, n in self.padding]).to(device))
        written = torch.cat(where)
        if written.numel() != b * t:
            raise ValueError("doc_parents: every position must belong to exactly one document")
        self.order = torch.argsort(written)  # outputs in batch order -> position order
        # one gather for every batch's inputs, and one for the outputs: per layer one index_select each
        # way (and one zero-filled gradient each), not one per batch of sequences
        self.gather = torch.cat([idx.flatten() for idx, _ in self.batches] or [torch.zeros(0, dtype=torch.long, device=device)])
        self.sizes = [idx.numel() for idx, _ in self.batches]
        owners = [own + off for (_, own), off in zip(self.batches, itertools.accumulate(self.sizes, initial=0))]
        n_pad = sum(n for _, n in self.padding)
        if n_pad:  # the fillers read one zero row after the batches' outputs
            owners.append(torch.full((n_pad,), sum(self.sizes), dtype=torch.long, device=device))
        self.scatter = torch.cat(owners).index_select(0, self.order)

    def padded_scores(self) -> int:
        """Attention scores the batches hold, padding included: sequences x width^2 summed over the batches."""
        return sum(idx.shape[0] * idx.shape[1] ** 2 for idx, _ in self.batches)

    def apply(self, body: Callable[..., torch.Tensor], *xs_bt: torch.Tensor) -> torch.Tensor:
        """``body`` over every virtual sequence: each ``x`` [B, T, ...] is gathered to [n, W, ...] per batch of
        sequences, ``body(*gathered)`` -> [n, W, ...] (a causal sequence layer: position j reads positions <= j
        only), and each position gets its owner's output -> [B, T, ...]."""
        b, t = self.shape
        gathered = [x.reshape(b * t, *x.shape[2:]).index_select(0, self.gather).split(self.sizes) for x in xs_bt]
        outs = []
        for k, (idx, _) in enumerate(self.batches):
            ys = body(*(g[k].view(*idx.shape, *g[k].shape[1:]) for g in gathered))
            outs.append(ys.reshape(-1, *ys.shape[2:]))
        if self.padding:
            outs.append(outs[0].new_zeros(1, *outs[0].shape[1:]))
        out = torch.cat(outs).index_select(0, self.scatter)
        return out.view(b, t, *out.shape[1:])


def _length_batches(lengths: list[int], min_fill: float) -> list[tuple[list[int], int]]:
    """(member indices, padded width) per batch: longest first, each batch down to ``min_fill`` of its first."""
    out: list[tuple[list[int], int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and lengths[i] >= min_fill * out[-1][1]:
            out[-1][0].append(i)
        else:
            out.append(([i], lengths[i]))
    return out
