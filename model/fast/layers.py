"""The fast layers: the reference modules of model/ with the same parameters, each forward sending its
call to the fastest path that applies.

A fast module subclasses its reference (``FastMamba2Mixer(Mamba2Mixer)``, ``FastMoE(MoE)``, ...), so
names, layouts and state_dicts are the reference's.  ``use_kernels`` is fixed when the model is built
(``HybridLM(impl="fast")`` sets it; ``impl="torch"`` leaves it off); what remains decided per call is
what the data allows:

  training (autograd on)     the hand-written backwards of train_ops.py, with the CPU fp32 kernels
                             when ``use_kernels``; the Mamba mixer as one Function when the kernels apply
  cache extension            the extension kernels of kernels/decode.c (CPU fp32, ``use_kernels``),
                             else the reference code, with the padded expert dispatch
  scoring without autograd   the reference code, with the padded expert dispatch
  decode step                the reference one-step recurrence (the whole-model decode program of
                             fused.py is chosen by ``HybridLM.decode_step``)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, causal_attention_nwhd, packed_causal_mask, sdpa
from ..mamba import Mamba2Mixer, MixerOps
from ..moe import MLP, MoE, dispatch_grouped, relu2
from ..norms import RMSNorm
from ..shared import SharedPrefixes
from . import kernels
from .train_ops import (
    causal_conv_train,
    gated_group_rms_norm_train,
    grouped_experts,
    linear_train,
    mamba_mixer_train,
    mixer_kernels_usable,
    relu2_train,
    rms_norm_train,
    ssd_chunked_train,
)


# ----------------------------------------------------------------------------- linear layers
class FastLinear(nn.Linear):
    """``nn.Linear`` (the same parameters and state_dict) whose training forward runs ``linear_train``: its
    products through gemm.c where that applies.  ``use_kernel_linears`` turns a model's linear layers into it."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return linear_train(x, self.weight, self.bias)
        return super().forward(x)


