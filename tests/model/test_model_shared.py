"""Shared prefixes (model/shared.py): a prompt stored once in a packed row, its continuations reading it, gives
the values and gradients of the unshared sequences, in every implementation; bad ``doc_parents`` are explained."""

from __future__ import annotations

import pytest
import torch

from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.model.shared import PADDING, SharedPrefixes


def _row(prompt, conts, other, filler):
    """One packed row [prompt | conts... | other | filler] with its doc ids and parents."""
    parts = [(prompt, -1), *[(c, 0) for c in conts], (other, -1)]
    ids = torch.cat([p for p, _ in parts] + [torch.zeros(filler, dtype=torch.long)])
    doc = torch.cat([torch.full((len(p),), d) for d, (p, _) in enumerate(parts)] + [torch.full((filler,), len(parts))])
    par = torch.cat([torch.full((len(p),), of) for p, of in parts] + [torch.full((filler,), PADDING)])
    return ids, doc, par


@pytest.mark.parametrize("impl", ["fast", "torch", "reference"])
def test_shared_prompt_gives_the_values_and_gradients_of_the_unshared_sequences(impl):
    cfg = HybridConfig.from_preset("micro")  # Mamba-2, attention, MoE and MLP layers
    torch.manual_seed(0)
    model = HybridLM(cfg, impl=impl)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 250, (7,), generator=g)
    conts = [torch.randint(3, 250, (n,), generator=g) for n in (5, 9, 1)]
    other = torch.randint(3, 250, (6,), generator=g)
    ids, doc, par = _row(prompt, conts, other, filler=3)
    n_real = len(ids) - 3
    out = model(ids[None], doc_ids=doc[None], doc_parents=par[None]).logits[0]
    weight = torch.randn(out.shape, generator=g)
    shared_grads = torch.autograd.grad((out * weight)[:n_real].sum(), list(model.parameters()), allow_unused=True)

    # the same positions, unshared: each continuation after its own copy of the prompt, the other doc alone
    seqs = [torch.cat([prompt, c]) for c in conts]
    outs = [model(s[None]).logits[0] for s in seqs] + [model(other[None]).logits[0]]
    ref = torch.cat([outs[0][:len(prompt)], *[o[len(prompt):] for o in outs[:3]], outs[3]])
    ref_grads = torch.autograd.grad((ref * weight[:n_real]).sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out[:n_real], ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), shared_grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            # fp32 sums in another order: within 1e-5 of the gradient's scale (observed: up to 4e-6)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item(), msg=name)


def test_rows_without_a_continuation_take_the_plain_packed_path():
    cfg = HybridConfig.from_preset("micro")
    model = HybridLM(cfg)
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    doc = torch.tensor([[0] * 5 + [1] * 7])
    plain = model(ids, doc_ids=doc).logits
    torch.testing.assert_close(model(ids, doc_ids=doc, doc_parents=torch.full_like(doc, -1)).logits, plain, rtol=0, atol=0)


def test_virtual_sequences_cover_every_position_once_and_skip_the_filler():
    ids, doc, par = _row(torch.arange(4), [torch.arange(3), torch.arange(2)], torch.arange(2), filler=2)
    shared = SharedPrefixes(doc[None], par[None], min_fill=0.0)
    (idx, own), = shared.batches  # one batch: the two continuations (the first writes the prompt), the other doc
    assert idx.shape == (3, 7)  # the longest virtual sequence: prompt (4) + continuation (3)
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5, 6] and idx[1].tolist() == [0, 1, 2, 3, 7, 8, 8]  # longest first
    assert shared.padding == [(11, 2)]
    x = torch.arange(13, dtype=torch.float32)[None, :, None]
    out = shared.apply(lambda v: v + 100.0, x)  # an identity body: each position gets its own value back
    assert out[0, :11, 0].tolist() == [v + 100.0 for v in range(11)] and out[0, 11:, 0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("case, parents, message", [
    ("parent in another row", [[-1, -1, 0, 0], [-1, -1, 2, 2]], "not an earlier document of that row"),
    ("parent after its child", [[1, 1, -1, -1], [-1, -1, -1, -1]], "not an earlier document of that row"),
    ("a chain of parents", [[-1, 0, 1, 1], [-1, -1, -1, -1]], "continues nothing itself"),
])
def test_bad_doc_parents_are_explained(case, parents, message):
    model = HybridLM(HybridConfig.from_preset("micro"))
    ids = torch.randint(3, 250, (2, 4), generator=torch.Generator().manual_seed(3))
    doc = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=message):
        model(ids, doc_ids=doc, doc_parents=torch.tensor(parents))
    with pytest.raises(ValueError, match="needs doc_ids"):
        model(ids, doc_parents=torch.tensor(parents))
    with pytest.raises(ValueError, match="must equal doc_ids shape"):
        model(ids, doc_ids=doc, doc_parents=torch.tensor(parents)[:, :3])
