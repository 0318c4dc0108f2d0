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
               Every sequence weighs the same, so it is aggregated with seq-mean-token-mean (the config
               refuses another ``algo.loss_agg``: token-mean would weigh a sequence by its length).
    reinforce  -A * log pi, no ratio, no clipping (plain on-policy REINFORCE with a group baseline)
    clip-cov   grpo/dapo's clipped loss with the gradient of a few high-covariance tokens detached (Cui et al. 2025)
    kl-cov     the unclipped surrogate -r A, plus coef * |log r| on the top-covariance tokens (Cui et al. 2025)

Covariance-based entropy control (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models"). Under a policy gradient the entropy of the policy falls by about the
covariance of a token's log-prob and its advantage: confident tokens with positive advantage, and rare
tokens with negative advantage, sharpen the policy. Both variants limit the update of the tokens that
contribute most to that covariance, per token i on the mask:

    cov_i = (logp_i - mean(logp)) * (A_i - mean(A))      (``token_covariance``; no gradient)

The means run over the mask's tokens of the *micro-batch* the loss is called on (the tokens of the episodes
that entered the loss: with ``algo.skip_zero_advantage``, advantage-0 episodes are not among them), not
over the whole step. That is what verl's implementation of the paper does (its loss function sees one
micro-batch); the paper writes the means over the batch. So the selection, unlike every other loss here,
depends on how the step is split into micro-batches (``train.micro_batch_tokens``; packing fits more
episodes into one, so it changes the split of a step that needs several): only the per-token loss *given*
the selection is separable, and the step-wide normalisers stay those of ``aggregate_loss``. Within a
micro-batch neither loss depends on how its episodes are laid out in rows (packing, prefix sharing; below).
The quickstart's steps (64 episodes, train.micro_batch_tokens 8192) are one micro-batch on Nim and Buttons.

