"""Trajectories -> training tensors, micro-batching, the routing-mismatch metric and rollout metrics."""

from __future__ import annotations

import torch

from hybrid_rl.rl.batch import collate, micro_batches, trim
from hybrid_rl.rl.routing import routing_mismatch, routing_mismatch_naive
from hybrid_rl.rl.train import staleness_metrics
from hybrid_rl.rollout.evaluate import rollout_metrics
from hybrid_rl.rollout.trajectory import Trajectory


def _traj(ids, action, group=0, ret=0.0, status="terminated", version=0, routed=None):
    return Trajectory(env_id="hybrid_rl/GuessNumber-v0", seed=0, group_id=group, status=status, token_ids=list(ids),
                      is_action=list(action), logprobs=[-0.4 * a for a in action], sample_logprobs=[-0.5 * a for a in action],
                      policy_version=[version] * len(ids), routed_experts=routed, episode_return=ret,
                      num_turns=1)


def test_collate_shifts_targets_and_masks_padding():
    a = _traj([1, 5, 6, 7, 2], [0, 0, 1, 1, 1])
    b = _traj([1, 9, 2], [0, 1, 1])
    batch = collate([a, b], [1.0, -1.0], pad_id=0)
    assert batch.input_ids_bt.tolist() == [[1, 5, 6, 7], [1, 9, 0, 0]]
    assert batch.target_ids_bt.tolist() == [[5, 6, 7, 2], [9, 2, 0, 0]]
    assert batch.action_mask_bt.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.rollout_logp_bt[0].tolist() == [0.0, -0.5, -0.5, -0.5]  # the sampled distribution's, not the plain softmax's
    assert batch.adv_bt.tolist() == [[0.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 0.0, 0.0]]  # the episode's, on its action tokens
    assert (batch.norm_tokens, batch.norm_seqs) == (5.0, 2.0)
    assert trim(batch.rows([1])).input_ids_bt.tolist() == [[1, 9]]  # columns after the last action dropped


def test_collate_per_token_advantages():
    a = _traj([1, 5, 6, 7, 2], [0, 1, 0, 1, 1])
    batch = collate([a], [[0.0, 0.5, 0.0, -1.0, -1.0]], norm_tokens=30.0, norm_seqs=8.0)
    assert batch.adv_bt.tolist() == [[0.5, 0.0, -1.0, -1.0]]
    assert (batch.rows([0]).norm_tokens, trim(batch).norm_seqs) == (30.0, 8.0)  # the step's normalisers travel along


def test_collate_routing():
    routed = [[[i, i + 1]] for i in range(4)]  # [T][n_moe=1][k=2]
    batch = collate([_traj([1, 5, 6, 2], [0, 1, 1, 1], routed=routed)], [1.0], with_routing=True)
    assert batch.routing_btlk.shape == (1, 3, 1, 2)
    assert batch.routing_btlk[0, :, 0, 0].tolist() == [0, 1, 2]  # the experts of each *input* position


def test_micro_batches_respect_budget_and_cover_everything():
    lengths = [5, 17, 3, 17, 9, 1, 12]
    mbs = micro_batches(lengths, 34)
    assert sorted(i for mb in mbs for i in mb) == list(range(len(lengths)))
    for mb in mbs:
        assert len(mb) * max(lengths[i] for i in mb) <= 34
    assert mbs[0] == [1, 3]  # longest first, equal lengths together


def test_micro_batches_too_long_episode_says_what_to_do():
    import pytest

    with pytest.raises(ValueError, match="micro_batch_tokens"):
        micro_batches([10, 50], 40)


def test_routing_mismatch_matches_naive():
    rec = torch.tensor([[0, 1], [2, 3]]).repeat(3, 5, 1, 1)  # [B=3, T=5, n_moe=2, k=2]
    trn = rec.clone()
    trn[0, 1, 0] = torch.tensor([1, 0])  # same set in another order: not a difference
    trn[1, 2, 1] = torch.tensor([2, 4])  # one layer differs: the position differs
    trn[2, 4] = torch.tensor([[5, 6], [7, 0]])  # differs, but masked out
    mask = torch.ones(3, 5)
    mask[2, 4] = 0
    assert routing_mismatch(rec, trn, mask) == routing_mismatch_naive(rec, trn, mask) == (1.0, 14.0)


def test_rollout_metrics_staleness_and_failures():
    trajs = [_traj([1, 5, 2], [0, 1, 1], ret=1.0, version=3), _traj([1, 5, 2], [0, 1, 1], status="timeout", version=4)]
    trajs[0].success = True
    m = {**rollout_metrics(trajs), **staleness_metrics(trajs, version=4)}
    assert m["train/staleness_max"] == 1.0 and m["train/staleness_mean"] == 0.5
    assert m["rollout/timeouts/GuessNumber-v0"] == 0.5
    assert m["rollout/success/GuessNumber-v0"] == 1.0  # failed episodes are left out of the means
    assert m["rollout/zero_std_groups"] == 1.0
