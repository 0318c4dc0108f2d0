"""Policy-gradient losses, one pure function per variant, and the ways to average them over tokens.

Legend (shapes in names):
    logp_bt       [B, T]  log-prob of each token under the policy being trained (has grad)
    old_logp_bt   [B, T]  log-prob under the policy that the ratio is taken against (no grad): the
                          trainer's own detached log-probs on a synchronous step (ratio exactly 1), the
                          rollout's log-probs when the batch is stale (async mode: importance correction)
    adv_bt        [B, T]  the advantage of each action token: its episode's (``algo.credit: episode``)
                          or its turn's (``algo.credit: turn``)
    mask_bt       [B, T]  1 on trained (model-generated) tokens, 0 on prompts/observations/padding
    -> loss_bt    [B, T]  per-token loss (exactly 0 off the mask), clipped_bt [B, T] bool: the clip was active

Masking selects (``torch.where``), never multiplies: a position off the mask may hold an infinite
log-ratio (a token the truncated sampling distribution excludes), and ``inf * 0`` is NaN.

Variants (``POLICY_LOSSES.get(name)``, cf. verl's ``register_policy_loss``):
    grpo       PPO clipped ratio per token, symmetric eps (Schulman 2017; GRPO, Shao 2024)
    dapo       the same with clip-higher: eps_low < eps_high lets rare tokens grow (Yu et al. 2025)
    gspo       one ratio per sequence, exp(mean_t log ratio), clipped per sequence (Zheng et al. 2025);
               its clip range is ``algo.seq_clip_eps_low/high`` (3e-4 / 4e-4 as in the paper): a
               length-normalised ratio moves far less than a token's, and the token range (0.2) would
               leave it effectively unclipped. Its advantage is the sequence's mean token advantage.
    reinforce  -A * log pi, no ratio, no clipping (plain on-policy REINFORCE with a group baseline)

Aggregation (``aggregate_loss``), with the normalisers of the *whole* optimizer step passed in so that
splitting the step's batch into micro-batches and summing their losses gives the same gradient:
    token-mean            sum over all tokens / number of tokens in the step      (DAPO)
    seq-mean-token-sum    sum over each sequence, mean over sequences             (Dr.GRPO, with no length norm)
    seq-mean-token-mean   mean over each sequence, mean over sequences            (the GRPO paper)

Departures from the GRPO paper: the KL penalty is a separate term (rl/kl.py, beta 0 by default, as in
DAPO/Dr.GRPO), and the default aggregation is token-mean (GRPO's per-sequence mean favours short wrong
answers, Dr.GRPO section 3).

Each fast function has a naive twin (``*_naive``, Python loops) that the tests compare for values and
gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hybrid_rl.registry import Registry

@dataclass
class ClipRange:
    low: float = 0.2  # ratio floor is 1 - low
    high: float = 0.2  # ratio ceiling is 1 + high (DAPO's clip-higher uses 0.28)
    seq_low: float = 3e-4  # gspo's sequence-ratio range (GSPO paper)
    seq_high: float = 4e-4


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ClipRange], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _clipped_objective(ratio, adv, low, high):
    """-min(r A, clip(r, 1-low, 1+high) A) and where the clipped branch was the one taken."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def _masked(loss_bt, clipped_bt, mask_bt):
    on_bt = mask_bt.bool()
    return torch.where(on_bt, loss_bt, torch.zeros_like(loss_bt)), clipped_bt & on_bt


def _log_ratio(logp_bt, old_logp_bt, mask_bt):
    """logp - old on the mask, 0 elsewhere (so no inf - inf off the mask)."""
    return torch.where(mask_bt.bool(), logp_bt - old_logp_bt, torch.zeros_like(logp_bt))


@POLICY_LOSSES.register("grpo")
def grpo_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    ratio_bt = torch.exp(_log_ratio(logp_bt, old_logp_bt, mask_bt))
    return _masked(*_clipped_objective(ratio_bt, adv_bt, clip.low, clip.low), mask_bt)


@POLICY_LOSSES.register("dapo")
def dapo_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    ratio_bt = torch.exp(_log_ratio(logp_bt, old_logp_bt, mask_bt))
    return _masked(*_clipped_objective(ratio_bt, adv_bt, clip.low, clip.high), mask_bt)


@POLICY_LOSSES.register("gspo")
def gspo_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    on_bt = mask_bt.bool()
    n_b = mask_bt.sum(1).clamp(min=1)
    log_ratio_b = _log_ratio(logp_bt, old_logp_bt, mask_bt).sum(1) / n_b  # length-normalised sequence ratio
    adv_b = torch.where(on_bt, adv_bt, torch.zeros_like(adv_bt)).sum(1) / n_b
    loss_b, clipped_b = _clipped_objective(torch.exp(log_ratio_b), adv_b, clip.seq_low, clip.seq_high)
    return _masked(loss_b[:, None].expand_as(logp_bt), clipped_b[:, None].expand_as(on_bt), mask_bt)


@POLICY_LOSSES.register("reinforce")
def reinforce_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    return _masked(-adv_bt * logp_bt, torch.zeros_like(mask_bt, dtype=torch.bool), mask_bt)


# ------------------------------------------------------------------------------ aggregation

# (kept_bt: the per-token loss, 0 off the mask; mask_bt; the step's num_tokens, num_seqs) -> scalar
AggregationFn = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


