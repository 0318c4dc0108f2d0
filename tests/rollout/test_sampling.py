"""Sampling against its naive twins: the distribution, both log-probs, and greedy."""

import math

import pytest
import torch

from hybrid_rl.rollout.sampling import (episode_ident, inverse_cdf, keyed_uniforms, naive_plain_logprob,
                                        naive_sampling_probs, sample, sampling_logprobs)

SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=0, top_p=1.0),
    dict(temperature=1.3, top_k=5, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.8),
    dict(temperature=0.9, top_k=7, top_p=0.6),
    dict(temperature=1.0, top_k=1, top_p=1.0),
    dict(temperature=2.0, top_k=0, top_p=0.05),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampling_distribution_matches_naive(setting):
    g = torch.Generator().manual_seed(0)
    logits_bv = torch.randn(4, 23, generator=g) * 2
    banned_v = torch.zeros(23, dtype=torch.bool)
    banned_v[[0, 3, 11]] = True
    fast_bv = sampling_logprobs(logits_bv, banned_v=banned_v, **setting).exp()
    for r in range(4):
        naive = naive_sampling_probs(logits_bv[r].tolist(), banned={0, 3, 11}, **setting)
        assert fast_bv[r].tolist() == pytest.approx(naive, abs=1e-6)
        assert all(fast_bv[r, i] == 0 for i in (0, 3, 11))


@pytest.mark.parametrize("setting", SETTINGS)
def test_sampled_tokens_and_logprobs(setting):
    g = torch.Generator().manual_seed(1)
    logits_bv = torch.randn(6, 31, generator=g) * 3
    tokens_b, sample_logp_b, plain_logp_b = sample(logits_bv, generator=g, **setting)
    for r in range(6):
        probs = naive_sampling_probs(logits_bv[r].tolist(), **setting)
        tok = int(tokens_b[r])
        assert probs[tok] > 0, "sampled a token outside the support"
        assert float(sample_logp_b[r]) == pytest.approx(math.log(probs[tok]), abs=1e-5)
        assert float(plain_logp_b[r]) == pytest.approx(naive_plain_logprob(logits_bv[r].tolist(), tok), abs=1e-5)


def test_empirical_frequencies_follow_the_distribution():
    g = torch.Generator().manual_seed(2)
    logits_v = torch.randn(8, generator=g)
    n = 20000
    tokens_b, _, _ = sample(logits_v.expand(n, -1), temperature=0.8, top_p=0.9, generator=g)
    freq = torch.bincount(tokens_b, minlength=8).float() / n
    probs = naive_sampling_probs(logits_v.tolist(), temperature=0.8, top_p=0.9)
    assert freq.tolist() == pytest.approx(probs, abs=0.015)


def test_greedy_picks_the_best_allowed_token_with_probability_one():
    logits_bv = torch.tensor([[0.0, 5.0, 1.0], [3.0, 2.0, 1.0]])
    banned_v = torch.tensor([False, True, False])
    tokens_b, sample_logp_b, plain_logp_b = sample(logits_bv, temperature=0.0, banned_v=banned_v)
    assert tokens_b.tolist() == [2, 0]
    assert sample_logp_b.tolist() == [0.0, 0.0]
    assert float(plain_logp_b[0]) == pytest.approx(naive_plain_logprob([0.0, 5.0, 1.0], 2))


def test_temperature_must_be_positive_for_a_distribution():
    with pytest.raises(ValueError, match="temperature"):
        sampling_logprobs(torch.zeros(1, 3), temperature=0.0)


def test_inverse_cdf_picks_the_token_whose_interval_holds_u_and_never_a_zero_probability_one():
    probs_bv = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 7)
    u_b = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999, 1.0 - 2.0 ** -53], dtype=torch.float64)
    assert inverse_cdf(probs_bv, u_b).tolist() == [1, 1, 3, 3, 4, 4, 4]
    unnormalised = probs_bv[:2] * 3.0  # the draw is relative to the row's total
    assert inverse_cdf(unnormalised, u_b[[2, 4]]).tolist() == [3, 4]


