"""Covariance-based entropy control (clip-cov, kl-cov; Cui et al. 2025): the selection, the loss on the
selected tokens and elsewhere, the naive twins, the rounding, the seeded draw, the config errors and the
update (step-wide normalisers, packing, metrics)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from hybrid_rl.rl.losses import (
    NAIVE, NAIVE_COV_SELECTION, POLICY_LOSSES, ClipRange, aggregate_loss, cov_count, cov_selection, token_covariance,
)

CLIP = ClipRange(low=0.2, high=0.28)


def _batch(seed=0, b=6, t=12, spread=0.3):
    """Log-probs in (-3, 0), ratios up to ~exp(+-0.3 * 3) (some clipped), episode and per-turn advantages,
    a row without any action token."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)[:, None].repeat(1, t)
    adv[1::2] = torch.randn(b // 2, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[0] = 0
    return logp, old, adv, mask


def _grad(name, logp, old, adv, mask, clip):
    """(per-token loss, d(sum of the per-token loss)/d logp): a token's gradient is its own loss's."""
    lp = logp.clone().requires_grad_(True)
    loss_bt, clipped_bt = POLICY_LOSSES.get(name)(lp, old, adv, mask, clip)
    loss_bt.sum().backward()
    return loss_bt.detach(), lp.grad, clipped_bt


def _selected(name, logp, old, adv, mask, clip):
    return cov_selection(name, logp, old, adv, mask, clip)[1]


def _as_set(selected_bt):
    return {tuple(ix) for ix in selected_bt.nonzero().tolist()}


SETTINGS = [  # (clip-cov ratio, lb, ub, kl-cov ratio, coef, seed)
    (2e-4, 1.0, 5.0, 2e-3, 1.0, 0),  # the paper's: one token per call
    (0.1, 0.05, 5.0, 0.1, 1.0, 1),
    (0.3, -1.0, 1.0, 0.3, 0.5, 2),
    (1.0, -10.0, 10.0, 1.0, 2.0, 3),  # every unclipped token detached / penalised
]


@pytest.mark.parametrize("name", ["clip-cov", "kl-cov"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_fast_matches_naive_twin_selection_values_and_gradients(name, setting, mode):
    r_clip, lb, ub, r_kl, coef, seed = setting
    clip = dataclasses.replace(CLIP, clip_cov_ratio=r_clip, clip_cov_lb=lb, clip_cov_ub=ub, kl_cov_ratio=r_kl,
                               kl_cov_coef=coef, cov_seed=seed)
    for data_seed in range(3):
        logp, old, adv, mask = _batch(seed=data_seed)
        selected = _selected(name, logp, old, adv, mask, clip)
        assert _as_set(selected) == NAIVE_COV_SELECTION[name](logp, old, adv, mask, clip)
        assert selected.any()  # every setting selects something on this data (else the test proves little)
        l1, l2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        fast, _ = POLICY_LOSSES.get(name)(l1, old, adv, mask, clip)
        naive = NAIVE[name](l2, old, adv, mask, clip)
        torch.testing.assert_close(fast, naive)
        n_tok, n_seq = float(mask.sum()), float(mask.shape[0])
        aggregate_loss(fast, mask, mode, n_tok, n_seq).backward()
        aggregate_loss(naive, mask, mode, n_tok, n_seq).backward()
        torch.testing.assert_close(l1.grad, l2.grad)


def test_token_covariance_centres_on_the_mask_only():
    logp, _, adv, mask = _batch()
    logp = logp.masked_fill(mask == 0, float("-inf"))  # off the mask: never read
    cov = token_covariance(logp, adv, mask)
    on = mask.bool()
    expected = (logp[on] - logp[on].mean()) * (adv[on] - adv[on].mean())
    torch.testing.assert_close(cov[on], expected)
    assert (cov[~on] == 0).all()
    assert cov[on].mean().abs() < 1.0 and not cov.requires_grad


def test_cov_count_rounds_up():
    assert cov_count(0.0, 500) == 0 and cov_count(0.5, 0) == 0
    assert cov_count(2e-4, 300) == 1  # the paper's ratio still selects one token of a small batch
    assert cov_count(2e-3, 1000) == 2 and cov_count(2e-3, 1001) == 3
    assert cov_count(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats: still 3
    assert cov_count(1.0, 7) == 7 and cov_count(0.99, 7) == 7


@pytest.mark.parametrize("high", [0.28, 0.2])
def test_clip_cov_with_ratio_zero_is_the_plain_clipped_loss(high):
    clip = dataclasses.replace(CLIP, high=high, clip_cov_ratio=0.0, clip_cov_lb=-100.0, clip_cov_ub=100.0)
    plain = "dapo" if high != CLIP.low else "grpo"  # clip-cov uses clip.low / clip.high: dapo's range, grpo's when equal
    logp, old, adv, mask = _batch()
    loss, grad, clipped = _grad("clip-cov", logp, old, adv, mask, clip)
    ref_loss, ref_grad, ref_clipped = _grad(plain, logp, old, adv, mask, clip)
    assert clipped.any()  # the data reaches the clip
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and torch.equal(clipped, ref_clipped)


def test_kl_cov_with_ratio_zero_is_the_unclipped_surrogate():
    clip = dataclasses.replace(CLIP, kl_cov_ratio=0.0)
    logp, old, adv, mask = _batch()
    loss, grad, clipped = _grad("kl-cov", logp, old, adv, mask, clip)
    ratio = torch.exp(torch.where(mask.bool(), logp - old, torch.zeros_like(logp)))
    torch.testing.assert_close(loss, -ratio * adv * mask, rtol=0, atol=0)
    torch.testing.assert_close(grad, -ratio * adv * mask, rtol=0, atol=0)  # d(-r A)/d logp = -r A
    assert not clipped.any()
    # where nothing is clipped (ratios within the range) it is grpo's loss exactly
    near = logp + 0.01 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, grad, _ = _grad("kl-cov", logp, near, adv, mask, clip)
    ref_loss, ref_grad, ref_clipped = _grad("grpo", logp, near, adv, mask, clip)
    assert not ref_clipped.any()
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("ratio", [0.05, 0.25, 1.0])
def test_clip_cov_detaches_exactly_the_chosen_tokens(ratio):
    lb, ub = 0.05, 3.0
    clip = dataclasses.replace(CLIP, clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub, cov_seed=7)
    logp, old, adv, mask = _batch(seed=4)
    loss, grad, clipped = _grad("clip-cov", logp, old, adv, mask, clip)
    ref_loss, ref_grad, ref_clipped = _grad("dapo", logp, old, adv, mask, clip)
    selected = _selected("clip-cov", logp, old, adv, mask, clip)
    on = mask.bool()
    cov = token_covariance(logp, adv, mask)
    candidates = on & ~ref_clipped & (cov >= lb) & (cov <= ub)
    assert int(selected.sum()) == min(math.ceil(ratio * int(on.sum()) - 1e-9), int(candidates.sum())) > 0
    assert not (selected & ~candidates).any()  # only unclipped tokens of the band
    assert torch.equal(loss, ref_loss) and torch.equal(clipped, ref_clipped)  # the values stay the clipped loss
    assert (grad[selected] == 0).all() and (ref_grad[selected] != 0).all()  # detached there...
    assert torch.equal(grad[~selected], ref_grad[~selected])  # ...and nowhere else


@pytest.mark.parametrize("ratio, coef", [(0.05, 1.0), (0.2, 0.3), (1.0, 2.0)])
def test_kl_cov_penalises_exactly_the_top_covariance_tokens(ratio, coef):
    clip = dataclasses.replace(CLIP, kl_cov_ratio=ratio, kl_cov_coef=coef)
    logp, old, adv, mask = _batch(seed=5)
    loss, grad, _ = _grad("kl-cov", logp, old, adv, mask, clip)
    plain, plain_grad, _ = _grad("kl-cov", logp, old, adv, mask, dataclasses.replace(clip, kl_cov_ratio=0.0))
    on = mask.bool()
    cov = token_covariance(logp, adv, mask)
    k = math.ceil(ratio * int(on.sum()) - 1e-9)
    threshold = cov[on].sort(descending=True).values[k - 1]
    top = on & (cov >= threshold)  # no ties on this data
    assert int(top.sum()) == k
    assert torch.equal(_selected("kl-cov", logp, old, adv, mask, clip), top)
    lr = logp - old
    torch.testing.assert_close(loss - plain, torch.where(top, coef * lr.abs(), torch.zeros_like(lr)), rtol=0, atol=1e-15)
    torch.testing.assert_close(grad - plain_grad, torch.where(top, coef * lr.sign(), torch.zeros_like(lr)), rtol=0, atol=1e-15)


def test_kl_cov_on_a_synchronous_step_is_the_plain_policy_gradient():
    # old = the trainer's own detached log-probs: |log r| is 0 with zero gradient, so no token is penalised
    clip = dataclasses.replace(CLIP, kl_cov_ratio=1.0)
    logp, _, adv, mask = _batch()
    l1, l2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES.get("kl-cov")(l1, l1.detach(), adv, mask, clip)
    ref, _ = POLICY_LOSSES.get("reinforce")(l2, l2.detach(), adv, mask, clip)
    loss.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)


def test_clip_cov_draw_is_seeded_and_independent_of_row_order():
    clip = dataclasses.replace(CLIP, clip_cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    logp, old, adv, mask = _batch(seed=6, b=8, t=16)
    state = torch.get_rng_state()
    draws = [_as_set(_selected("clip-cov", logp, old, adv, mask, dataclasses.replace(clip, cov_seed=s))) for s in (0, 0, 1, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is neither read nor advanced
    assert draws[0] == draws[1]  # the same seed draws the same tokens
    assert draws[0] != draws[2] or draws[0] != draws[3]  # another seed, other tokens
    # the same tokens in other rows (as packing lays them out): the same tokens are drawn
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    moved = _selected("clip-cov", logp[perm], old[perm], adv[perm], mask[perm], dataclasses.replace(clip, cov_seed=0))
    assert {(int(perm[b]), t) for b, t in _as_set(moved)} == draws[0]


def test_the_selection_is_made_per_micro_batch():
    # the means and the count are the micro-batch's: a split step selects per part, not over the whole step
    clip = dataclasses.replace(CLIP, kl_cov_ratio=0.1)
    logp, old, adv, mask = _batch(seed=3, b=8)
    whole = _selected("kl-cov", logp, old, adv, mask, clip)
    parts = torch.cat([_selected("kl-cov", logp[r], old[r], adv[r], mask[r], clip)
                       for r in (slice(0, 3), slice(3, 4), slice(4, 8))])
    assert not torch.equal(whole, parts)
    assert int(whole.sum()) == math.ceil(0.1 * int(mask.sum()) - 1e-9)
    assert int(parts.sum()) == sum(math.ceil(0.1 * int(mask[r].sum()) - 1e-9) for r in (slice(0, 3), slice(3, 4), slice(4, 8)))


@pytest.mark.parametrize("name", ["clip-cov", "kl-cov"])
def test_infinite_values_off_the_mask_do_not_reach_the_selection(name):
    clip = dataclasses.replace(CLIP, clip_cov_ratio=0.5, clip_cov_lb=-10.0, clip_cov_ub=10.0, kl_cov_ratio=0.5)
    logp, old, adv, mask = _batch()
    finite = _selected(name, logp, old, adv, mask, clip)
    inf_logp = logp.masked_fill(mask == 0, float("-inf"))
    inf_old = old.masked_fill(mask == 0, float("inf"))
    l1 = inf_logp.clone().requires_grad_(True)
    loss, _ = POLICY_LOSSES.get(name)(l1, inf_old, adv, mask, clip)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(l1.grad).all()
    assert torch.equal(_selected(name, inf_logp, inf_old, adv, mask, clip), finite)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, expected", [
    (["algo.clip_cov_ratio=-0.1"], ["clip_cov_ratio", "[0, 1]", "algo.clip_cov_ratio="]),
    (["algo.kl_cov_ratio=2"], ["kl_cov_ratio", "[0, 1]", "algo.kl_cov_ratio="]),
    (["algo.kl_cov_ratio=nan"], ["kl_cov_ratio", "finite number", "nan"]),
    (["algo.clip_cov_lb=6"], ["clip_cov_lb", "clip_cov_ub", "<=", "clip_cov_lb=6"]),
    (["algo.clip_cov_lb=0.5", "algo.clip_cov_ub=0.1"], ["clip_cov_lb=0.5", "clip_cov_ub=0.1"]),
    (["algo.kl_cov_coef=-1"], ["kl_cov_coef", ">= 0", "algo.kl_cov_coef="]),
    (["algo.policy_loss=klcov"], ["'klcov'", "Did you mean 'kl-cov'", "'clip-cov'", "'grpo'", "'reinforce'"]),
    (["algo.policy_loss=clip_cov"], ["Did you mean 'clip-cov'"]),
])
def test_bad_cov_settings_name_the_key_and_the_fix(overrides, expected):
    from hybrid_rl.config import load_config
    from hybrid_rl.rl.config import RLStageConfig

    with pytest.raises(ValueError) as err:
        load_config(RLStageConfig, None, overrides)
    for piece in expected:
        assert piece in str(err.value), str(err.value)


def test_kl_cov_on_a_synchronous_single_update_warns(caplog):
    from hybrid_rl.rl.config import AlgoConfig

    with caplog.at_level("WARNING", logger="hybrid_rl.rl"):
        AlgoConfig(policy_loss="kl-cov", mode="async")
        AlgoConfig(policy_loss="kl-cov", mode="sync", updates_per_batch=2)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="hybrid_rl.rl"):
        AlgoConfig(policy_loss="kl-cov", mode="sync")
    assert any("kl-cov" in r.getMessage() and "updates_per_batch" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ the update


def _update(trajs, model, *overrides, old_from_rollout=True, seed=0):
    from test_rl_update import GradRecorder, _cfg

    from hybrid_rl.rl.train import make_batch, policy_update

    cfg = _cfg("train.micro_batch_tokens=4096", f"algo.mode={'async' if old_from_rollout else 'sync'}", *overrides)
    batch, _ = make_batch(trajs, cfg, pad_id=0)
    m = copy.deepcopy(model)
    rec = GradRecorder(m)
    stats = policy_update(m, rec, batch, cfg, old_from_rollout=old_from_rollout, seed=seed)
    return rec.grads, stats


def _close(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def _trajs():
    from test_rl_update import _model, _trajectories

    model = _model()
    return model, _trajectories(model, n=8)


def test_update_with_ratio_zero_is_the_plain_update_over_micro_batches():
    # step-wide normalisers: with nothing selected, clip-cov is dapo's update (ratios against the rollout's
    # log-probs, 43% of the tokens clipped) and kl-cov grpo's where nothing is clipped (on policy), however the
    # step is split
    model, trajs = _trajs()
    size = "train.micro_batch_tokens=96"  # three rows of 32 tokens: several micro-batches
    dapo, plain = _update(trajs, model, size, "algo.policy_loss=dapo")
    clip_cov, stats = _update(trajs, model, size, "algo.policy_loss=clip-cov", "algo.clip_cov_ratio=0")
    assert plain["train/clip_fraction"] > 0.1
    _close(clip_cov, dapo)
    assert stats["train/cov_selected_frac"] == 0.0 and stats["train/cov_selected_mean"] == 0.0
    grpo, plain = _update(trajs, model, size, "algo.policy_loss=grpo", old_from_rollout=False)
    kl_cov, _ = _update(trajs, model, size, "algo.policy_loss=kl-cov", "algo.kl_cov_ratio=0", old_from_rollout=False)
    assert plain["train/clip_fraction"] == 0.0
    _close(kl_cov, grpo)


@pytest.mark.parametrize("name", ["clip-cov", "kl-cov"])
def test_update_packed_or_not_selects_the_same_tokens(name):
    # one micro-batch either way: the same action tokens, in other rows; the selection and the gradient agree
    model, trajs = _trajs()
    extra = [f"algo.policy_loss={name}", "algo.clip_cov_ratio=0.2", "algo.clip_cov_lb=-100", "algo.kl_cov_ratio=0.2"]
    rows, s_rows = _update(trajs, model, "train.pack_sequences=false", *extra)
    packed, s_packed = _update(trajs, model, "train.pack_sequences=true", *extra)
    _close(packed, rows)
    for key in ("train/loss", "train/cov_mean", "train/cov_selected_frac", "train/cov_selected_mean"):
        assert s_packed[key] == pytest.approx(s_rows[key], rel=1e-4, abs=1e-7), key
    assert s_rows["train/cov_selected_frac"] == pytest.approx(0.2, abs=0.02)
    plain, _ = _update(trajs, model, "algo.policy_loss=dapo" if name == "clip-cov" else "algo.policy_loss=grpo")
    with pytest.raises(AssertionError):
        _close(rows, plain)  # the selection changed the update


def test_update_draw_follows_the_seed():
    model, trajs = _trajs()
    extra = ["algo.policy_loss=clip-cov", "algo.clip_cov_ratio=0.2", "algo.clip_cov_lb=-100"]
    a, _ = _update(trajs, model, *extra, seed=11)
    b, _ = _update(trajs, model, *extra, seed=11)
    c, _ = _update(trajs, model, *extra, seed=12)
    _close(a, b)
    with pytest.raises(AssertionError):
        _close(a, c)
