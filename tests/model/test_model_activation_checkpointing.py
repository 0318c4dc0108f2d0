"""Activation checkpointing per block: same values, gradients and expert loads; less kept for the backward."""

import copy

import pytest
import torch

from hybrid_rl.model import HybridConfig, HybridLM


def saved_bytes(model, ids) -> tuple[int, torch.Tensor]:
    """Bytes the autograd graph keeps for the backward of one training forward, and the loss."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).logits.logsumexp(-1).mean()
    return total, loss


@pytest.mark.parametrize("impl", ["fast", "torch", "reference"])
def test_checkpointed_blocks_give_the_same_values_gradients_and_expert_loads(impl):
    torch.manual_seed(0)
    plain = HybridLM(HybridConfig.from_preset("micro"), impl=impl)
    ckpt = copy.deepcopy(plain).set_activation_checkpointing(True)
    ids = torch.randint(0, 300, (2, 40))
    results = []
    for model in (plain, ckpt):
        out = model(ids, record_routing=True)
        out.logits.logsumexp(-1).mean().backward()
        results.append((out.logits.detach(), out.routed_experts,
                        {n: p.grad for n, p in model.named_parameters()},
                        [model.backbone.layers[i].mixer.expert_load.clone() for i in model.moe_layers]))
    (la, ra, ga, ea), (lb, rb, gb, eb) = results
    assert torch.equal(la, lb) and torch.equal(ra, rb)
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=0, msg=name)
    for a, b in zip(ea, eb):  # the recompute does not count the loads a second time
        assert torch.equal(a, b) and a.sum() > 0


def test_checkpointing_keeps_less_for_the_backward_and_is_off_without_grad(monkeypatch):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro"))
    ids = torch.randint(0, 300, (2, 256))
    plain_bytes, _ = saved_bytes(model, ids)
    ckpt_bytes, _ = saved_bytes(model.set_activation_checkpointing(True), ids)
    # a block keeps its [B, T, D] input instead of its internals (Mamba scan states, expert dispatch, MLP)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():  # scoring and decoding never go through checkpoint
        model(ids[:, :32])
    assert calls == []
    model(ids[:, :32])  # the training forward checkpoints every block
    assert len(calls) == len(model.backbone.layers)