@pytest.mark.parametrize("bad", [float("nan"), 0.0])
def test_inverse_cdf_rejects_rows_it_cannot_sample(bad):
    probs_bv = torch.tensor([[0.5, 0.5], [bad, bad]])
    with pytest.raises(ValueError, match=r"rows \[1\].*not finite or sum to 0"):
        inverse_cdf(probs_bv, torch.tensor([0.3, 0.3], dtype=torch.float64))


def test_keyed_uniforms_are_a_function_of_stream_episode_and_position_and_look_uniform():
    ident = episode_ident("hybrid_rl/Nim-v0", 5, 2, 1)
    u = keyed_uniforms(7, [ident] * 3, [10, 11, 10])
    assert u[0] == u[2] != u[1]
    assert keyed_uniforms(7, [ident], [10]).item() == u[0].item()
    others = [keyed_uniforms(8, [ident], [10]), keyed_uniforms(7, [episode_ident("hybrid_rl/Nim-v0", 5, 2, 2)], [10]),
              keyed_uniforms(7, [episode_ident("hybrid_rl/Nim-v0", 6, 2, 1)], [10]),
              keyed_uniforms(7, [episode_ident("hybrid_rl/Snake-v0", 5, 2, 1)], [10])]
    assert len({float(x) for x in others} | {float(u[0])}) == 5
    many = keyed_uniforms(3, [ident] * 20000, list(range(20000)))
    assert many.dtype == torch.float64 and 0.0 <= float(many.min()) and float(many.max()) < 1.0
    counts = torch.histc(many, bins=10, min=0.0, max=1.0)
    assert counts.tolist() == pytest.approx([2000.0] * 10, abs=200)  # ~4.5 standard deviations
    assert abs(float(torch.corrcoef(torch.stack([many[:-1], many[1:]]))[0, 1])) < 0.03  # neighbours independent


def test_keyed_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(3)
    logits_v = torch.randn(8, generator=g)
    n = 20000
    u_b = keyed_uniforms(11, [episode_ident("e", 0, 0, 0)] * n, list(range(n)))
    tokens_b, _, _ = sample(logits_v.expand(n, -1), temperature=0.8, top_p=0.9, uniforms_b=u_b)
    freq = torch.bincount(tokens_b, minlength=8).float() / n
    assert freq.tolist() == pytest.approx(naive_sampling_probs(logits_v.tolist(), temperature=0.8, top_p=0.9), abs=0.015)


@pytest.mark.parametrize("setting", SETTINGS[:4])
def test_the_kernel_draw_equals_the_tensor_ops_bit_for_bit(setting, monkeypatch):
    """``sample`` draws through kernels/sample.c where it can; the tokens and both log-probs are the ones of
    the tensor-op path (``inverse_cdf`` and its look-ups), to the bit, also where u * total rounds up to the
    total and where most of a row's probability underflows to 0."""
    from hybrid_rl.model.fast import kernels
    from hybrid_rl.rollout import sampling

    if kernels.library() is None:
        pytest.skip("no C compiler: the kernels are not built")
    g = torch.Generator().manual_seed(4)
    logits_bv = torch.cat([torch.randn(300, 61, generator=g) * 4, torch.randn(20, 61, generator=g) * 80])
    banned_v = torch.zeros(61, dtype=torch.bool)
    banned_v[[0, 7, 60]] = True
    u_b = torch.rand(320, generator=g, dtype=torch.float64)
    u_b[:8] = torch.tensor([0.0, 1.0 - 2.0 ** -53, 1.0 - 2.0 ** -40, 0.5, 2.0 ** -60, 0.999999, 0.25, 0.75],
                           dtype=torch.float64)
    picks, real_pick = [], sampling._pick
    monkeypatch.setattr(sampling, "_pick", lambda *a: picks.append(real_pick(*a)) or picks[-1])
    fast = sample(logits_bv, banned_v=banned_v, uniforms_b=u_b, **setting)
    assert picks and all(p is not None for p in picks)  # the kernel drew
    monkeypatch.setattr(sampling, "_pick", lambda *a: None)
    slow = sample(logits_bv, banned_v=banned_v, uniforms_b=u_b, **setting)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert not banned_v[fast[0]].any()