@AGGREGATIONS.register("token-mean")
def token_mean(kept_bt, mask_bt, num_tokens: float, num_seqs: float):
    return kept_bt.sum() / max(num_tokens, 1)


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(kept_bt, mask_bt, num_tokens: float, num_seqs: float):
    return kept_bt.sum() / max(num_seqs, 1)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(kept_bt, mask_bt, num_tokens: float, num_seqs: float):
    per_seq_b = kept_bt.sum(1) / mask_bt.sum(1).clamp(min=1)
    return per_seq_b.sum() / max(num_seqs, 1)


def aggregate_loss(loss_bt, mask_bt, mode: str, num_tokens: float, num_seqs: float):
    """Reduce a micro-batch's per-token loss with the step-wide normalisers (see module docstring)."""
    kept_bt = torch.where(mask_bt.bool(), loss_bt, torch.zeros_like(loss_bt))
    return AGGREGATIONS.get(mode)(kept_bt, mask_bt, num_tokens, num_seqs)


# ------------------------------------------------------------------------------ token statistics


LOGP_FLOOR = -1e4  # an action token the trainer's truncated distribution excludes: probability ~0, finite


@dataclass
class ScoringDist:
    """The distribution the rollout engine sampled from, which the trainer must score tokens under:
    logits / temperature, banned ids removed, then top-k and top-p (``hybrid_rl.rollout.sampling.sampling_logprobs``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    banned_v: torch.Tensor | None = None


def policy_logprobs(logits_btv, targets_bt, mask_bt, dist: ScoringDist | None = None, with_entropy: bool = False):
    """Log-prob of each target under ``dist`` (fp32, differentiable) and optionally its entropy [B, T].

    Off the mask the target is replaced by the most likely kept token, so every returned value is finite
    (an observation token may lie outside the top-p set); an action token the truncation drops gets
    ``LOGP_FLOOR``."""
    from hybrid_rl.rollout.sampling import sampling_logprobs

    dist = dist or ScoringDist()
    b, t, v = logits_btv.shape
    logp_btv = sampling_logprobs(logits_btv.reshape(b * t, v), dist.temperature, dist.top_k, dist.top_p,
                                 dist.banned_v).view(b, t, v)
    safe_bt = torch.where(mask_bt.bool(), targets_bt, logp_btv.detach().argmax(-1))
    logp_bt = logp_btv.gather(-1, safe_bt[..., None]).squeeze(-1).clamp(min=LOGP_FLOOR)
    if not with_entropy:
        return logp_bt, None
    finite_btv = torch.isfinite(logp_btv)
    plogp_btv = torch.where(finite_btv, logp_btv.exp() * logp_btv.masked_fill(~finite_btv, 0.0), torch.zeros_like(logp_btv))
    return logp_bt, -plogp_btv.sum(-1)


# ------------------------------------------------------------------------------ naive twins


def _ppo_token_naive(lp, old, a, low, high):
    r = torch.exp(lp - old)
    return -torch.minimum(r * a, r.clamp(1 - low, 1 + high) * a)


def grpo_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, lambda lp, o, a: _ppo_token_naive(lp, o, a, clip.low, clip.low))


def dapo_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, lambda lp, o, a: _ppo_token_naive(lp, o, a, clip.low, clip.high))


def reinforce_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, lambda lp, o, a: -a * lp)


def _per_token_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, fn):
    rows = []
    for b in range(logp_bt.shape[0]):
        row = []
        for t in range(logp_bt.shape[1]):
            row.append(fn(logp_bt[b, t], old_logp_bt[b, t], adv_bt[b, t]) if mask_bt[b, t] else torch.zeros((), dtype=logp_bt.dtype))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def gspo_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    rows = []
    for b in range(logp_bt.shape[0]):
        on = [t for t in range(logp_bt.shape[1]) if mask_bt[b, t]]
        s = torch.exp(sum(logp_bt[b, t] - old_logp_bt[b, t] for t in on) / max(len(on), 1)) if on else logp_bt[b, 0] * 0 + 1
        adv = sum(adv_bt[b, t] for t in on) / max(len(on), 1) if on else adv_bt[b, 0] * 0
        seq_loss = -torch.minimum(s * adv, s.clamp(1 - clip.seq_low, 1 + clip.seq_high) * adv)
        rows.append(torch.stack([seq_loss if mask_bt[b, t] else torch.zeros((), dtype=logp_bt.dtype) for t in range(logp_bt.shape[1])]))
    return torch.stack(rows)


def aggregate_loss_naive(loss_bt, mask_bt, mode, num_tokens, num_seqs):
    total = loss_bt.sum() * 0
    for b in range(loss_bt.shape[0]):
        toks = [loss_bt[b, t] for t in range(loss_bt.shape[1]) if mask_bt[b, t]]
        if mode == "token-mean":
            total = total + sum(toks) / max(num_tokens, 1) if toks else total
        elif mode == "seq-mean-token-sum":
            total = total + sum(toks) / max(num_seqs, 1) if toks else total
        else:
            total = total + (sum(toks) / len(toks)) / max(num_seqs, 1) if toks else total
    return total


NAIVE = {"grpo": grpo_loss_naive, "dapo": dapo_loss_naive, "gspo": gspo_loss_naive, "reinforce": reinforce_loss_naive}