How many tokens: k = ceil(ratio * n) of the micro-batch's n mask tokens (0 when ratio is 0, at least 1
when ratio > 0, at most n). The paper's ratios (2e-4, 2e-3) were set for batches of millions of tokens;
a step here has a few hundred action tokens, where int(ratio * n) would select nothing (verl takes
max(1, int(ratio * n)) and requires ratio > 0; here ratio 0 turns the selection off). ceil selects at
least one token per micro-batch for any positive ratio, so at the paper's ratios the fraction selected is
1/n per micro-batch, far above the ratio: set the ratio for the batch at hand (``train/cov_selected_frac``
shows what was selected).

    clip-cov   candidates: mask tokens with ``clip_cov_lb <= cov <= clip_cov_ub`` that the PPO clip has not
               already clipped (their gradient is 0 already; verl excludes them too). k = ceil(clip_cov_ratio
               * n) of them (all, if fewer) are drawn at random and their loss is detached: the value stays
               the clipped PPO loss (so ``train/loss`` is comparable), the gradient there is 0; every other
               token has the clipped objective with ``clip.low`` / ``clip.high`` (dapo's range; set
               ``clip_eps_high = clip_eps_low`` for grpo's). The paper "detaches"; verl multiplies the
               loss by 0, which gives the same gradient. The draw is ``torch.randperm`` from a
               ``torch.Generator`` seeded with ``clip.cov_seed`` (the trainer derives it from run.seed,
               the step, the update and the micro-batch index), over the candidates ordered by their cov
               (stable): so a rerun or resume draws the same tokens, the draw neither reads nor advances
               torch's global RNG (no other random stream shifts when clip-cov is switched on), the naive
               twin can reproduce it, and the choice does not depend on the row layout. At ratio 0 the
               loss is dapo's exactly (grpo's when clip.high == clip.low).
    kl-cov     the k = ceil(kl_cov_ratio * n) mask tokens with the largest cov (ties: the earlier token in
               the micro-batch's row-major order, by a stable sort) get ``-r A + kl_cov_coef * |logp - old_logp|``, every other token ``-r A``:
               no clipping on any token, as in the paper and verl (their KL term is this per-token
               |log ratio|). At ratio 0 it is the unclipped surrogate, which equals grpo/dapo wherever
               nothing is clipped. The penalty is 0 with zero gradient when old_logp is the trainer's own
               detached log-prob (a synchronous step with one update): kl-cov acts only with a ratio
               against another policy (``algo.mode: async`` or ``algo.updates_per_batch > 1``).

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

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from hybrid_rl.registry import Registry

@dataclass
class ClipRange:
    """The losses' hyperparameters (the clip ranges, and the covariance-control settings of clip-cov / kl-cov)."""

    low: float = 0.2  # ratio floor is 1 - low
    high: float = 0.2  # ratio ceiling is 1 + high (DAPO's clip-higher uses 0.28)
    seq_low: float = 3e-4  # gspo's sequence-ratio range (GSPO paper)
    seq_high: float = 4e-4
    clip_cov_ratio: float = 2e-4  # clip-cov: fraction of a micro-batch's mask tokens detached (rounded up)
    clip_cov_lb: float = 1.0  # clip-cov: only tokens with cov in [lb, ub] are candidates (the paper's 1 and 5)
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3  # kl-cov: fraction of a micro-batch's mask tokens penalised (rounded up)
    kl_cov_coef: float = 1.0  # kl-cov: weight of |logp - old_logp| on those tokens (the paper's 1)
    cov_seed: int = 0  # clip-cov: seed of the random draw (the trainer sets one per micro-batch)


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


# ------------------------------------------------------------------------------ covariance-based entropy control


def token_covariance(logp_bt, adv_bt, mask_bt):
    """cov [B, T] = (logp - mean logp) * (A - mean A) on the mask (means over the mask's tokens of this
    micro-batch), 0 off it; no gradient."""
    on_bt = mask_bt.bool()
    n = on_bt.sum().clamp(min=1)
    logp_bt = torch.where(on_bt, logp_bt.detach(), torch.zeros_like(logp_bt))
    adv_bt = torch.where(on_bt, adv_bt.detach().to(logp_bt.dtype), torch.zeros_like(logp_bt))
    cov_bt = (logp_bt - logp_bt.sum() / n) * (adv_bt - adv_bt.sum() / n)
    return torch.where(on_bt, cov_bt, torch.zeros_like(cov_bt))


def cov_count(ratio: float, n: int) -> int:
    """Tokens to select out of ``n``: ceil(ratio * n), 0 at ratio 0, at least 1 for a positive ratio, at most n.
    (A hair below the product is taken first so that e.g. 0.1 * 30 = 3.0000000000000004 rounds to 3.)"""
    if ratio <= 0 or n <= 0:
        return 0
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def clip_cov_selection(cov_bt, mask_bt, clipped_bt, clip: ClipRange):
    """The tokens clip-cov detaches [B, T] bool: ``cov_count(clip_cov_ratio, n)`` drawn at random from the
    unclipped mask tokens with cov in [clip_cov_lb, clip_cov_ub], ordered by cov (stable) before the draw."""
    on_n = mask_bt.bool().reshape(-1)
    cov_n = cov_bt.reshape(-1)
    k = cov_count(clip.clip_cov_ratio, int(on_n.sum()))
    cand_n = on_n & ~clipped_bt.reshape(-1) & (cov_n >= clip.clip_cov_lb) & (cov_n <= clip.clip_cov_ub)
    idx = cand_n.nonzero().squeeze(1)
    selected_n = torch.zeros_like(on_n)
    if k and idx.numel():
        idx = idx[torch.sort(cov_n[idx], stable=True).indices]  # the draw does not depend on the row layout
        draw = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(int(clip.cov_seed)))[:k]
        selected_n[idx[draw.to(idx.device)]] = True
    return selected_n.view_as(mask_bt)


def kl_cov_selection(cov_bt, mask_bt, clip: ClipRange):
    """The tokens kl-cov penalises [B, T] bool: the ``cov_count(kl_cov_ratio, n)`` mask tokens with the
    largest cov (ties: the earlier token)."""
    on_n = mask_bt.bool().reshape(-1)
    k = cov_count(clip.kl_cov_ratio, int(on_n.sum()))
    selected_n = torch.zeros_like(on_n)
    if k:
        idx = on_n.nonzero().squeeze(1)
        top = torch.sort(cov_bt.reshape(-1)[idx], descending=True, stable=True).indices[:k]
        selected_n[idx[top]] = True
    return selected_n.view_as(mask_bt)