def test_a_row_the_kernel_cannot_draw_raises_the_tensor_path_error():
    logits_bv = torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3])
    with pytest.raises(ValueError, match=r"rows \[1\].*not finite or sum to 0"):
        sample(logits_bv, uniforms_b=torch.tensor([0.3, 0.3], dtype=torch.float64))


def test_the_kernel_draw_picks_what_inverse_cdf_picks_at_the_interval_ends():
    from hybrid_rl.model.fast import kernels
    from hybrid_rl.rollout.sampling import _pick

    if kernels.library() is None:
        pytest.skip("no C compiler: the kernels are not built")
    probs_bv = torch.tensor([[0.0, 0.25, 0.0, 0.5, 0.25, 0.0]] * 7)
    u_b = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999, 1.0 - 2.0 ** -53], dtype=torch.float64)
    logp_bv = probs_bv.log()
    plain_bv = torch.arange(42, dtype=torch.float32).reshape(7, 6)
    allowed_a = torch.tensor([10, 11, 12, 13, 14, 15])
    tokens_b, sample_logp_b, plain_logp_b = _pick(probs_bv, logp_bv, torch.zeros(7, 16), allowed_a, u_b)
    assert tokens_b.tolist() == [11, 11, 13, 13, 14, 14, 14] == [10 + i for i in inverse_cdf(probs_bv, u_b).tolist()]
    assert sample_logp_b.tolist() == [float(logp_bv[r, t - 10]) for r, t in enumerate(tokens_b.tolist())]
    tokens_b, _, plain_logp_b = _pick(probs_bv, logp_bv, plain_bv, None, u_b)
    assert tokens_b.tolist() == [1, 1, 3, 3, 4, 4, 4]
    assert plain_logp_b.tolist() == [float(plain_bv[r, t]) for r, t in enumerate(tokens_b.tolist())]


def test_the_kernel_draw_leaves_other_uniform_shapes_and_turned_off_kernels_to_the_tensor_path(monkeypatch):
    """One uniform for six rows broadcasts in the tensor path (the kernel read past its end); with
    ``HYBRID_RL_KERNELS=0`` the draw does not use (or build) the kernels."""
    from hybrid_rl.rollout import sampling

    g = torch.Generator().manual_seed(5)
    logits_bv = torch.randn(6, 50, generator=g)
    one = torch.tensor([0.3], dtype=torch.float64)
    tokens_b, _, _ = sample(logits_bv, uniforms_b=one)
    assert tokens_b.tolist() == inverse_cdf(torch.softmax(logits_bv, -1), one).tolist()
    monkeypatch.setenv("HYBRID_RL_KERNELS", "0")
    probs_bv = torch.softmax(logits_bv, -1)
    assert sampling._pick(probs_bv, probs_bv.log(), logits_bv, None, torch.full((6,), 0.5, dtype=torch.float64)) is None


def test_a_negative_temperature_is_refused_with_or_without_a_mask():
    banned_v = torch.zeros(5, dtype=torch.bool)
    banned_v[0] = True
    for mask in (None, banned_v):
        with pytest.raises(ValueError, match="temperature >= 0"):
            sample(torch.zeros(2, 5), temperature=-0.5, banned_v=mask)


def test_a_mask_edited_in_place_bans_its_new_ids():
    banned_v = torch.zeros(6, dtype=torch.bool)
    logits_bv = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 50.0]])
    u_b = torch.tensor([0.5], dtype=torch.float64)
    assert sample(logits_bv, banned_v=banned_v, uniforms_b=u_b)[0].tolist() == [5]
    banned_v[5] = True  # the cached allowed ids must follow
    assert sample(logits_bv, banned_v=banned_v, uniforms_b=u_b)[0].tolist() != [5]
    with torch.inference_mode():
        frozen = torch.zeros(6, dtype=torch.bool)
    assert sample(logits_bv, banned_v=frozen, uniforms_b=u_b)[0].tolist() == [5]
    with torch.inference_mode():
        frozen[5] = True  # no version counter to say so: read every time
    assert sample(logits_bv, banned_v=frozen, uniforms_b=u_b)[0].tolist() != [5]