def use_kernel_linears(model: nn.Module) -> None:
    """Every plain ``nn.Linear`` of ``model`` becomes a ``FastLinear`` (its class only: parameters, hooks and
    names stay), so the projections a reference module builds train through the kernels too."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear


# ----------------------------------------------------------------------------- norms and the dense MLP
class FastRMSNorm(RMSNorm):
    def __init__(self, size: int, eps: float, use_kernels: bool):
        super().__init__(size, eps)
        self.use_kernels = use_kernels

    def forward(self, x):
        if torch.is_grad_enabled():
            return rms_norm_train(x, self.weight, self.eps, self.use_kernels)
        return super().forward(x)


class FastAttention(Attention):
    def __init__(self, cfg, use_kernels: bool):
        super().__init__(cfg)
        self.use_kernels = use_kernels

    def attend_sequences(self, q, k, v, seg_bt):
        """Packed rows (``seg_bt``) attend document by document (``attend_documents``), not under the dense
        [B,1,T,T] mask, with which SDPA computes every block of every row.

        On the CPU with ``use_kernels``, half-precision inputs (autocast's bf16 projections) are attended in
        fp32: PyTorch's CPU flash kernel is ~3x slower in bf16 than in fp32 at training sizes (forward and
        backward of one ``bench grpo`` layer of ``tiny``: 27 ms against 9.5 ms; the update ~8% faster), and
        fp32 is the more exact of the two.  The output stays fp32; the output projection casts it as autocast
        says.  (The ``torch`` implementation keeps autocast's bf16, which the training-memory formula counts.)"""
        if self.use_kernels and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                return self._attend(q.float(), k.float(), v.float(), seg_bt)
        return self._attend(q, k, v, seg_bt)

    def _attend(self, q, k, v, seg_bt):
        if seg_bt is None:
            return super().attend_sequences(q, k, v, None)
        return attend_documents(q, k, v, seg_bt)

    def attend_virtual(self, q, k, v):
        """Virtual sequences of shared prefixes (model/shared.py), [n, W, heads, d]: as ``attend_sequences``."""
        return self.attend_sequences(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2)


def attend_documents(q_bhtd, k_bktd, v_bktd, seg_bt, min_fill: float = 0.85, dense_above: float = 0.85):
    """Causal attention within each document of packed rows, equal to SDPA under ``packed_causal_mask``.

    A document is a run of equal ``seg_bt`` values (what the mask calls one).  The documents are gathered
    out of the rows into batches of similar length (``model.shared.SharedPrefixes``, each document its own
    sequence), longest first: a batch takes documents down to ``min_fill`` of its longest one and pads the
    rest at their ends, which causal attention never reads from a real position.  Each batch is one causal
    SDPA call.  Under the dense mask every row pays for all
    its T x T scores, although its documents cover a fraction of them (the packed rows of a FrozenLake RL
    batch: 0.3-0.5), and a masked SDPA call is itself slower than a causal one of the same size (~1.3x on
    the CPU).  One such micro-batch, 14 rows of 568 tokens, forward and backward: 0.17 -> 0.11 s.  The
    outputs go back to their positions by one gather; every step is an indexing op, so autograd is PyTorch's.

    When the batches' padded scores (documents x width^2) would come to more than ``dense_above`` of the
    rows' (B x T^2), there is little to save (rows holding one document each and a little padding, as
    ``bench grpo``'s), and the rows attend under the mask as they are."""
    b, t = seg_bt.shape
    docs = SharedPrefixes(seg_bt, torch.full_like(seg_bt, -1), min_fill)  # every document on its own
    if docs.padded_scores() > dense_above * b * t * t:
        mask = packed_causal_mask(seg_bt)[:, None]
        return sdpa(q_bhtd, k_bktd, v_bktd, attn_mask=mask)
    out = docs.apply(causal_attention_nwhd, q_bhtd.transpose(1, 2), k_bktd.transpose(1, 2), v_bktd.transpose(1, 2))
    return out.transpose(1, 2)


class FastMLP(MLP):
    def __init__(self, hidden: int, intermediate: int, use_kernels: bool):
        super().__init__(hidden, intermediate)
        self.use_kernels = use_kernels

    def forward(self, x, ctx=None, layer_idx=None):
        if torch.is_grad_enabled():
            return self.down_proj(relu2_train(self.up_proj(x), self.use_kernels))
        return super().forward(x)


# ----------------------------------------------------------------------------- the Mamba-2 mixer
def _conv_train(x_btc, weight_kc, bias_c, prefix_bkc, seg_bt):
    """``causal_conv`` of a training forward (no cached prefix) with its hand-written backward."""
    return causal_conv_train(x_btc, weight_kc, bias_c, seg_bt)


def _scan_train(use_kernels):
    def scan(x, dt, A, B, C, D, chunk_size, initial_state, seg_bt):
        return ssd_chunked_train(x, dt, A, B, C, D, chunk_size, initial_state, seg_bt, use_kernels=use_kernels)

    return scan


# the mixer body's pieces in training, without and with the kernels
TRAIN_OPS = {use: MixerOps(_conv_train, _scan_train(use), gated_group_rms_norm_train) for use in (False, True)}


class FastMamba2Mixer(Mamba2Mixer):
    def __init__(self, cfg, use_kernels: bool):
        super().__init__(cfg)
        self.use_kernels = use_kernels

    def forward(self, h_btd, ctx, layer_idx: int):
        cache = ctx.cache
        if ctx.mode == "extend" and self.use_kernels and kernels.usable(
                h_btd, self.in_proj.weight, cache.conv[layer_idx], cache.ssm[layer_idx]):
            return self.out_proj(self._scan_fused(self.in_proj(h_btd), cache, layer_idx, ctx.n_new_b))
        if ctx.mode != "full" or not torch.is_grad_enabled():
            return super().forward(h_btd, ctx, layer_idx)
        proj = self.in_proj(h_btd)
        if ctx.shared is not None:  # shared prefixes (model/shared.py): each document after its parent
            y = ctx.shared.apply(lambda p: self._train_body(p, ctx.plain, layer_idx, h_btd.dtype), proj)
        else:
            y = self._train_body(proj, ctx, layer_idx, h_btd.dtype)
        return self.out_proj(y)

    def _train_body(self, proj, ctx, layer_idx, out_dtype):
        """Everything between the projections, with autograd: the fused mixer Function when its kernels
        apply (its fp32 output as it is), else the mixer's pieces (train_ops), cast to ``out_dtype``."""
        region = contextlib.nullcontext()
        if self.use_kernels and proj.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 autocast on the CPU: the projections run in bf16, the mixer body in its fp32 kernels
            # (its PyTorch ops in bf16 are slower than those kernels; train_ops.grouped_experts does the same)
            proj, region = proj.float(), torch.autocast("cpu", enabled=False)
        with region:
            if self.use_kernels and mixer_kernels_usable(proj, self.conv1d.weight, self.dt_bias, self.A_log, self.D,
                                                         self.norm.weight, seg_bt=ctx.seg_bt,
                                                         chunk_size=self.cfg.chunk_size):
                return mamba_mixer_train(self, proj, ctx.seg_bt)
        return self._mix(proj, ctx, layer_idx, TRAIN_OPS[self.use_kernels]).to(out_dtype)

    def scan_weights(self):
        """(conv weight [K, C] contiguous, A = -exp(A_log)) for the kernels, kept while unchanged."""
        return kernels.derived(self, "scan", (self.conv1d.weight, self.A_log), lambda: (
            self.conv1d.weight_kc().contiguous(), -torch.exp(self.A_log.float())))

    def _scan_fused(self, proj_bti, cache, layer_idx, n_new_b):
        """Everything between the projections for the new tokens of each row of a cache extension,
        continuing the cached conv window and SSM state: one kernel call (kernels/decode.c, CPU fp32, no
        autograd; decode steps run the same kernel from fused.py).  ``n_new_b``: valid tokens per row
        (None: all).  Returns [B, T, d_inner]."""
        conv_w, a = self.scan_weights()
        (b, t, _), cfg = proj_bti.shape, self.cfg
        out = proj_bti.new_empty(b, t, self.d_inner)
        scratch = proj_bti.new_empty(b, t + cfg.conv_kernel - 1, self.conv_dim)
        p = kernels.ptr
        n_new = None if n_new_b is None else n_new_b.to(torch.long).contiguous()  # alive during the call
        kernels.library().mamba_scan(
            p(proj_bti), None if n_new is None else p(n_new), p(cache.conv[layer_idx]), p(conv_w),
            p(self.conv1d.bias), p(self.dt_bias), p(a), p(self.D), p(self.norm.weight), p(cache.ssm[layer_idx]), p(out),
            p(scratch), b, t, cfg.conv_kernel, self.heads, self.head_dim, self.groups, self.state_size,
            self.norm.group_size, proj_bti.stride(1), cfg.time_step_min_clamp, self.norm.eps)
        return out


# ----------------------------------------------------------------------------- MoE
def dispatch_padded(x_nd, idx_nk, w_nk, up_eid, down_edi, transposed=None, counts_e=None):
    """The routed experts without autograd, equal to ``dispatch_grouped``. Returns [N, D_out] fp32.

    With reasonably balanced loads the groups are padded to the largest one and run as two batched
    matmuls over all experts (fewest ops: the decode path); ``transposed`` = (up^T [E,D,I], down^T
    [E,I,D_out]) contiguous copies speed those up (``FastMoE.transposed_experts``).  Otherwise the
    reference's per-expert matmuls."""
    n, k = idx_nk.shape
    num_experts = up_eid.shape[0]
    flat = idx_nk.reshape(-1)  # [N*k] expert of each (token, slot) pair
    counts = torch.bincount(flat, minlength=num_experts) if counts_e is None else counts_e
    cap = int(counts.max())
    if cap * num_experts > 2 * n * k + 8 * num_experts:
        return dispatch_grouped(x_nd, idx_nk, w_nk, up_eid, down_edi, counts)
    if transposed is None:
        transposed = (up_eid.transpose(1, 2), down_edi.transpose(1, 2))
    ys = _padded_experts(x_nd, flat, cap, *transposed)
    return torch.bmm(w_nk[:, None, :], ys.view(n, k, -1).float())[:, 0]


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


class FastMoE(MoE):
    def __init__(self, cfg, use_kernels: bool):
        super().__init__(cfg, mlp=lambda hidden, inter: FastMLP(hidden, inter, use_kernels))
        self.use_kernels = use_kernels

    def forward(self, h_btd, ctx, layer_idx: int):
        h = h_btd.reshape(-1, h_btd.shape[-1])
        if (self.use_kernels and ctx.mode == "extend" and ctx.replay_for(layer_idx) is None
                and kernels.usable(h, self.gate.weight, self.experts.up_proj, self.expert_load)):
            return self._forward_fused(h, ctx, layer_idx).view(h_btd.shape)
        return super().forward(h_btd, ctx, layer_idx)

    def _experts(self, x_nd, idx_nk, w_nk, counts_e):
        up, down = self.experts.up_proj, self.experts.down_proj
        if torch.is_grad_enabled():  # one autograd Function, gradients straight into [E, ...] buffers
            return grouped_experts(x_nd, idx_nk, w_nk, up, down, counts_e, use_kernels=self.use_kernels)
        # the kept transposed copy only where it pays (a CPU bmm); on a GPU the matmul reads a transposed view as
        # fast, and the copy would double the memory of the expert weights (an MoE model's bulk: nemotron3-nano's
        # inference forward held 125 GB on an H200 with it, 63 GB of them the weights)
        keep = x_nd.dtype == up.dtype and up.device.type == "cpu"
        transposed = self.transposed_experts() if keep else None
        return dispatch_padded(x_nd, idx_nk, w_nk, up, down, transposed, counts_e)

    def transposed_experts(self):
        """(up^T [E, D_e, I], down^T [E, I, D_e]) contiguous, for the padded dispatch (a CPU bmm over a
        transposed view of the weights is ~1.3x slower).  A copy kept (not saved) while the parameters
        are unchanged (``kernels.derived``: optimizer steps and load_state_dict rebuild it)."""
        up, down = self.experts.up_proj, self.experts.down_proj
        return kernels.derived(self.experts, "transposed", (up, down), lambda: (
            up.detach().transpose(1, 2).contiguous(), down.detach().transpose(1, 2).contiguous()))

    def packed_experts(self):
        """The expert weights as kernels/decode.c's ``moe_experts`` takes them: up^T [E, D_e, I] and
        down^T [E, I, D_e], each cut into panels of 16 output columns stored one after another
        (zero-padded)."""
        up, down = self.experts.up_proj, self.experts.down_proj
        return kernels.derived(self.experts, "packed", (up, down), lambda: (
            kernels.pack_panels(up.detach().transpose(1, 2)), kernels.pack_panels(down.detach().transpose(1, 2))))

    def _forward_fused(self, h_nd, ctx, layer_idx):
        """Cache extension through kernels/decode.c (CPU fp32, no autograd; decode steps run the same
        kernels from fused.py): one matmul for the router, latent and shared up-projections, two kernel
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
        mask = ctx.count_bt if ctx.count_bt is not None else ctx.valid_bt
        count_here = mask is None  # else only the tokens that are not padding count
        lib.moe_route(p(proj), p(self.gate.e_score_correction_bias), p(idx), p(w),
                      p(self.expert_load) if count_here else None, n, e, k, int(cfg.norm_topk_prob), proj.stride(0),
                      cfg.routed_scaling_factor)
        ctx.record(layer_idx, idx)
        if not count_here:
            self._count(idx, mask)
        x = proj[:, e:e + d_e] if latent else h_nd  # the routed experts' input
        up_p, down_p = self.packed_experts()
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
        return kernels.derived(self, "step", self.step_params(), self._step_weights)

    def step_params(self):
        """The parameters ``step_weights`` is made of."""
        params = [self.gate.weight]
        if self.cfg.moe_latent_size is not None:
            params += [self.fc1_latent_proj.weight, self.fc2_latent_proj.weight]
        if self.cfg.n_shared_experts:
            params += [self.shared_experts.up_proj.weight, self.shared_experts.down_proj.weight]
        return params

    def _step_weights(self):
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