def cov_selection(name: str, logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    """(cov [B, T], the tokens loss ``name`` selects [B, T] bool) for clip-cov / kl-cov (the same
    selection the loss makes with these inputs), None for any other loss. For the trainer's metrics."""
    if name not in COV_LOSSES:
        return None
    with torch.no_grad():
        cov_bt = token_covariance(logp_bt, adv_bt, mask_bt)
        if name == "kl-cov":
            return cov_bt, kl_cov_selection(cov_bt, mask_bt, clip)
        ratio_bt = torch.exp(_log_ratio(logp_bt, old_logp_bt, mask_bt))
        _, clipped_bt = _clipped_objective(ratio_bt, adv_bt, clip.low, clip.high)
        return cov_bt, clip_cov_selection(cov_bt, mask_bt, clipped_bt, clip)


@POLICY_LOSSES.register("clip-cov")
def clip_cov_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    ratio_bt = torch.exp(_log_ratio(logp_bt, old_logp_bt, mask_bt))
    loss_bt, clipped_bt = _clipped_objective(ratio_bt, adv_bt, clip.low, clip.high)
    selected_bt = clip_cov_selection(token_covariance(logp_bt, adv_bt, mask_bt), mask_bt, clipped_bt & mask_bt.bool(), clip)
    return _masked(torch.where(selected_bt, loss_bt.detach(), loss_bt), clipped_bt, mask_bt)


@POLICY_LOSSES.register("kl-cov")
def kl_cov_loss(logp_bt, old_logp_bt, adv_bt, mask_bt, clip: ClipRange):
    log_ratio_bt = _log_ratio(logp_bt, old_logp_bt, mask_bt)
    loss_bt = -torch.exp(log_ratio_bt) * adv_bt
    selected_bt = kl_cov_selection(token_covariance(logp_bt, adv_bt, mask_bt), mask_bt, clip)
    loss_bt = torch.where(selected_bt, loss_bt + clip.kl_cov_coef * log_ratio_bt.abs(), loss_bt)
    return _masked(loss_bt, torch.zeros_like(mask_bt, dtype=torch.bool), mask_bt)


COV_LOSSES = ("clip-cov", "kl-cov")  # the losses whose per-token terms depend on a per-micro-batch selection


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


def chunked_policy_logprobs(hidden_btd, lm_head_weight_vd, targets_bt, mask_bt, dist: ScoringDist | None = None,
                            with_entropy: bool = False, chunk_tokens: int = 1024):
    """``policy_logprobs(F.linear(hidden_btd, lm_head_weight_vd).float(), ...)`` without its [B, T, V] tensors.

    The B*T tokens are scored ``chunk_tokens`` at a time, in the forward and again in the backward (which
    recomputes each chunk's logits), so at most one chunk's [chunk_tokens, V] tensors are alive, never the
    whole step's. Same values and gradients (w.r.t. the hidden states and the lm_head weight, through the
    log-prob and the entropy) as the unchunked path, up to float summation order. The logits are computed
    in the inputs' dtype (the autocast dtype under autocast), as ``lm_head`` would, then upcast to fp32."""
    if hidden_btd.dim() != 3 or lm_head_weight_vd.dim() != 2 or hidden_btd.shape[-1] != lm_head_weight_vd.shape[1]:
        raise ValueError(f"chunked_policy_logprobs needs hidden [B, T, D] and lm_head weight [V, D], got "
                         f"{tuple(hidden_btd.shape)} and {tuple(lm_head_weight_vd.shape)}")
    if targets_bt.shape != hidden_btd.shape[:2] or mask_bt.shape != hidden_btd.shape[:2]:
        raise ValueError(f"targets {tuple(targets_bt.shape)} and mask {tuple(mask_bt.shape)} must be [B, T] = "
                         f"{tuple(hidden_btd.shape[:2])}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    b, t, d = hidden_btd.shape
    logp_n, entropy_n = _ChunkedLogprobs.apply(hidden_btd.reshape(b * t, d), lm_head_weight_vd,
                                               targets_bt.reshape(-1), mask_bt.reshape(-1).bool(),
                                               dist or ScoringDist(), with_entropy, int(chunk_tokens))
    return logp_n.view(b, t), (entropy_n.view(b, t) if with_entropy else None)


def _logits_dtype(hidden_nd, weight_vd):
    device = hidden_nd.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden_nd.dtype, weight_vd.dtype)


def _chunk_scores(h_nd, w_vd, dist: ScoringDist):
    """One chunk's fp32 log-probs [n, V] under ``dist`` (-inf off the kept set), from ``h_nd @ w_vd.T``."""
    from hybrid_rl.rollout.sampling import sampling_logprobs

    return sampling_logprobs(torch.mm(h_nd, w_vd.t()).float(), dist.temperature, dist.top_k, dist.top_p, dist.banned_v)


def _chunk_entropy_(logp_cv):
    """Entropy [n] of a chunk's log-probs; ``logp_cv`` is used up (its -inf, off the kept set, become 0 so
    that p * logp is 0 there, as ``policy_logprobs`` has it)."""
    p_cv = logp_cv.exp()
    return -(p_cv * logp_cv.nan_to_num_(nan=0.0, neginf=0.0)).sum(-1)


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward: per chunk, logits -> scoring log-softmax -> gather (and entropy); saves the inputs, the
    targets actually scored and the entropies [N]. Backward: per chunk, the logits again, then with p the
    kept-set probabilities, H the entropy and tau the temperature,
        d logits = (g_logp * (onehot(target) - p) - g_ent * p * (logp + H)) / tau
                 = p * (a * logp + b) + onehot(target) * g_logp / tau
    with a = -g_ent / tau and b = (-g_ent * H - g_logp) / tau per token,
    zero off the kept set (the truncation masks are constants, as in autograd through ``sampling_logprobs``)
    and with g_logp zero where the log-prob is held at ``LOGP_FLOOR`` (the clamp's gradient)."""

    @staticmethod
    def forward(ctx, hidden_nd, weight_vd, targets_n, mask_n, dist, with_entropy, chunk_tokens):
        dtype = _logits_dtype(hidden_nd, weight_vd)
        w_vd = weight_vd.to(dtype)
        n = hidden_nd.shape[0]
        logp_n = torch.empty(n, dtype=torch.float32, device=hidden_nd.device)
        entropy_n = torch.empty_like(logp_n) if with_entropy else logp_n.new_empty(0)
        safe_n = torch.empty_like(targets_n)
        live_n = torch.empty(n, dtype=torch.bool, device=hidden_nd.device)  # above the floor: the clamp passes grad
        with _autocast_off(hidden_nd.device.type):
            for lo in range(0, n, chunk_tokens):
                hi = min(lo + chunk_tokens, n)
                logp_cv = _chunk_scores(hidden_nd[lo:hi].to(dtype), w_vd, dist)
                safe_n[lo:hi] = torch.where(mask_n[lo:hi], targets_n[lo:hi], logp_cv.argmax(-1))
                raw_c = logp_cv.gather(-1, safe_n[lo:hi, None]).squeeze(-1)
                live_n[lo:hi] = raw_c >= LOGP_FLOOR
                logp_n[lo:hi] = raw_c.clamp(min=LOGP_FLOOR)
                if with_entropy:
                    entropy_n[lo:hi] = _chunk_entropy_(logp_cv)
                del logp_cv
        ctx.save_for_backward(hidden_nd, weight_vd, safe_n, live_n, entropy_n)
        ctx.dist, ctx.chunk_tokens, ctx.dtype = dist, chunk_tokens, dtype
        ctx.set_materialize_grads(False)
        return logp_n, entropy_n

    @staticmethod
    def backward(ctx, g_logp_n, g_entropy_n):
        hidden_nd, weight_vd, safe_n, live_n, entropy_n = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if (g_logp_n is None and g_entropy_n is None) or not (need_h or need_w):
            return (None,) * 7
        dtype, dist, n = ctx.dtype, ctx.dist, hidden_nd.shape[0]
        w_vd = weight_vd.to(dtype)
        g_logp_n = torch.zeros_like(live_n, dtype=torch.float32) if g_logp_n is None else \
            torch.where(live_n, g_logp_n.float(), 0.0)
        a_n = torch.zeros_like(g_logp_n) if g_entropy_n is None else -g_entropy_n.float() / dist.temperature
        b_n = (a_n * entropy_n if g_entropy_n is not None else 0.0) - g_logp_n / dist.temperature
        onehot_n = g_logp_n / dist.temperature
        grad_h_nd = torch.empty_like(hidden_nd) if need_h else None
        grad_w_vd = torch.zeros(weight_vd.shape, dtype=torch.float32, device=weight_vd.device) if need_w else None
        with _autocast_off(hidden_nd.device.type), torch.no_grad():
            for lo in range(0, n, ctx.chunk_tokens):
                hi = min(lo + ctx.chunk_tokens, n)
                h_cd = hidden_nd[lo:hi].to(dtype)
                logp_cv = _chunk_scores(h_cd, w_vd, dist)
                p_cv = logp_cv.exp()
                # p * (a logp + b), with logp's -inf (p = 0 there) replaced first so that no 0 * inf appears
                g_cv = torch.addcmul(b_n[lo:hi, None], logp_cv.nan_to_num_(nan=0.0, neginf=0.0), a_n[lo:hi, None],
                                     out=logp_cv).mul_(p_cv)
                del p_cv
                g_cv.scatter_add_(-1, safe_n[lo:hi, None], onehot_n[lo:hi, None])
                g_cv = g_cv.to(dtype)  # what autograd hands the matmul: the grad of ``.float()`` is a cast back
                if need_h:
                    grad_h_nd[lo:hi] = torch.mm(g_cv, w_vd).to(hidden_nd.dtype)
                if need_w:
                    grad_w_vd.addmm_(g_cv.t().float(), h_cd.float())
                del logp_cv, g_cv
        if need_w:
            grad_w_vd = grad_w_vd.to(weight_vd.dtype)
        return grad_h_nd, grad_w_vd, None, None, None, None, None


def _autocast_off(device_type):
    """Autocast disabled inside: the chunks pick their dtype once (``_logits_dtype``) and cast explicitly."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


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


def _covariances_naive(logp_bt, adv_bt, mask_bt):
    """[(b, t, cov)] for the mask's tokens in row-major order, with plain Python means."""
    on = [(b, t) for b in range(logp_bt.shape[0]) for t in range(logp_bt.shape[1]) if mask_bt[b, t]]
    lp = {(b, t): float(logp_bt[b, t].detach()) for b, t in on}
    mean_lp = sum(lp.values()) / max(len(on), 1)
    mean_a = sum(float(adv_bt[b, t]) for b, t in on) / max(len(on), 1)
    return [(b, t, (lp[b, t] - mean_lp) * (float(adv_bt[b, t]) - mean_a)) for b, t in on]


def _count_naive(ratio, n):
    k = 0
    while k < n and k < ratio * n - 1e-9:  # the smallest k >= ratio * n
        k += 1
    return max(k, 1) if ratio > 0 and n > 0 else 0


def clip_cov_selection_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    covs = _covariances_naive(logp_bt, adv_bt, mask_bt)
    cands = []
    for b, t, c in covs:
        lp, o, a = float(logp_bt[b, t].detach()), float(old_logp_bt[b, t]), float(adv_bt[b, t])
        r = math.exp(lp - o)
        clipped = min(max(r, 1 - clip.low), 1 + clip.high) * a < r * a
        if clip.clip_cov_lb <= c <= clip.clip_cov_ub and not clipped:
            cands.append((c, b, t))
    cands.sort(key=lambda x: x[0])  # stable: equal covs keep row-major order
    k = _count_naive(clip.clip_cov_ratio, len(covs))
    if not k or not cands:
        return set()
    draw = torch.randperm(len(cands), generator=torch.Generator().manual_seed(int(clip.cov_seed)))[:k].tolist()
    return {(cands[j][1], cands[j][2]) for j in draw}


def kl_cov_selection_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    covs = _covariances_naive(logp_bt, adv_bt, mask_bt)
    order = sorted(range(len(covs)), key=lambda j: -covs[j][2])  # stable: ties keep row-major order
    return {(covs[j][0], covs[j][1]) for j in order[:_count_naive(clip.kl_cov_ratio, len(covs))]}


def _cov_loss_naive(logp_bt, mask_bt, selected, token_loss):
    """Per-token loss of the covariance losses' naive twins: ``token_loss(b, t, is_selected)`` on the mask, 0 off it."""
    return torch.stack([torch.stack([token_loss(b, t, (b, t) in selected) if mask_bt[b, t] else torch.zeros((), dtype=logp_bt.dtype)
                                     for t in range(logp_bt.shape[1])]) for b in range(logp_bt.shape[0])])


def clip_cov_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    selected = clip_cov_selection_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip)

    def token_loss(b, t, chosen):
        loss = _ppo_token_naive(logp_bt[b, t], old_logp_bt[b, t], adv_bt[b, t], clip.low, clip.high)
        return loss.detach() if chosen else loss

    return _cov_loss_naive(logp_bt, mask_bt, selected, token_loss)


def kl_cov_loss_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip):
    selected = kl_cov_selection_naive(logp_bt, old_logp_bt, adv_bt, mask_bt, clip)

    def token_loss(b, t, chosen):
        d = logp_bt[b, t] - old_logp_bt[b, t]
        loss = -torch.exp(d) * adv_bt[b, t]
        return loss + clip.kl_cov_coef * torch.abs(d) if chosen else loss

    return _cov_loss_naive(logp_bt, mask_bt, selected, token_loss)


NAIVE = {"grpo": grpo_loss_naive, "dapo": dapo_loss_naive, "gspo": gspo_loss_naive, "reinforce": reinforce_loss_naive,
         "clip-cov": clip_cov_loss_naive, "kl-cov": kl_cov_loss_naive}
NAIVE_COV_SELECTION = {"clip-cov": clip_cov_selection_naive, "kl-cov": kl_cov_selection_naive}
