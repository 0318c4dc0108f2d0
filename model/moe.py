"""Mixture-of-Experts (and LatentMoE) with the Nemotron-3 sigmoid router, plus the dense squared-ReLU MLP.

Router (fp32, on the full hidden state):  s = sigmoid(h W^T);  top-k on s + e_score_correction_bias;
weights = s of the chosen experts, renormalised (norm_topk_prob), times routed_scaling_factor.  The bias
only selects; it is the aux-loss-free balancer, moved by ``balance_update`` outside autograd.

Routed experts run in ``moe_latent_size`` when set (fc1_latent_proj before, fc2_latent_proj after their
weighted sum); the shared expert runs on the full hidden state and is added after.

Dispatch (``dispatch_grouped``): the N*k (token, expert) pairs are sorted by expert and the token rows
gathered once; each active expert runs one matmul over its contiguous slice.  Results are gathered back
to pair order and summed with the routing weights.  No Python loop over tokens, no scatter-add.
``torch._grouped_mm`` is not used: on CPU it has no backward and is slow on the transposed weight
layout.  ``dispatch_naive`` (every pair on its own) is what it is tested against.

This is the reference implementation, one path with autograd through PyTorch's ops; model/fast/ keeps
the padded decode dispatch, the hand-written expert backward and the CPU kernels (``FastMoE``).

Routing replay: ``routing`` gives the experts to use ([N, k]); the weights are recomputed from the
current scores, as R3 prescribes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import fp32_region


def relu2(x):
    return torch.square(F.relu(x))


class MLP(nn.Module):
    """Dense non-gated squared-ReLU MLP (``-`` layers and the shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, ctx=None, layer_idx=None):
        return self.down_proj(relu2(self.up_proj(x)))


def route(h_nd, gate_weight_ed, bias_e, top_k, scaling, norm_topk, replay_nk=None):
    """Returns (experts [N,k] long, weights [N,k] fp32)."""
    with fp32_region(h_nd):
        scores = torch.sigmoid(F.linear(h_nd.float(), gate_weight_ed.float()))  # [N,E]
        if replay_nk is None:
            idx = torch.topk(scores.detach() + bias_e.float(), top_k, dim=-1, sorted=False).indices
        else:
            idx = replay_nk.to(device=h_nd.device, dtype=torch.long)
        w = scores.gather(1, idx)
        if norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * scaling


def dispatch_naive(x_nd, idx_nk, w_nk, up_eid, down_edi):
    """Reference: every (token, slot) pair on its own."""
    out = torch.zeros(x_nd.shape[0], down_edi.shape[1], dtype=torch.float32, device=x_nd.device)
    for n in range(x_nd.shape[0]):
        for j in range(idx_nk.shape[1]):
            e = idx_nk[n, j]
            y = down_edi[e] @ relu2(up_eid[e] @ x_nd[n])
            out[n] += w_nk[n, j] * y.float()
    return out


def dispatch_grouped(x_nd, idx_nk, w_nk, up_eid, down_edi, counts_e=None):
    """Tokens grouped per expert; equal to ``dispatch_naive``. Returns [N, D_out] fp32.

    Each active expert runs one matmul over its contiguous slice of the pairs sorted by expert; the
    results are gathered back to (token, slot) order and summed with the routing weights (gathers
    only, no scatter).  ``counts_e`` (pairs per expert) may be passed when already known."""
    n, k = idx_nk.shape
    flat = idx_nk.reshape(-1)  # [N*k] expert of each (token, slot) pair
    counts = torch.bincount(flat, minlength=up_eid.shape[0]) if counts_e is None else counts_e
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    xs = x_nd.index_select(0, order // k)  # [N*k, D] rows in expert order
    parts = [F.linear(relu2(F.linear(chunk, up_eid[e])), down_edi[e])
             for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.shape[0]]
    ys_sorted = torch.cat(parts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    ys = ys_sorted.index_select(0, inverse)  # back to pair order
    return (ys.view(n, k, -1).float() * w_nk[..., None]).sum(1)


class TopkRouter(nn.Module):
    """``gate.weight [E, D]`` and the selection bias ``gate.e_score_correction_bias [E]`` (fp32 buffer)."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))


class Experts(nn.Module):
    """Stacked expert weights, transformers' in-memory layout: up [E, I, D_e], down [E, D_e, I]."""

    def __init__(self, cfg):
        super().__init__()
        d_e, i = cfg.moe_expert_dim, cfg.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, i, d_e))
        self.down_proj = nn.Parameter(torch.empty(cfg.n_routed_experts, d_e, i))


class MoE(nn.Module):
    def __init__(self, cfg, mlp=MLP):
        """``mlp(hidden, intermediate)`` builds the shared expert (the implementation's MLP)."""
        super().__init__()
        self.cfg = cfg
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = mlp(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, cfg.moe_latent_size, bias=False)
            self.fc2_latent_proj = nn.Linear(cfg.moe_latent_size, cfg.hidden_size, bias=False)
        # tokens routed to each expert since the last balance update (not saved with the weights)
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, h_btd, ctx, layer_idx: int):
        shape = h_btd.shape
        h = h_btd.reshape(-1, shape[-1])
        idx, w = route(h, self.gate.weight, self.gate.e_score_correction_bias, self.cfg.num_experts_per_tok,
                       self.cfg.routed_scaling_factor, self.cfg.norm_topk_prob, ctx.replay_for(layer_idx))
        ctx.record(layer_idx, idx)
        counts = self._count(idx, ctx.count_bt if ctx.count_bt is not None else ctx.valid_bt)
        x = self.fc1_latent_proj(h) if self.cfg.moe_latent_size is not None else h
        y = self._experts(x, idx, w, counts).to(x.dtype)
        if self.cfg.moe_latent_size is not None:
            y = self.fc2_latent_proj(y)
        if self.cfg.n_shared_experts:
            y = y + self.shared_experts(h)
        return y.view(shape)

    def _experts(self, x_nd, idx_nk, w_nk, counts_e):
        """The routed experts' weighted sum [N, D_e] fp32."""
        return dispatch_grouped(x_nd, idx_nk, w_nk, self.experts.up_proj, self.experts.down_proj, counts_e)

    @torch.no_grad()
    def _count(self, idx_nk, valid_bt):
        """Adds the loads of the valid tokens; returns the pairs per expert of all tokens [E] long."""
        counts = torch.bincount(idx_nk.reshape(-1), minlength=self.expert_load.shape[0])
        if valid_bt is None:
            self.expert_load += counts
            return counts
        self.expert_load += torch.bincount(idx_nk[valid_bt.reshape(-1)].reshape(-1),
                                           minlength=self.expert_load.shape[0])
        return counts

    @torch.no_grad()
    def balance_update(self, rate: float) -> dict[str, float]:
        """Aux-loss-free balancing: bias += rate * sign(mean load - load); resets the load counter."""
        load = self.expert_load.clone()
        total = float(load.sum())
        stats = {"tokens": total}
        if total > 0:
            mean = load.mean()
            self.gate.e_score_correction_bias += rate * torch.sign(mean - load)
            stats.update(max_load_over_mean=float(load.max() / mean), min_load_over_mean=float(load.min() / mean),
                         unused_experts=float((load == 0).sum()))
        self.expert_load.zero_()
        return stats
