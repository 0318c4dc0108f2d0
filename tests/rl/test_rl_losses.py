"""Policy losses and aggregation: fast vs naive twin, ratio 1 on policy, micro-batch split invariance."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hybrid_rl.rl.kl import KL_ESTIMATORS
from hybrid_rl.rl.losses import (
    AGGREGATIONS, COV_LOSSES, NAIVE, POLICY_LOSSES, ClipRange, ScoringDist, aggregate_loss, aggregate_loss_naive,
    policy_logprobs,
)
from hybrid_rl.rollout.sampling import naive_sampling_probs

CLIP = ClipRange(low=0.2, high=0.28)


def _batch(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios well past the clip range
    adv = torch.randn(b, generator=g, dtype=torch.float64)[:, None].repeat(1, t)
    adv[1::2] = torch.randn(b // 2, t, generator=g, dtype=torch.float64)  # per-turn credit: advantages vary along a row
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[0] = 0  # a sequence with no action token
    return logp, old, adv, mask


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_fast_matches_naive_values_and_gradients(name, mode):
    logp, old, adv, mask = _batch()
    n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
    l1 = logp.clone().requires_grad_(True)
    l2 = logp.clone().requires_grad_(True)
    loss_fast, _ = POLICY_LOSSES.get(name)(l1, old, adv, mask, CLIP)
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
    loss, clipped = POLICY_LOSSES.get(name)(l1, l1.detach(), adv, mask, CLIP)
    assert not clipped.any()
    expected = -adv * mask if name != "gspo" else -((adv * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None] * mask
    torch.testing.assert_close(loss, expected)  # ratio exactly 1
    mode = "seq-mean-token-mean" if name == "gspo" else "token-mean"
    aggregate_loss(loss, mask, mode, float(mask.sum()), 6.0).backward()
    ref_adv = adv if name != "gspo" else ((adv * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(adv)
    ref, _ = POLICY_LOSSES.get("reinforce")(l2, l2.detach(), ref_adv, mask, CLIP)
    aggregate_loss(ref, mask, mode, float(mask.sum()), 6.0).backward()
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_micro_batch_split_does_not_change_the_gradient(name, mode):
    # clip-cov / kl-cov select their tokens per micro-batch (tests/rl/test_rl_cov.py); without a selection
    # (ratio 0) they are summed token by token like the others
    clip = dataclasses.replace(CLIP, clip_cov_ratio=0.0, kl_cov_ratio=0.0) if name in COV_LOSSES else CLIP
    logp, old, adv, mask = _batch(seed=3, b=8)
    n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
    whole = logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES.get(name)(whole, old, adv, mask, clip)
    aggregate_loss(loss, mask, mode, n_tok, n_seq).backward()
    split = logp.clone().requires_grad_(True)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):  # uneven micro-batches, gradients accumulate
        loss, _ = POLICY_LOSSES.get(name)(split[rows], old[rows], adv[rows], mask[rows], clip)
        aggregate_loss(loss, mask[rows], mode, n_tok, n_seq).backward()
    torch.testing.assert_close(whole.grad, split.grad)


def test_clip_higher_is_asymmetric():
    logp = torch.log(torch.tensor([[1.25, 0.75]], dtype=torch.float64))  # ratios 1.25 and 0.75 against old = 0
    old = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    pos, neg = torch.ones(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64)
    _, clipped_sym = POLICY_LOSSES.get("grpo")(logp, old, pos, mask, CLIP)
    _, clipped_hi = POLICY_LOSSES.get("dapo")(logp, old, pos, mask, CLIP)
    assert clipped_sym.tolist() == [[True, False]]  # 1.25 > 1.2 clipped for a positive advantage
    assert clipped_hi.tolist() == [[False, False]]  # 1.25 < 1.28: clip-higher lets it through
    _, clipped_neg = POLICY_LOSSES.get("dapo")(logp, old, neg, mask, CLIP)
    assert clipped_neg.tolist() == [[False, True]]  # 0.75 < 0.8 clipped for a negative advantage


def test_gspo_clips_the_sequence_ratio_with_its_own_range():
    # a length-normalised ratio of 1.01 is far outside GSPO's 4e-4 range, though well inside the token range 0.28
    logp = torch.full((1, 4), 0.01, dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    _, clipped = POLICY_LOSSES.get("gspo")(logp, old, torch.ones(1, 4, dtype=torch.float64), mask, CLIP)
    assert clipped.all()
    _, clipped_wide = POLICY_LOSSES.get("gspo")(logp, old, torch.ones(1, 4, dtype=torch.float64), mask,
                                            ClipRange(0.2, 0.28, seq_low=0.2, seq_high=0.28))
    assert not clipped_wide.any()


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_infinite_values_off_the_mask_leave_loss_and_gradient_finite(name, mode):
    # off the mask a log-prob may be -inf (a token outside the top-p set): inf * 0 must never reach the loss
    logp, old, adv, mask = _batch()
    logp = logp.masked_fill(mask == 0, float("-inf"))
    old = old.masked_fill(mask == 0, float("inf"))
    l1 = logp.clone().requires_grad_(True)
    loss_bt, _ = POLICY_LOSSES.get(name)(l1, old, adv, mask, CLIP)
    loss = aggregate_loss(loss_bt, mask, mode, float(mask.sum()), 6.0)
    for kl in map(KL_ESTIMATORS.get, KL_ESTIMATORS.names()):
        loss = loss + aggregate_loss(kl(l1, old.clamp(max=0), mask), mask, mode, float(mask.sum()), 6.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(l1.grad).all()
    assert (loss_bt[mask == 0] == 0).all()


def test_policy_logprobs_score_the_distribution_the_engine_samples_from():
    # temperature 0.7, top-p 0.9, top-k 6 and a banned id: the trainer's log-prob is the sampler's, token for token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 2
    targets = torch.randint(0, 11, (2, 5), generator=g)
    banned = torch.zeros(11, dtype=torch.bool)
    banned[3] = True
    dist = ScoringDist(temperature=0.7, top_k=6, top_p=0.9, banned_v=banned)
    mask = torch.ones(2, 5)
    for b in range(2):
        for t in range(5):  # make each target a token the sampler can draw
            probs = naive_sampling_probs(logits[b, t].tolist(), 0.7, 6, 0.9, {3})
            targets[b, t] = max(range(11), key=lambda i: (probs[i] > 0, -i * (b + t) % 7))
    logp, entropy = policy_logprobs(logits, targets, mask, dist, with_entropy=True)
    for b in range(2):
        for t in range(5):
            probs = naive_sampling_probs(logits[b, t].tolist(), 0.7, 6, 0.9, {3})
            assert abs(float(logp[b, t]) - math.log(probs[int(targets[b, t])])) < 1e-5
            ent = -sum(p * math.log(p) for p in probs if p > 0)
            assert abs(float(entropy[b, t]) - ent) < 1e-5
    # off the mask every value is finite, even where the target is outside the kept set
    off, _ = policy_logprobs(logits, torch.full((2, 5), 3), torch.zeros(2, 5), dist)
    assert torch.isfinite(off).all()
    plain, _ = policy_logprobs(logits, targets, mask)  # no dist: the plain softmax
    torch.testing.assert_close(plain, torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1))


def test_unknown_names_suggest():
    with pytest.raises(ValueError, match="Did you mean 'gspo'"):
        POLICY_LOSSES.get("gpso")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "token_mean", 1, 1)


def test_gspo_weighs_every_sequence_once_whatever_its_length():
    """GSPO's objective is a mean over sequences (Zheng et al. 2025): under token-mean a sequence of 8 tokens had
    4x the weight of one of 2, the gradient of grpo with token-mean. gspo now takes seq-mean-token-mean by default
    (``algo.loss_agg=auto``) and refuses another aggregation."""
    from hybrid_rl.config import load_config
    from hybrid_rl.rl.config import RLStageConfig

    assert load_config(RLStageConfig, None, ["algo.policy_loss=gspo"]).algo.loss_agg == "seq-mean-token-mean"
    assert load_config(RLStageConfig, None, []).algo.loss_agg == "token-mean"
    for agg in ("token-mean", "seq-mean-token-sum"):
        with pytest.raises(ValueError, match=f"loss_agg={agg} would weigh each by its length.*algo.loss_agg=seq-mean-token-mean"):
            load_config(RLStageConfig, None, ["algo.policy_loss=gspo", f"algo.loss_agg={agg}"])
    mask = torch.tensor([[1.0, 1.0] + [0.0] * 6, [1.0] * 8], dtype=torch.float64)
    logp = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    loss_bt, _ = POLICY_LOSSES.get("gspo")(logp, logp.detach(), torch.ones(2, 8, dtype=torch.float64), mask, CLIP)
    loss = aggregate_loss(loss_bt, mask, "seq-mean-token-mean", num_tokens=10, num_seqs=2)
    loss.backward()
    per_sequence = (logp.grad * mask).sum(1)
    assert torch.allclose(per_sequence, torch.tensor([-0.5, -0.5], dtype=torch.float64))  # 1/G each
