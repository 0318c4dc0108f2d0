"""Policy losses and aggregation: fast vs naive twin, ratio 1 on policy, micro-batch split invariance."""

from __future__ import annotations

import pytest
import torch

from rl.losses import (
    AGGREGATIONS, NAIVE, POLICY_LOSSES, ClipRange, aggregate_loss, aggregate_loss_naive, get_policy_loss,
    token_entropy, token_logprobs, token_logprobs_naive,
)

CLIP = ClipRange(low=0.2, high=0.28)


def _batch(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well past the clip range
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[0] = 0  # a sequence with no action token
    return logp, old, adv, mask


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_fast_matches_naive_values_and_gradients(name, mode):
    logp, old, adv, mask = _batch()
    n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
    l1 = logp.clone().requires_grad_(True)
    l2 = logp.clone().requires_grad_(True)
    loss_fast, _ = POLICY_LOSSES[name](l1, old, adv, mask, CLIP)
    loss_naive = NAIVE[name](l2, old, adv, mask, CLIP)
    torch.testing.assert_close(loss_fast, loss_naive)
    agg_fast = aggregate_loss(loss_fast, mask, mode, n_tok, n_seq)
    agg_naive = aggregate_loss_naive(loss_naive, mask, mode, n_tok, n_seq)
    torch.testing.assert_close(agg_fast, agg_naive)
    agg_fast.backward()
    agg_naive.backward()
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
def test_first_on_policy_step_has_ratio_one_and_reinforce_gradient(name):
    # old = detached current log-probs: nothing clipped, and the gradient is the REINFORCE gradient
    logp, _, adv, mask = _batch()
    l1 = logp.clone().requires_grad_(True)
    l2 = logp.clone().requires_grad_(True)
    loss, clipped = POLICY_LOSSES[name](l1, l1.detach(), adv, mask, CLIP)
    assert not clipped.any()
    torch.testing.assert_close(loss, -adv[:, None] * mask)  # ratio exactly 1
    mode = "seq-mean-token-mean" if name == "gspo" else "token-mean"
    aggregate_loss(loss, mask, mode, float(mask.sum()), 6.0).backward()
    ref, _ = POLICY_LOSSES["reinforce"](l2, l2.detach(), adv, mask, CLIP)
    aggregate_loss(ref, mask, mode, float(mask.sum()), 6.0).backward()
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batch_split_does_not_change_the_gradient(name, mode):
    logp, old, adv, mask = _batch(seed=3, b=8)
    n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
    whole = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES[name](whole, old, adv, mask, CLIP)
    aggregate_loss(loss, mask, mode, n_tok, n_seq).backward()
    split = logp.clone().requires_grad_(True)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven micro-batches, gradients accumulate
        loss, _ = POLICY_LOSSES[name](split[rows], old[rows], adv[rows], mask[rows], CLIP)
        aggregate_loss(loss, mask[rows], mode, n_tok, n_seq).backward()
    torch.testing.assert_close(whole.grad, split.grad)


def test_clip_higher_is_asymmetric():
    logp = torch.log(torch.tensor([[1.25, 0.75]], dtype=torch.float64))  # ratios 1.25 and 0.75 against old = 0
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    pos, neg = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    _, clipped_sym = POLICY_LOSSES["grpo"](logp, old, pos, mask, CLIP)
    _, clipped_hi = POLICY_LOSSES["dapo"](logp, old, pos, mask, CLIP)
    assert clipped_sym.tolist() == [[True, False]]  # 1.25 > 1.2 clipped for a positive advantage
    assert clipped_hi.tolist() == [[False, False]]  # 1.25 < 1.28: clip-higher lets it through
    _, clipped_neg = POLICY_LOSSES["dapo"](logp, old, neg, mask, CLIP)
    assert clipped_neg.tolist() == [[False, True]]  # 0.75 < 0.8 clipped for a negative advantage


def test_token_logprobs_and_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    torch.testing.assert_close(token_logprobs(logits, targets), token_logprobs_naive(logits, targets))
    uniform = torch.zeros(1, 1, 11)
    torch.testing.assert_close(token_entropy(uniform), torch.log(torch.tensor([[11.0]])))


def test_unknown_names_suggest():
    with pytest.raises(ValueError, match="Did you mean 'gspo'"):
        get_policy_loss("gpso")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "token_mean", 1, 1)
