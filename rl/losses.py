"""Policy-gradient losses, one pure function per variant, and the ways to average them over tokens.

Legend (shapes in names):
    logp_bt       [B, T]  log-prob of each token under the policy being trained (has grad)
    old_logp_bt   [B, T]  log-prob under the policy that the ratio is taken against (no grad): the
                          trainer's own detached log-probs on a synchronous step (ratio exactly 1), the
                          rollout's log-probs when the batch is stale (async mode: importance correction)
    adv_b         [B]     one advantage per sequence (episode), broadcast over its action tokens
    mask_bt       [B, T]  1 on trained (model-generated) tokens, 0 on prompts/observations/padding
    -> loss_bt    [B, T]  per-token loss (0 off the mask), clipped_bt [B, T] bool: the clip was active

Variants (``POLICY_LOSSES[name]``, cf. verl's ``register_policy_loss``):
    grpo       PPO clipped ratio per token, symmetric eps (Schulman 2017; GRPO, Shao 2024)
    dapo       the same with clip-higher: eps_low < eps_high lets rare tokens grow (Yu et al. 2025)
    gspo       one ratio per sequence, exp(mean_t log ratio), clipped per sequence (Zheng et al. 2025)
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

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ClipRange:
    low: float = 0.2  # ratio floor is 1 - low
    high: float = 0.2  # ratio ceiling is 1 + high (DAPO's clip-higher uses 0.28)


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ClipRange], tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        close = difflib.get_close_matches(name, POLICY_LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown policy loss {name!r}.{hint} Valid: {', '.join(POLICY_LOSSES)}.")
    return POLICY_LOSSES[name]


def _clipped_objective(ratio, adv, low, high):
    """-min(r A, clip(r, 1-low, 1+high) A) and where the clipped branch was the one taken."""
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@register_policy_loss("grpo")
def grpo_loss(logp_bt, old_logp_bt, adv_b, mask_bt, clip: ClipRange):
    ratio_bt = torch.exp(logp_bt - old_logp_bt)
    loss_bt, clipped_bt = _clipped_objective(ratio_bt, adv_b[:, None], clip.low, clip.low)
    return loss_bt * mask_bt, clipped_bt & mask_bt.bool()


@register_policy_loss("dapo")
def dapo_loss(logp_bt, old_logp_bt, adv_b, mask_bt, clip: ClipRange):
    ratio_bt = torch.exp(logp_bt - old_logp_bt)
    loss_bt, clipped_bt = _clipped_objective(ratio_bt, adv_b[:, None], clip.low, clip.high)
    return loss_bt * mask_bt, clipped_bt & mask_bt.bool()


@register_policy_loss("gspo")
def gspo_loss(logp_bt, old_logp_bt, adv_b, mask_bt, clip: ClipRange):
    n_b = mask_bt.sum(1).clamp(min=1)
    log_ratio_b = ((logp_bt - old_logp_bt) * mask_bt).sum(1) / n_b  # length-normalised sequence ratio
    loss_b, clipped_b = _clipped_objective(torch.exp(log_ratio_b), adv_b, clip.low, clip.high)
    return loss_b[:, None] * mask_bt, clipped_b[:, None] & mask_bt.bool()


@register_policy_loss("reinforce")
def reinforce_loss(logp_bt, old_logp_bt, adv_b, mask_bt, clip: ClipRange):
    return -adv_b[:, None] * logp_bt * mask_bt, torch.zeros_like(mask_bt, dtype=torch.bool)


# ------------------------------------------------------------------------------ aggregation

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def aggregate_loss(loss_bt, mask_bt, mode: str, num_tokens: float, num_seqs: float):
    """Reduce a micro-batch's per-token loss with the step-wide normalisers (see module docstring)."""
    if mode == "token-mean":
        return (loss_bt * mask_bt).sum() / max(num_tokens, 1)
    if mode == "seq-mean-token-sum":
        return (loss_bt * mask_bt).sum() / max(num_seqs, 1)
    if mode == "seq-mean-token-mean":
        per_seq_b = (loss_bt * mask_bt).sum(1) / mask_bt.sum(1).clamp(min=1)
        return per_seq_b.sum() / max(num_seqs, 1)
    close = difflib.get_close_matches(mode, AGGREGATIONS, n=1)
    raise ValueError(f"unknown loss aggregation {mode!r}{f' (did you mean {close[0]!r}?)' if close else ''}; valid: {', '.join(AGGREGATIONS)}")


# ------------------------------------------------------------------------------ token statistics


def token_logprobs(logits_btv, targets_bt):
    """log softmax(logits)[target] per position, in fp32: [B, T, V], [B, T] -> [B, T]."""
    logz_bt = torch.logsumexp(logits_btv.float(), dim=-1)
    return logits_btv.float().gather(-1, targets_bt[..., None]).squeeze(-1) - logz_bt


def token_entropy(logits_btv):
    """Entropy of the next-token distribution at each position: [B, T, V] -> [B, T]."""
    logp_btv = torch.log_softmax(logits_btv.float(), dim=-1)
    return -(logp_btv.exp() * logp_btv).sum(-1)


# ------------------------------------------------------------------------------ naive twins


def _ppo_token_naive(lp, old, a, low, high):
    r = torch.exp(lp - old)
    return -torch.minimum(r * a, r.clamp(1 - low, 1 + high) * a)


def grpo_loss_naive(logp_bt, old_logp_bt, adv_b, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_b, mask_bt, lambda lp, o, a: _ppo_token_naive(lp, o, a, clip.low, clip.low))


def dapo_loss_naive(logp_bt, old_logp_bt, adv_b, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_b, mask_bt, lambda lp, o, a: _ppo_token_naive(lp, o, a, clip.low, clip.high))


def reinforce_loss_naive(logp_bt, old_logp_bt, adv_b, mask_bt, clip):
    return _per_token_naive(logp_bt, old_logp_bt, adv_b, mask_bt, lambda lp, o, a: -a * lp)


def _per_token_naive(logp_bt, old_logp_bt, adv_b, mask_bt, fn):
    rows = []
    for b in range(logp_bt.shape[0]):
        row = []
        for t in range(logp_bt.shape[1]):
            row.append(fn(logp_bt[b, t], old_logp_bt[b, t], adv_b[b]) if mask_bt[b, t] else logp_bt[b, t] * 0)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def gspo_loss_naive(logp_bt, old_logp_bt, adv_b, mask_bt, clip):
    rows = []
    for b in range(logp_bt.shape[0]):
        terms = [logp_bt[b, t] - old_logp_bt[b, t] for t in range(logp_bt.shape[1]) if mask_bt[b, t]]
        s = torch.exp(sum(terms) / max(len(terms), 1)) if terms else logp_bt[b, 0] * 0 + 1
        seq_loss = -torch.minimum(s * adv_b[b], s.clamp(1 - clip.low, 1 + clip.high) * adv_b[b])
        rows.append(torch.stack([seq_loss if mask_bt[b, t] else seq_loss * 0 for t in range(logp_bt.shape[1])]))
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


def token_logprobs_naive(logits_btv, targets_bt):
    out = torch.empty(targets_bt.shape)
    for b in range(targets_bt.shape[0]):
        for t in range(targets_bt.shape[1]):
            row = [float(x) for x in logits_btv[b, t]]
            m = max(row)
            out[b, t] = row[int(targets_bt[b, t])] - (m + math.log(sum(math.exp(x - m) for x in row)))
    return out


NAIVE = {"grpo": grpo_loss_naive, "dapo": dapo_loss_naive, "gspo": gspo_loss_naive, "reinforce": reinforce_loss_naive}
