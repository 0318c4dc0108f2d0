"""KL estimators against the exact KL of small distributions, and against their naive twins."""

from __future__ import annotations

import pytest
import torch

from hybrid_rl.rl.kl import KL_ESTIMATORS, exact_kl, kl_naive


def _dists(seed=0, v=7, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, v, generator=g, dtype=torch.float64)
    ref_logits = logits + spread * torch.randn(3, v, generator=g, dtype=torch.float64)
    return logits, torch.log_softmax(ref_logits, -1)


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_matches_naive_values_and_gradients(name):
    logits, ref = _dists()
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    k_fast = KL_ESTIMATORS.get(name)(torch.log_softmax(l1, -1), ref)
    k_naive = kl_naive(name, torch.log_softmax(l2, -1), ref)
    torch.testing.assert_close(k_fast, k_naive)
    k_fast.sum().backward()
    k_naive.sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_have_expectation_exact_kl(name):
    logits, ref = _dists(spread=1.5)
    logp = torch.log_softmax(logits, -1)
    expectation = (logp.exp() * KL_ESTIMATORS.get(name)(logp, ref)).sum(-1)  # E_{x ~ pi}[k(x)], exactly
    torch.testing.assert_close(expectation, exact_kl(logp, ref))


def test_k2_is_close_for_close_distributions_and_nonnegative():
    logits, ref = _dists(spread=0.05)
    logp = torch.log_softmax(logits, -1)
    expectation = (logp.exp() * KL_ESTIMATORS.get("k2")(logp, ref)).sum(-1)
    exact = exact_kl(logp, ref)
    assert torch.all((expectation - exact).abs() < 0.05 * exact)
    assert torch.all(KL_ESTIMATORS.get("k2")(logp, ref) >= 0) and torch.all(KL_ESTIMATORS.get("k3")(logp, ref) >= 0)


def test_k2_loss_on_policy_samples_has_the_exact_kl_gradient():
    logits, ref = _dists(spread=1.0)
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(l1, -1)
    surrogate = (logp.exp().detach() * KL_ESTIMATORS.get("k2")(logp, ref)).sum()  # samples from pi, no grad through sampling
    surrogate.backward()
    exact_kl(torch.log_softmax(l2, -1), ref).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)


def test_zero_when_policies_equal():
    logits, _ = _dists()
    logp = torch.log_softmax(logits, -1)
    for fn in map(KL_ESTIMATORS.get, KL_ESTIMATORS.names()):
        assert torch.equal(fn(logp, logp), torch.zeros_like(logp))


@pytest.mark.parametrize("name", KL_ESTIMATORS.names())
def test_a_token_the_truncation_excludes_keeps_the_kl_and_its_gradient_finite(name):
    """Under top-p / top-k a token the current policy's truncation excludes is scored at LOGP_FLOOR (-1e4): k3's
    exp(1e4) made train/kl and the loss inf."""
    from hybrid_rl.rl.losses import LOGP_FLOOR

    raw = torch.tensor([[-1.0, -1e9, -0.5]], requires_grad=True)
    logp = raw.clamp(min=LOGP_FLOOR)  # as the trainer's score holds it
    ref = torch.tensor([[-1.2, -2.0, -0.5]])
    kl = KL_ESTIMATORS.get(name)(logp, ref, torch.ones(1, 3))
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(raw.grad).all()
    assert kl[0, 0] == KL_ESTIMATORS.get(name)(logp[:, :1], ref[:, :1])[0, 0]  # the other tokens as before


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean 'k3'"):
        KL_ESTIMATORS.get("k33")
