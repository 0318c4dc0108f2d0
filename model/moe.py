"""Mixture-of-Experts (and LatentMoE) with the Nemotron-3 sigmoid router, plus the dense squared-ReLU MLP.

Router (fp32, on the full hidden state):  s = sigmoid(h W^T);  top-k on s + e_score_correction_bias;
weights = s of the chosen experts, renormalised (norm_topk_prob), times routed_scaling_factor.  The bias
only selects; it is the aux-loss-free balancer, moved by ``balance_update`` outside autograd.

Routed experts run in ``moe_latent_size`` when set (fc1_latent_proj before, fc2_latent_proj after their
weighted sum); the shared expert runs on the full hidden state and is added after.

Dispatch (``dispatch_grouped``): the N*k (token, expert) pairs are sorted by expert and the token rows
gathered once; each active expert runs one matmul over its contiguous slice (training), or, without
autograd, all experts run as one padded batched matmul (decode: two ops instead of 2E).  Results are
gathered back to pair order and summed with the routing weights.  No Python loop over tokens, no
scatter-add.  ``torch._grouped_mm`` is not used: on CPU it has no backward and is slow on the
transposed weight layout.  ``dispatch_naive`` is the reference.

Routing replay: ``routing`` gives the experts to use ([N, k]); the weights are recomputed from the
current scores, as R3 prescribes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .norms import fp32_region


def relu2(x):
    if torch.is_grad_enabled():  # training: one kernel pass each way on CPU fp32
        from .train_ops import relu2_train

        return relu2_train(x)
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


def dispatch_grouped(x_nd, idx_nk, w_nk, up_eid, down_edi, transposed=None, counts_e=None):
    """Tokens grouped per expert; equal to ``dispatch_naive``. Returns [N, D_out] fp32.

    Without autograd and with reasonably balanced loads, the groups are padded to the largest one and
    run as two batched matmuls over all experts (fewest ops: the decode path); ``transposed`` =
    (up^T [E,D,I], down^T [E,I,D_out]) contiguous copies speed those up (``Experts.transposed``).
    Otherwise each active expert runs one matmul over its contiguous slice of the sorted pairs.  Either
    way the results are gathered back to (token, slot) order and summed with the routing weights:
    gathers only, no scatter.  ``counts_e`` (pairs per expert) may be passed when already known."""
    n, k = idx_nk.shape
    num_experts = up_eid.shape[0]
    flat = idx_nk.reshape(-1)  # [N*k] expert of each (token, slot) pair
    counts = torch.bincount(flat, minlength=num_experts) if counts_e is None else counts_e
    if not torch.is_grad_enabled():
        cap = int(counts.max())
        if cap * num_experts <= 2 * n * k + 8 * num_experts:
            if transposed is None:
                transposed = (up_eid.transpose(1, 2), down_edi.transpose(1, 2))
            ys = _padded_experts(x_nd, flat, cap, *transposed)
            return torch.bmm(w_nk[:, None, :], ys.view(n, k, -1).float())[:, 0]
    if torch.is_grad_enabled():  # training: one autograd Function, gradients straight into [E, ...] buffers
        from .train_ops import grouped_experts

        return grouped_experts(x_nd, idx_nk, w_nk, up_eid, down_edi, counts)
    order = torch.argsort(flat, stable=True)  # pairs sorted by expert
    xs = x_nd.index_select(0, order // k)  # [N*k, D] rows in expert order
    parts = [F.linear(relu2(F.linear(chunk, up_eid[e])), down_edi[e])
             for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.shape[0]]
    ys_sorted = torch.cat(parts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    ys = ys_sorted.index_select(0, inverse)  # back to pair order
    return (ys.view(n, k, -1).float() * w_nk[..., None]).sum(1)


def _padded_experts(x_nd, flat, cap, up_edi, down_eid):
    """All experts as one bmm over groups padded to ``cap`` rows; returns [N*k, D_out] in pair order.

    A pair's row in the padded [E*cap] layout is expert * cap + its rank among that expert's pairs
    (a cumulative count over a one-hot: no sort)."""
    n, num_experts, nk = x_nd.shape[0], up_edi.shape[0], flat.numel()
    k = nk // n
    rank = F.one_hot(flat, num_experts).cumsum(0).gather(1, flat[:, None])[:, 0] - 1  # [N*k]
    slot = flat * cap + rank  # [N*k]
    token_of_slot = torch.full((num_experts * cap,), n, dtype=torch.long, device=flat.device)  # n = a zero row
    token_of_slot[slot] = torch.arange(nk, device=flat.device) // k
    xp = torch.cat([x_nd, x_nd.new_zeros(1, x_nd.shape[1])]).index_select(0, token_of_slot)
    hidden = relu2(torch.bmm(xp.view(num_experts, cap, -1), up_edi))  # [E,cap,I]
    yp = torch.bmm(hidden, down_eid).view(num_experts * cap, -1)
    return yp.index_select(0, slot)


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

    def transposed(self):
        """(up^T [E, D_e, I], down^T [E, I, D_e]) contiguous, for the no-autograd padded path (a CPU
        bmm over a transposed view of the weights is ~1.3x slower).  A copy kept (not saved) while the
        parameters are unchanged (``kernels.derived``: optimizer steps and load_state_dict rebuild it)."""
        return kernels.derived(self, "transposed", (self.up_proj, self.down_proj), lambda: (
            self.up_proj.detach().transpose(1, 2).contiguous(), self.down_proj.detach().transpose(1, 2).contiguous()))

    def packed(self):
        """The expert weights as model/kernels' ``moe_experts`` takes them: up^T [E, D_e, I] and down^T
        [E, I, D_e], each cut into panels of 16 output columns stored one after another (zero-padded)."""
        return kernels.derived(self, "packed", (self.up_proj, self.down_proj), lambda: (
            kernels.pack_panels(self.up_proj.detach().transpose(1, 2)),
            kernels.pack_panels(self.down_proj.detach().transpose(1, 2))))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)
        if cfg.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(cfg.hidden_size, cfg.moe_latent_size, bias=False)
            self.fc2_latent_proj = nn.Linear(cfg.moe_latent_size, cfg.hidden_size, bias=False)
        # tokens routed to each expert since the last balance update (not saved with the weights)
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)

    def forward(self, h_btd, ctx, layer_idx: int):
        shape = h_btd.shape
        h = h_btd.reshape(-1, shape[-1])
        replay = ctx.replay_for(layer_idx)
        if replay is None and ctx.mode == "extend" and kernels.usable(h, self.gate.weight, self.experts.up_proj,
                                                                      self.expert_load):
            return self._forward_fused(h, ctx, layer_idx).view(shape)
        idx, w = route(h, self.gate.weight, self.gate.e_score_correction_bias, self.cfg.num_experts_per_tok,
                       self.cfg.routed_scaling_factor, self.cfg.norm_topk_prob, replay)
        ctx.record(layer_idx, idx)
        counts = self._count(idx, ctx.valid_bt)
        x = self.fc1_latent_proj(h) if self.cfg.moe_latent_size is not None else h
        decoding = not torch.is_grad_enabled() and x.dtype == self.experts.up_proj.dtype
        y = dispatch_grouped(x, idx, w, self.experts.up_proj, self.experts.down_proj,
                             transposed=self.experts.transposed() if decoding else None,
                             counts_e=counts).to(x.dtype)
        if self.cfg.moe_latent_size is not None:
            y = self.fc2_latent_proj(y)
        if self.cfg.n_shared_experts:
            y = y + self.shared_experts(h)
        return y.view(shape)

    def _forward_fused(self, h_nd, ctx, layer_idx):
        """Cache extension through model/kernels (CPU fp32, no autograd; decode steps run the same kernels
        from model/fused.py): one matmul for the router, latent and shared up-projections, two kernel
        calls for the router (with the load count) and all routed experts at their exact sizes, one
        matmul for the latent and shared down-projections together."""
        cfg = self.cfg
        n, e, k = h_nd.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
        latent, shared = cfg.moe_latent_size is not None, bool(cfg.n_shared_experts)
        d_e, i_s = cfg.moe_expert_dim, (cfg.moe_shared_expert_intermediate_size if shared else 0)
        w_in, w_out = self.step_weights()
        proj = F.linear(h_nd, w_in)  # [N, E | latent | shared up]
        idx = torch.empty(n, k, dtype=torch.long)
        w = torch.empty(n, k, dtype=torch.float32)
        lib, p = kernels.library(), kernels.ptr
        count_here = ctx.valid_bt is None  # else only the tokens that are not padding count
        lib.moe_route(p(proj), p(self.gate.e_score_correction_bias), p(idx), p(w),
                      p(self.expert_load) if count_here else None, n, e, k, int(cfg.norm_topk_prob), proj.stride(0),
                      cfg.routed_scaling_factor)
        ctx.record(layer_idx, idx)
        if not count_here:
            self._count(idx, ctx.valid_bt)
        x = proj[:, e:e + d_e] if latent else h_nd  # the routed experts' input
        up_p, down_p = self.experts.packed()
        buf = h_nd.new_empty(n, d_e + i_s)  # [routed sum | relu^2(shared up)]
        lib.moe_experts(p(x), p(idx), p(w), p(up_p), p(down_p), p(buf), p(proj[:, proj.shape[1] - i_s:]) if shared else None,
                        n, k, e, d_e, cfg.moe_intermediate_size, x.stride(0), buf.stride(0), proj.stride(0), i_s)
        if latent:
            return F.linear(buf, w_out)  # fc2_latent_proj and the shared down-projection in one matmul
        y = buf[:, :d_e]
        return y + self.shared_experts.down_proj(buf[:, d_e:]) if shared else y.contiguous()

    def step_weights(self):
        """(input weights [E + latent + shared, D], output weights [D, latent + shared] or None), kept
        while the parameters are unchanged."""
        return kernels.derived(self, "step", self._step_params(), self._step_weights)

    def _step_params(self):
        params = [self.gate.weight]
        if self.cfg.moe_latent_size is not None:
            params += [self.fc1_latent_proj.weight, self.fc2_latent_proj.weight]
        if self.cfg.n_shared_experts:
            params += [self.shared_experts.up_proj.weight, self.shared_experts.down_proj.weight]
        return params

    def _step_weights(self):
        """(input weights [E + latent + shared, D], output weights [D, latent + shared] or None)."""
        latent, shared = self.cfg.moe_latent_size is not None, bool(self.cfg.n_shared_experts)
        w_in = [self.gate.weight]
        w_out = []
        if latent:
            w_in.append(self.fc1_latent_proj.weight)
            w_out.append(self.fc2_latent_proj.weight)
        if shared:
            w_in.append(self.shared_experts.up_proj.weight)
            w_out.append(self.shared_experts.down_proj.weight)
        return torch.cat(w_in).contiguous(), (torch.cat(w_out, dim=1).contiguous() if latent else None)

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
