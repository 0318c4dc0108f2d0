"""Per-token estimators of KL(pi || pi_ref) from samples of pi, one pure function each (Schulman 2020,
"Approximating KL divergence"). With log_ratio = log pi(x) - log pi_ref(x) at a sampled token x:

    k1 = log_ratio                              unbiased, high variance, can be negative
    k2 = log_ratio**2 / 2                       biased (exact to second order), always >= 0; as a loss
                                                on on-policy samples its gradient is exactly grad KL
    k3 = exp(-log_ratio) - 1 + log_ratio        unbiased, always >= 0, low variance (GRPO paper's choice)

Shapes: logp_bt, ref_logp_bt [B, T], optional mask_bt [B, T] -> kl_bt [B, T], exactly 0 off the mask (the
log-ratio is selected before the exp, so an infinite log-prob off the mask never makes inf * 0 = NaN,
neither in the value nor in the gradient). The loop averages the estimate over action tokens
with the same aggregation as the policy loss and adds ``beta * kl`` (beta 0 by default, as in DAPO and
Dr.GRPO, so the reference model is not even loaded).

Departures from the GRPO paper: the estimator is a choice (``algo.kl_estimator``), default k3 as in the
paper; k2 is offered because its gradient is the unbiased one (Tang & Munos 2025). k3's log-ratio is bounded
to +-20 (``K3_LOG_RATIO_BOUND``), so that a token a truncated distribution excludes keeps it finite.
"""

from __future__ import annotations

from typing import Callable

import torch

from hybrid_rl.registry import Registry

KLFn = Callable[..., torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


def _log_ratio(logp_bt, ref_logp_bt, mask_bt=None):
    if mask_bt is None:
        return logp_bt - ref_logp_bt
    return torch.where(mask_bt.bool(), logp_bt - ref_logp_bt, torch.zeros_like(logp_bt))


@KL_ESTIMATORS.register("k1")
def kl_k1(logp_bt, ref_logp_bt, mask_bt=None):
    return _log_ratio(logp_bt, ref_logp_bt, mask_bt)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp_bt, ref_logp_bt, mask_bt=None):
    return 0.5 * _log_ratio(logp_bt, ref_logp_bt, mask_bt) ** 2


K3_LOG_RATIO_BOUND = 20.0


@KL_ESTIMATORS.register("k3")
def kl_k3(logp_bt, ref_logp_bt, mask_bt=None):
    # the log-ratio is bounded to +-20 before the exp (as verl's low_var_kl): a token one policy's top-p / top-k
    # excludes has its log-prob held at rl/losses.py's LOGP_FLOOR (-1e4), and exp(1e4) would make the KL, the
    # loss and their logged values inf; beyond the bound the term has no gradient (it had e^20 before)
    log_ratio_bt = _log_ratio(logp_bt, ref_logp_bt, mask_bt).clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return torch.exp(-log_ratio_bt) - 1.0 + log_ratio_bt


# ------------------------------------------------------------------------------ naive twins and the exact value


def kl_naive(name: str, logp_bt, ref_logp_bt):
    """Token by token, the docstring's definitions written with the ratio pi_ref/pi itself (keeps grads)."""
    out = []
    for lp, ref in zip(logp_bt.flatten(), ref_logp_bt.flatten()):
        ratio = torch.exp(ref) / torch.exp(lp)  # pi_ref(x) / pi(x)
        out.append({"k1": -torch.log(ratio), "k2": 0.5 * torch.log(ratio) ** 2, "k3": ratio - 1.0 - torch.log(ratio)}[name])
    return torch.stack(out).reshape(logp_bt.shape)


def exact_kl(logp_v, ref_logp_v):
    """KL(pi || pi_ref) of two full distributions over V outcomes given as log-probs [.., V] -> [..]."""
    return (logp_v.exp() * (logp_v - ref_logp_v)).sum(-1)
