"""Packing, micro-batching and loss normalisation against the naive twin (one document at a time).

Uses a tiny causal model that honours ``doc_ids`` (a fake, so that these tests check the packing
machinery alone); tests/sft/test_train.py repeats the invariance with the real HybridLM.
"""

from __future__ import annotations

import random

import pytest
import torch

from hybrid_rl.sft.packing import IGNORE, MicroBatchStream, build_micro_batch, loss_sum, pack_rows, reference_loss, shift_targets


class DocCausalLM(torch.nn.Module):
    """logits[t] = head(mean of embeddings of the same document's positions <= t); no padding leaks."""

    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, doc_ids=None):
        B, T = input_ids.shape
        doc_ids = torch.zeros_like(input_ids) if doc_ids is None else doc_ids
        h = self.emb(input_ids)  # [B, T, D]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # [B, T, T]
        w = same.float() / same.float().sum(-1, keepdim=True)
        return self.head(w @ h)


def _docs(n: int, seed: int = 0, vocab: int = 40, max_len: int = 30):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(2, max_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        mask = [0] * length
        for start in range(1, length, 7):  # a few assistant spans per document
            for j in range(start, min(length, start + rng.randint(1, 4))):
                mask[j] = 1
        docs.append((ids, mask))
    return docs


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_pack_rows_matches_a_naive_first_fit_and_keeps_every_doc_once():
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = pack_rows(lengths, 64)
    # naive twin: try rows in order for every doc, recomputing the free room from scratch
    naive: list[list[int]] = []
    for k, n in enumerate(lengths):
        for row in naive:
            if sum(lengths[j] for j in row) + n <= 64:
                row.append(k)
                break
        else:
            naive.append([k])
    assert rows == naive
    assert sorted(k for row in rows for k in row) == list(range(200))
    assert all(sum(lengths[k] for k in row) <= 64 for row in rows)
    with pytest.raises(ValueError, match="more than a row"):
        pack_rows([65], 64)


def test_shift_targets_trains_only_masked_next_tokens():
    assert shift_targets([5, 6, 7, 8], [0, 0, 1, 1]) == [IGNORE, 7, 8, IGNORE]


def test_build_micro_batch_layout():
    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    b = build_micro_batch(docs, [[0, 1]], row_tokens=8, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert b["targets"].tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert b["valid"].tolist() == [[True] * 5 + [False] * 3]


@pytest.mark.parametrize("row_tokens, rows_per_mb", [(64, 1), (64, 3), (128, 2), (40, 8)])
def test_packed_micro_batched_loss_and_grads_equal_one_doc_at_a_time(row_tokens, rows_per_mb):
    torch.manual_seed(0)
    model = DocCausalLM()
    docs = _docs(25)
    ref = reference_loss(lambda x: model(x), docs)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad()

    stream = MicroBatchStream(docs, row_tokens, rows_per_mb, seed=3, pad_id=0)
    batches = [stream.micro_batch_at(i) for i in range(stream.micro_batches_per_epoch)]
    n_tokens = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    total = 0.0
    for b in batches:  # gradient accumulation: each micro-batch scaled by the step's token count
        loss = loss_sum(model(b["input_ids"], doc_ids=b["doc_ids"]), b["targets"]) / n_tokens
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(_grads(model), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_train_step_of_two_processes_averages_to_the_one_process_gradient():
    """``train_step``'s loss scale (process count / the whole step's trained tokens) against what DDP does
    with the processes' gradients (their mean): each rank of two runs its half of the step's micro-batches,
    and the mean of their gradients is the gradient of the one-process step over all of them."""
    import contextlib

    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.sft.config import SFTTrainConfig
    from hybrid_rl.sft.train import Progress, train_step

    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro"))
    stream = MicroBatchStream(_docs(16, seed=2), 64, 1, seed=0, pad_id=0)
    step_tokens = sum(int((stream.micro_batch_at(i)["targets"] != IGNORE).sum()) for i in range(4))

    class Rank:  # one of `world` processes; its first sum (the step's token count) is over all of them
        device = torch.device("cpu")

        def __init__(self, rank, world):
            self.rank, self.world, self.sums = rank, world, 0

        def sum(self, values):
            self.sums += 1
            return [step_tokens] if self.sums == 1 else values

        def no_sync(self, last):
            return contextlib.nullcontext()

        def autocast(self):
            return contextlib.nullcontext()

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, params, max_norm):
            return 0.0

    class Capture:  # the optimizer: keeps the gradient it is asked to apply
        param_groups = [{}]

        def step(self):
            self.grads = [p.grad.clone() for p in model.parameters()]

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    def step_grads(rank, world):
        opt = Capture()
        out = train_step(model, opt, Rank(rank, world), stream, Progress(), SFTTrainConfig(grad_accum_steps=4 // world))
        assert out["tokens"] == step_tokens
        return opt.grads

    single = step_grads(0, 1)
    ranks = [step_grads(r, 2) for r in range(2)]
    assert any(not torch.allclose(a, b) for a, b in zip(*ranks))  # the two halves differ
    for s, r0, r1 in zip(single, *ranks):
        torch.testing.assert_close((r0 + r1) / 2, s, rtol=1e-4, atol=1e-7)


def test_stream_is_deterministic_covers_each_row_once_per_epoch_and_reshuffles():
    docs = _docs(40, seed=5)
    a = MicroBatchStream(docs, 64, 2, seed=7, pad_id=0)
    b = MicroBatchStream(docs, 64, 2, seed=7, pad_id=0)
    n = a.micro_batches_per_epoch
    for i in (0, 3, n - 1, n, 2 * n + 1):
        assert torch.equal(a.micro_batch_at(i)["input_ids"], b.micro_batch_at(i)["input_ids"])
    tokens = sum(int((a.micro_batch_at(i)["doc_ids"] >= 0).sum()) for i in range(n))
    assert tokens == len(a.rows) * 64
    epoch0 = [a.micro_batch_at(i)["input_ids"] for i in range(n)]
    epoch1 = [a.micro_batch_at(n + i)["input_ids"] for i in range(n)]
    assert sorted(map(lambda t: t.sum().item(), torch.cat(epoch0))) == sorted(map(lambda t: t.sum().item(), torch.cat(epoch1)))
    assert any(not torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    assert 0.5 < a.fill() <= 1.0


@pytest.mark.parametrize("impl", ["torch", "fast"])
def test_padding_does_not_count_toward_the_moe_load(impl):
    """One 16-token document in a 128-token row: each MoE layer counts 16 x k routed pairs, not 128 x k (the padding
    would look like load on the experts it routes to, and the balance update would push them away)."""
    from hybrid_rl.model import HybridConfig, HybridLM
    from hybrid_rl.sft.packing import model_loss_sum

    model = HybridLM(HybridConfig.from_preset("micro"), impl=impl)
    ids = list(range(3, 19))
    batch = build_micro_batch([(ids, [0] * 8 + [1] * 8)], [[0]], row_tokens=128, pad_id=0)
    assert batch["valid"].sum() == 16
    model_loss_sum(model, batch).backward()
    k = model.config.num_experts_per_tok
    loads = [float(model.backbone.layers[i].mixer.expert_load.sum()) for i in model.moe_layers]
    assert loads and all(load == 16 * k for load in loads), loads
