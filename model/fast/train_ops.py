"""Training-path autograd Functions with hand-written backwards (fewer, larger ops than autograd's).

Each replaces a stretch of plain PyTorch whose autograd graph is dominated by per-op overhead and by
temporaries, not by arithmetic; each is tested against the reference (values and gradients) in
tests/model/test_model_train_ops.py.

* ``causal_conv_train``: the depthwise causal conv of the Mamba mixer (with packed-document resets).
  Forward: one fused multiply-add per tap into one output buffer.  Backward: the same shifted taps on
  the output gradient for the input, one product-and-reduction per tap for the weight, a sum for the
  bias (autograd instead zero-fills a padded copy per tap and multiplies through every slice).
* ``grouped_experts``: the routed experts of an MoE layer (sort pairs by expert, per expert
  ``down(relu(up x)^2)``, gather back, weight and sum over the k slots).  The backward writes each
  expert's weight gradient into one preallocated ``[E, ...]`` tensor (autograd instead adds a
  full-size zero gradient per expert slice), and uses gathers and a sum over slots instead of the
  scatter-adds of ``index_select``'s backward.
* ``ssd_chunked_train``: the chunked SSD scan (the decay matrix computed once and kept, per-position
  decays applied to B and C rather than to x and y, a short recurrence across chunks, matmul results
  accumulated in place).
* ``rms_norm_train`` / ``gated_group_rms_norm_train``: the block norms and the Mamba output norm.
* ``mamba_mixer_train``: on CPU fp32, the whole Mamba mixer between in_proj and out_proj as one
  Function (``_MambaMixer``): conv + SiLU and the gated group norm as one kernel pass each way (their
  backwards recompute the conv output and the gates), the SSD scan as above, and one
  ``[B, T, in_proj]`` gradient buffer that every piece writes its columns of (no cat of split grads).
* ``relu2_train``: the dense MLP's relu^2.
* ``linear_train``: a linear layer (every projection, the lm_head) whose forward and backward products run
  through gemm.c's strided GEMM (``kernels.mm``: the transposed operands of the backward read through their
  strides) where it runs (CPU fp32 with AVX-512, no autocast); the routed experts' products use it too.

CPU fp32 kernels (model/fast/kernels/train.c, compiled with the decode kernels into one library) do
the memory-bound passes where they apply: conv + SiLU, the gated and the plain RMS norm, relu^2, the
SSD's decay blocks, head-major layout passes and per-head B/C scaling, the experts' gathers and slot
sums.  Each Function takes the library (``lib``; ``None``: PyTorch ops) from its caller, whose model
chose once whether to use the kernels (``impl="fast"`` or ``"torch"``); a Function still runs its
PyTorch ops on other devices and dtypes and under autocast, and its backward uses what its forward did.

The callers are the fast layers (model/fast/layers.py), with autograd enabled only: inference runs
the reference code or the decode kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import math

import torch
import torch.nn.functional as F

from ..mamba import pad_time
from . import kernels


# signatures of model/kernels/train.c (CPU fp32 kernels of the training path)
_I64, _F32, _INT, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
kernels.declare("conv_silu_fwd", [_P] * 5 + [_INT] * 4 + [_I64])
kernels.declare("conv_silu_bwd", [_P] * 9 + [_INT] * 4 + [_I64] * 2)
kernels.declare("gated_norm_fwd", [_P] * 5 + [_I64, _INT, _INT, _I64, _F32])
kernels.declare("gated_norm_bwd", [_P] * 8 + [_I64, _INT, _INT, _I64, _I64])
kernels.declare("ssd_decay_fwd", [_P] * 4 + [_INT] * 5)
kernels.declare("ssd_decay_bwd", [_P] * 6 + [_INT] * 5)
kernels.declare("ssd_in", [_P] * 3 + [_INT] * 5 + [_I64])
kernels.declare("ssd_out", [_P] * 4 + [_INT] * 5 + [_I64])
kernels.declare("ssd_gy_in", [_P] * 4 + [_INT] * 5 + [_I64])
kernels.declare("ssd_gx", [_P] * 7 + [_INT] * 5 + [_I64] * 2)
kernels.declare("rows_gather", [_P] * 3 + [_I64, _INT, _I64])
kernels.declare("moe_combine", [_P] * 4 + [_I64, _INT, _INT])
kernels.declare("moe_combine_bwd", [_P] * 6 + [_I64, _INT, _INT])
kernels.declare("moe_gather_sum", [_P] * 3 + [_I64, _INT, _INT])
kernels.declare("relu2_fwd", [_P] * 2 + [_I64])
kernels.declare("relu2_bwd", [_P] * 2 + [_I64])
kernels.declare("rms_norm_fwd", [_P] * 4 + [_I64, _INT, _F32])
kernels.declare("rms_norm_bwd", [_P] * 6 + [_I64, _INT])
kernels.declare("relu2_out", [_P] * 2 + [_I64])
kernels.declare("relu2_grad", [_P] * 3 + [_I64])
kernels.declare("ssd_scale_fwd", [_P] * 3 + [_INT] * 6 + [_I64])
kernels.declare("ssd_scale_bwd", [_P] * 5 + [_INT] * 6 + [_I64])


def _ptr(t):
    return None if t is None else t.data_ptr()


def _library(use_kernels: bool):
    """The compiled kernels when the caller uses them and they are built, else None (PyTorch ops)."""
    return kernels.library() if use_kernels else None


def _autocast_off(device_type):
    """Autocast disabled inside (for a backward run while an autocast context is active)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- causal conv
def _conv_masks(seg_bt, k):
    """Per shift s = 1..K-1 the [B, T-s, 1] mask (x dtype applied later): input t-s and output t share a
    document.  ``None`` entries where there is no segment information."""
    if seg_bt is None:
        return [None] * k
    t = seg_bt.shape[1]
    return [None] + [(seg_bt[:, : t - s] == seg_bt[:, s:])[..., None] if s < t else None for s in range(1, k)]


class _CausalConv(torch.autograd.Function):
    """out[:, i] = bias + sum_j w[j] * x[:, i - (K-1-j)] (zero before the start, masked across documents).

    Same operation order as ``hybrid_rl.model.mamba.causal_conv`` (bias, then the taps oldest first), so values are
    bitwise equal to it."""

    @staticmethod
    def forward(ctx, x, w, bias, seg_bt):
        b, t, c = x.shape
        k = w.shape[0]
        masks = [None if m is None else m.to(x.dtype) for m in _conv_masks(seg_bt, k)]
        out = x.new_empty(b, t, c)
        out.copy_(bias.expand(b, t, c))
        for j in range(k):
            s = k - 1 - j
            if s >= t:
                continue
            tap = x[:, : t - s]
            if masks[s] is not None:
                tap = tap * masks[s]
            out[:, s:].addcmul_(tap, w[j])
        ctx.save_for_backward(x, w)
        ctx.masks = masks
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        masks = ctx.masks
        b, t, c = x.shape
        k = w.shape[0]
        g = g.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            gx = torch.mul(g, w[k - 1])
            for j in range(k - 1):
                s = k - 1 - j
                if s >= t:
                    continue
                gs = g[:, s:] if masks[s] is None else g[:, s:] * masks[s]
                gx[:, : t - s].addcmul_(gs, w[j])
        if need_w:
            gw = w.new_zeros(k, c)
            for j in range(k):
                s = k - 1 - j
                if s >= t:
                    continue
                prod = g[:, s:] * x[:, : t - s]
                if masks[s] is not None:
                    prod.mul_(masks[s])
                torch.sum(prod, dim=(0, 1), out=gw[j])
        if need_b:
            gb = g.sum(dim=(0, 1))
        return gx, gw, gb, None


def causal_conv_train(x_btc, weight_kc, bias_c, seg_bt=None):
    """Depthwise causal conv with zero history (the training forward); see ``hybrid_rl.model.mamba.causal_conv``."""
    w = weight_kc.to(x_btc.dtype).contiguous()
    return _CausalConv.apply(x_btc, w, bias_c.to(x_btc.dtype), seg_bt)


# ----------------------------------------------------------------------------- linear layers
class _KernelLinear(torch.autograd.Function):
    """y = x @ W^T (+ b) for x [N, K], every product through ``kernels.mm``."""

    @staticmethod
    def forward(ctx, x_nk, weight, bias):
        y = kernels.mm(x_nk, weight.t())
        if bias is not None:
            y += bias
        ctx.save_for_backward(x_nk, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x_nk, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = kernels.mm(g, weight) if need_x else None
        grad_w = kernels.mm(g.t(), x_nk) if need_w else None
        grad_b = g.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _kernel_mm_applies(*tensors) -> bool:
    """gemm.c takes these: plain CPU fp32 tensors (not a subclass such as FSDP's DTensor), no autocast, and
    the kernel runs on this CPU."""
    return (not torch.is_autocast_enabled("cpu")
            and all(t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                                  and t.dtype == torch.float32) for t in tensors)
            and kernels.mm_usable())


def linear_train(x, weight, bias=None):
    """``F.linear`` of a training forward: through ``kernels.mm`` forward and backward when it applies (and
    the product is not tiny), else ``F.linear``."""
    if x.shape[-1] and weight.shape[0] >= 16 and x.numel() >= 16 * x.shape[-1] and _kernel_mm_applies(x, weight, bias):
        x_nk = x.reshape(-1, x.shape[-1])
        return _KernelLinear.apply(x_nk, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _mm_into(a, b, out, use_kernel: bool):
    """``out`` = a @ b, through ``kernels.mm`` when ``use_kernel``."""
    if use_kernel:
        kernels.mm(a, b, out=out)
    else:
        torch.mm(a, b, out=out)


# ----------------------------------------------------------------------------- grouped experts
class _GroupedExperts(torch.autograd.Function):
    """out[n] = sum_j w[n, j] * down[e] relu(up[e] x[n])^2 with e = idx[n, j]; pairs pre-sorted by expert.

    ``order``: the (token, slot) pairs sorted by expert (stable), ``counts``: pairs per expert (a list)."""

    @staticmethod
    def forward(ctx, x_nd, w_nk, up_eid, down_edi, order, counts, k, lib):
        n = x_nd.shape[0]
        nk = order.numel()
        used = [e for e, c in enumerate(counts) if c]
        src = torch.div(order, k, rounding_mode="floor")  # token of each sorted pair
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(nk, device=order.device))
        use_k = lib is not None and _cpu_f32_contiguous(x_nd, w_nk, up_eid, down_edi)  # gathers and relu^2 in C
        lib = lib if use_k else None
        use_mm = use_k and _kernel_mm_applies(x_nd, up_eid, down_edi)  # the products through gemm.c
        if use_k:
            xs = x_nd.new_empty(nk, x_nd.shape[1])
            lib.rows_gather(_ptr(x_nd), _ptr(src), _ptr(xs), nk, x_nd.shape[1], x_nd.shape[1])
        else:
            xs = x_nd.index_select(0, src)  # [NK, D] expert order
        hidden = xs.new_empty(nk, up_eid.shape[1])
        ys = xs.new_empty(nk, down_edi.shape[1])
        xs_e, hidden_e, ys_e = xs.split(counts), hidden.split(counts), ys.split(counts)
        up_t, down_t = up_eid.transpose(1, 2).unbind(0), down_edi.transpose(1, 2).unbind(0)
        for e in used:
            _mm_into(xs_e[e], up_t[e], hidden_e[e], use_mm)
        if use_k:
            r, act = hidden, torch.empty_like(hidden)
            lib.relu2_fwd(_ptr(r), _ptr(act), r.numel())
        else:
            r = torch.relu_(hidden)  # in place: only relu(h) is needed from here on
            act = torch.mul(r, r)  # (square() is a slow pow on CPU)
        act_e = act.split(counts)
        for e in used:
            _mm_into(act_e[e], down_t[e], ys_e[e], use_mm)
        if use_k:  # weighted sum over the slots straight from the sorted rows
            out = ys.new_empty(n, ys.shape[1])
            lib.moe_combine(_ptr(ys), _ptr(inverse), _ptr(w_nk), _ptr(out), n, k, ys.shape[1])
            ys_pair = ys
        else:
            ys_pair = ys.index_select(0, inverse).view(n, k, -1)  # [N, k, D_out] (token, slot) order
            acc = torch.promote_types(ys.dtype, torch.float32)  # weights and slot sum in fp32 (or wider)
            out = torch.bmm(w_nk.to(acc)[:, None, :], ys_pair.to(acc))[:, 0]
        ctx.save_for_backward(xs, w_nk, up_eid, down_edi, order, src, inverse, r, act, ys_pair)
        ctx.counts, ctx.used, ctx.k, ctx.use_k, ctx.lib, ctx.use_mm = counts, used, k, use_k, lib, use_mm
        return out

    @staticmethod
    def backward(ctx, g_nd):
        with _autocast_off(g_nd.device.type):  # the products keep the forward's dtypes
            return _GroupedExperts._backward(ctx, g_nd)

    @staticmethod
    def _backward(ctx, g_nd):
        xs, w_nk, up_eid, down_edi, order, src, inverse, r, act, ys_pair = ctx.saved_tensors
        counts, used, k, use_mm = ctx.counts, ctx.used, ctx.k, ctx.use_mm and g_nd.dtype == torch.float32
        n, nk = w_nk.shape[0], order.numel()
        need_x, need_w, need_up, need_down = ctx.needs_input_grad[:4]
        g = g_nd.contiguous()
        lib = ctx.lib  # the forward's (None: PyTorch ops)
        if lib is not None and g.dtype == torch.float32:  # ys_pair holds the sorted rows here
            grad_w, gs = torch.empty_like(w_nk), xs.new_empty(nk, g.shape[1])
            lib.moe_combine_bwd(_ptr(g), _ptr(ys_pair), _ptr(inverse), _ptr(w_nk), _ptr(grad_w), _ptr(gs), n, k,
                                g.shape[1])
        else:
            if ctx.use_k:
                ys_pair = ys_pair.index_select(0, inverse).view(n, k, -1)
            grad_w = torch.linalg.vecdot(ys_pair.to(g.dtype), g[:, None, :]).to(w_nk.dtype) if need_w else None
            # gradient of each sorted pair's expert output: w[pair] * g[token]
            gs = g.index_select(0, src).mul_(w_nk.reshape(-1).to(g.dtype).index_select(0, order)[:, None]).to(xs.dtype)
        ga = xs.new_empty(nk, r.shape[1])
        gs_e, act_e, ga_e, downs = gs.split(counts), act.split(counts), ga.split(counts), down_edi.unbind(0)
        grad_down = _expert_grad_buffer(down_edi, used) if need_down else None
        for e in used:
            if need_down:
                _mm_into(gs_e[e].t(), act_e[e], grad_down[e], use_mm)
            _mm_into(gs_e[e], downs[e], ga_e[e], use_mm)
        if lib is not None:
            lib.relu2_bwd(_ptr(ga), _ptr(r), ga.numel())
            gh = ga
        else:
            gh = ga.mul_(r).mul_(2.0)  # d relu(h)^2 / dh = 2 relu(h)
        grad_up = _expert_grad_buffer(up_eid, used) if need_up else None
        gxs = xs.new_empty(nk, xs.shape[1]) if need_x else None
        gh_e, xs_e, ups = gh.split(counts), xs.split(counts), up_eid.unbind(0)
        gxs_e = gxs.split(counts) if need_x else None
        for e in used:
            if need_up:
                _mm_into(gh_e[e].t(), xs_e[e], grad_up[e], use_mm)
            if need_x:
                _mm_into(gh_e[e], ups[e], gxs_e[e], use_mm)
        grad_x = None
        if need_x and lib is not None:
            grad_x = gxs.new_empty(n, gxs.shape[1])
            lib.moe_gather_sum(_ptr(gxs), _ptr(inverse), _ptr(grad_x), n, k, gxs.shape[1])
        elif need_x:
            grad_x = gxs.index_select(0, inverse).view(n, k, -1).sum(1)
        return grad_x, grad_w, grad_up, grad_down, None, None, None, None


def _cpu_f32_contiguous(*tensors):
    """The routed-expert kernels of model/fast/kernels/train.c apply: CPU fp32 contiguous."""
    return _cpu_f32(*tensors) and all(t.is_contiguous() for t in tensors)


def _expert_grad_buffer(param, used):
    """[E, ...] gradient buffer: written whole by the per-expert products, zero for unused experts."""
    buf = param.new_empty(param.shape)
    for e in sorted(set(range(param.shape[0])) - set(used)):
        buf[e].zero_()
    return buf


def grouped_experts(x_nd, idx_nk, w_nk, up_eid, down_edi, counts_e=None, use_kernels=False):
    """Routed experts with autograd, equal to ``hybrid_rl.model.moe.dispatch_naive``. Returns [N, D_out] fp32.

    Under autocast the expert matmuls run in the autocast dtype (as ``F.linear`` would), the routing
    weights and the sum over slots in fp32; on the CPU with ``use_kernels`` (the fast model) they stay in
    fp32, where bf16 GEMMs of expert sizes (hundreds of rows per expert, every layout of the backward) are
    slower than fp32 ones (e.g. 219 ms against 161 ms for the 480 expert matmuls of one ``bench grpo`` update
    of ``tiny``)."""
    n, k = idx_nk.shape
    flat = idx_nk.reshape(-1)
    counts = torch.bincount(flat, minlength=up_eid.shape[0]) if counts_e is None else counts_e
    order = torch.argsort(flat, stable=True)
    dev = x_nd.device.type
    region = contextlib.nullcontext()
    if torch.is_autocast_enabled(dev):
        dtype = torch.float32 if dev == "cpu" and use_kernels else torch.get_autocast_dtype(dev)
        x_nd, up_eid, down_edi = x_nd.to(dtype), up_eid.to(dtype), down_edi.to(dtype)
        region = torch.autocast(device_type=dev, enabled=False)
    with region:
        return _GroupedExperts.apply(x_nd, w_nk, up_eid, down_edi, order, counts.tolist(), k, _library(use_kernels))


# ----------------------------------------------------------------------------- chunked SSD scan
def _ssd_masks(seg_bt, b, nc, q):
    """(within-chunk [B,c,1,1,Q,Q] same-document mask or None, decay-to-end [B,c,1,1,Q] mask,
    start read-out [B,c,1,1,Q] mask, chunk-to-chunk keep [B,c,1,1]), all float or None without segments."""
    if seg_bt is None:
        return None, None, None, None
    seg_c = seg_bt.view(b, nc, q)
    within = (seg_c[..., :, None] == seg_c[..., None, :])[:, :, None, None]
    to_end = (seg_c == seg_c[..., -1:])[:, :, None, None].float()
    end_seg = torch.cat([seg_c[:, :1, 0], seg_c[:, :, -1]], dim=1)  # [B,c+1]: segment of each chunk state
    from_start = (seg_c == end_seg[:, :-1, None])[:, :, None, None].float()
    keep = (end_seg[:, 1:] == end_seg[:, :-1])[:, :, None, None].float()
    return within, to_end, from_start, keep


def _ssd_stages(lib, x, dt, Bm, Cm, q):
    """The stages of ``_SSDChunked`` for these inputs: the C kernels where the caller passed the library
    (``lib``) and they apply (``_ssd_kernels``), else PyTorch ops."""
    if lib is not None and _ssd_kernels(x, dt, Bm, Cm, q):
        return _SSDKernelStages(lib)
    return _SSDTorchStages()


class _SSDTorchStages:
    """The memory-bound stages of ``_SSDChunked`` in PyTorch ops (any device and dtype): the head-major
    layout passes, the decay blocks, the per-head scaling of B and C, and their backwards.  The same
    methods as ``_SSDKernelStages``; a forward picks one and its backward uses the same."""

    def x_in(self, x, dt, g, q):
        """X = x * dt, head-major [B,c,G,R,Q,P]."""
        b, t, h, p = x.shape
        nc, r = t // q, h // g
        X = x.new_empty(b, nc, g, r, q, p)
        torch.mul(x.view(b, nc, q, g, r, p).permute(_HEAD_MAJOR),
                  dt.view(b, nc, q, g, r, 1).permute(_HEAD_MAJOR), out=X)
        return X

    def decay_blocks(self, cs, CB, within, seg_bt):
        """(M = L * CB per head [B,c,G,R,Q,Q] with L = exp(cs_l - cs_s) causal and within a document,
        what ``decay_blocks_backward`` needs: L)."""
        q = cs.shape[-1]
        mask = torch.ones(q, q, dtype=torch.bool, device=cs.device).tril()
        if within is not None:
            mask = mask & within
        L = (cs[..., :, None] - cs[..., None, :]).masked_fill_(~mask, -math.inf).exp_()  # [B,c,G,R,Q,Q]
        return L * CB[:, :, :, None], L

    def scale_heads(self, V_btgn, V_c, scale):
        """[B,c,G,R,Q,N] = V (B or C, per group; ``V_c`` its [B,c,G,Q,N] view) times the per-head,
        per-position ``scale`` [B,c,G,R,Q]."""
        return V_c[:, :, :, None] * scale[..., None]

    def out(self, Y, x, D):
        """y [B,T,H,P] = Y (head-major) + x * D."""
        b, nc, g, r, q, p = Y.shape
        y = x.new_empty(x.shape)
        torch.addcmul(Y.permute(0, 1, 4, 2, 3, 5), x.view(b, nc, q, g, r, p), D.view(g, r, 1),
                      out=y.view(b, nc, q, g, r, p))
        return y

    def out_backward(self, gy, x, g, q):
        """(gy as ``x_in_backward`` reads it, gY = gy head-major [B,c,G,R,Q,P], partial sums of the D
        gradient or None)."""
        b, t, h, p = x.shape
        nc, r = t // q, h // g
        gY = x.new_empty(b, nc, g, r, q, p)
        gY.copy_(gy.reshape(b, nc, q, g, r, p).permute(_HEAD_MAJOR))
        return gy, gY, None

    def scale_heads_backward(self, Z, V_c, scale):
        """Gradients of ``scale_heads`` from Z [B,c,G,R,Q,N]: (d/dV [B,c,G,Q,N], d/dscale times scale
        [B,c,G,R,Q])."""
        g_scale = torch.linalg.vecdot(Z, V_c[:, :, :, None]).mul_(scale)
        gV = (Z * scale[..., None]).sum(3)
        return gV, g_scale

    def decay_blocks_backward(self, gM, L, cs, CB, g_cs):
        """d/dCB [B,c,G,Q,Q] from gM = d/dM; adds the gradient through L to ``g_cs`` (gM is overwritten)."""
        gM.mul_(L)
        gCB = gM.sum(3)  # [B,c,G,Q,Q]
        gM.mul_(CB[:, :, :, None])  # d/d(cs_l - cs_s)
        g_cs.add_(gM.sum(-1)).sub_(gM.sum(-2))
        return gCB

    def x_in_backward(self, gy, gX, x, dt, D, A, g_dA, gD_part, gx):
        """Writes gx = gy D + gX dt into ``gx`` [B,T,H,P]; returns (d/ddt [B,T,H] with g_dA * A added,
        d/dD [H])."""
        b, nc, g, r, q, p = gX.shape
        t, h = nc * q, g * r
        xh = x.view(b, nc, q, g, r, p).permute(_HEAD_MAJOR)
        g_dt = torch.addcmul(torch.linalg.vecdot(gX, xh), g_dA, A.view(g, r, 1))
        g_dt = g_dt.permute(0, 1, 4, 2, 3).reshape(b, t, h)
        gD = torch.linalg.vecdot(gy, x).sum((0, 1))
        torch.mul(gy, D[:, None], out=gx)
        gx.view(b, nc, q, g, r, p).addcmul_(gX.permute(0, 1, 4, 2, 3, 5), dt.view(b, nc, q, g, r, 1))
        return g_dt, gD


class _SSDKernelStages:
    """The stages of ``_SSDTorchStages`` as the C kernels of model/fast/kernels/train.c (CPU fp32, the
    layouts ``_ssd_kernels`` checks): one pass each; the decay blocks keep no L (the backward's kernel
    recomputes it)."""

    def __init__(self, lib):
        self.lib = lib

    def x_in(self, x, dt, g, q):
        b, t, h, p = x.shape
        nc, r = t // q, h // g
        X = x.new_empty(b, nc, g, r, q, p)
        self.lib.ssd_in(_ptr(x), _ptr(dt), _ptr(X), b, nc, h, q, p, x.stride(1))
        return X

    def decay_blocks(self, cs, CB, within, seg_bt):
        """(M, what ``decay_blocks_backward`` needs: the segments as int64 or None)."""
        b, nc, g, r, q = cs.shape
        seg64 = None if seg_bt is None else seg_bt.to(torch.int64).contiguous()
        M = cs.new_empty(b, nc, g, r, q, q)
        self.lib.ssd_decay_fwd(_ptr(cs), _ptr(CB), _ptr(seg64), _ptr(M), b, nc, g, r, q)
        return M, seg64

    def scale_heads(self, V_btgn, V_c, scale):
        b, nc, g, r, q = scale.shape
        n = V_btgn.shape[3]
        out = V_btgn.new_empty(b, nc, g, r, q, n)
        self.lib.ssd_scale_fwd(_ptr(V_btgn), _ptr(scale), _ptr(out), b, nc, g, r, q, n, V_btgn.stride(1))
        return out

    def out(self, Y, x, D):
        b, nc, g, r, q, p = Y.shape
        y = x.new_empty(x.shape)
        self.lib.ssd_out(_ptr(Y), _ptr(x), _ptr(D), _ptr(y), b, nc, g * r, q, p, x.stride(1))
        return y

    def out_backward(self, gy, x, g, q):
        b, t, h, p = x.shape
        nc, r = t // q, h // g
        gY = x.new_empty(b, nc, g, r, q, p)
        gy = gy.contiguous()
        gD_part = x.new_empty(b * nc, h)
        self.lib.ssd_gy_in(_ptr(gy), _ptr(x), _ptr(gY), _ptr(gD_part), b, nc, h, q, p, x.stride(1))
        return gy, gY, gD_part

    def scale_heads_backward(self, Z, V_c, scale):
        """``V_c``: the [B,c,G,Q,N] view of V (token stride = its stride 3)."""
        b, nc, g, r, q, n = Z.shape
        gV, g_scale = Z.new_empty(b, nc, g, q, n), scale.new_empty(scale.shape)
        self.lib.ssd_scale_bwd(_ptr(Z), _ptr(V_c), _ptr(scale), _ptr(gV), _ptr(g_scale), b, nc, g, r, q, n,
                               V_c.stride(3))
        return gV, g_scale

    def decay_blocks_backward(self, gM, seg64, cs, CB, g_cs):
        """L recomputed, gCB and both sums of the cs gradient in one pass."""
        b, nc, g, r, q = cs.shape
        gCB = CB.new_empty(CB.shape)
        self.lib.ssd_decay_bwd(_ptr(gM), _ptr(cs), _ptr(CB), _ptr(seg64), _ptr(gCB), _ptr(g_cs), b, nc, g, r, q)
        return gCB

    def x_in_backward(self, gy, gX, x, dt, D, A, g_dA, gD_part, gx):
        """gx = gy D + gX dt and gX . x in one pass."""
        b, nc, g, r, q, p = gX.shape
        t, h = nc * q, g * r
        g_dtx = dt.new_empty(b, t, h)
        self.lib.ssd_gx(_ptr(gy), _ptr(gX), _ptr(x), _ptr(dt), _ptr(D), _ptr(gx), _ptr(g_dtx),
                        b, nc, h, q, p, x.stride(1), gx.stride(1))
        g_dt = torch.addcmul(g_dtx, g_dA.permute(0, 1, 4, 2, 3).reshape(b, t, h), A)
        return g_dt, gD_part.sum(0)


class _SSDChunked(torch.autograd.Function):
    """The chunked SSD scan of ``hybrid_rl.model.mamba.ssd_chunked`` (fp32 inputs, T a multiple of ``q``).

    Heads are kept head-major inside a chunk (``[B,c,G,R,Q,P]``) so that every product is a plain batched
    matmul; the chunk-to-chunk state passing is a short recurrence over the chunks (each factor a decay
    <= 1, so no large exponent appears).  The per-position decays scale B and C (``[.., Q, N]``, half the
    size of x) rather than x or y, and the backward is written out: one exp in all (the decay matrix is
    kept from the forward), and the matmul results accumulate in place (baddbmm).  The layout passes,
    decay blocks and per-head scaling run as ``ctx.stages`` (kernels or PyTorch ops, picked once)."""

    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, D, init, seg_bt, q, lib, need_final=True):
        b, t, h, p = x.shape
        g, n = Bm.shape[2], Bm.shape[3]
        r, nc = h // g, t // q
        within, to_end, from_start, keep = _ssd_masks(seg_bt, b, nc, q)
        stages = ctx.stages = _ssd_stages(lib, x, dt, Bm, Cm, q)
        X = stages.x_in(x, dt, g, q)  # x * dt, head-major [B,c,G,R,Q,P]
        cs = torch.cumsum((dt * A).view(b, nc, q, h).transpose(2, 3), dim=-1).reshape(b, nc, g, r, q)
        Bc = Bm.view(b, nc, q, g, n).transpose(2, 3)  # [B,c,G,Q,N]
        Cc = Cm.view(b, nc, q, g, n).transpose(2, 3)

        # 1. diagonal blocks: M = exp(cs_l - cs_s) * C_l.B_s (causal, same document), Y = M @ X
        CB = Cc @ Bc.transpose(-1, -2)  # [B,c,G,Q,Q]
        M, M_kept = stages.decay_blocks(cs, CB, within, seg_bt)  # [B,c,G,R,Q,Q], what its backward needs

        # One chunk from a zero state whose end state nobody reads (the mixer's training forward on sequences
        # up to a chunk long): y is the diagonal block alone, and steps 2-4 and their backwards would only
        # multiply zeros.
        ctx.one_chunk = nc == 1 and init is None and not need_final
        if ctx.one_chunk:
            y = stages.out(M @ X, x, D)
            ctx.save_for_backward(x, dt, A, Bc, Cc, D, X, cs, M_kept, M, CB, None, None, None, None, None, None)
            ctx.has_init, ctx.q = False, q
            return y, None

        # 2. the state each chunk leaves at its end: S = (B * decay to the end)^T @ X   [B,c,G,R,N,P]
        cs_last = cs[..., -1:]
        dte = torch.exp(cs_last - cs)  # [B,c,G,R,Q]
        if to_end is not None:
            dte = dte * to_end
        Bd = stages.scale_heads(Bm, Bc, dte)  # [B,c,G,R,Q,N]
        S = Bd.transpose(-1, -2) @ X

        # 3. chunk to chunk: start[c] = the state entering chunk c
        decay = torch.exp(cs_last[..., 0])  # [B,c,G,R]
        if keep is not None:
            decay = decay * keep
        start = torch.empty_like(S)
        cur = x.new_zeros(b, g, r, n, p) if init is None else init.reshape(b, g, r, p, n).transpose(-1, -2)
        for c in range(nc):
            start[:, c] = cur
            cur = torch.addcmul(S[:, c], decay[:, c, :, :, None, None], cur)
        final = cur.transpose(-1, -2).reshape(b, h, p, n)

        # 4. y = (C * decay from the chunk start) @ start + M @ X, plus the D skip
        od = torch.exp(cs)  # [B,c,G,R,Q]
        if from_start is not None:
            od = od * from_start
        Cd = stages.scale_heads(Cm, Cc, od)  # [B,c,G,R,Q,N]
        Y = Cd @ start
        _bmm3(Y, q, p).baddbmm_(_bmm3(M, q, q), _bmm3(X, q, p))
        y = stages.out(Y, x, D)  # [B,T,H,P]

        ctx.save_for_backward(x, dt, A, Bc, Cc, D, X, cs, M_kept, M, CB, dte, Bd, decay, start, od, Cd)
        ctx.has_init, ctx.q = init is not None, q
        return y, final

    @staticmethod
    def backward(ctx, gy, gfinal):
        with _autocast_off(gy.device.type):  # the scan stays in fp32
            return _SSDChunked._backward(ctx, gy, gfinal)

    @staticmethod
    def _backward(ctx, gy, gfinal, out=None):
        x, dt, A, Bc, Cc, D, X, cs, M_kept, M, CB, dte, Bd, decay, start, od, Cd = ctx.saved_tensors
        stages, q = ctx.stages, ctx.q  # the forward's stages
        b, t, h, p = x.shape
        g, n = Bc.shape[2], Bc.shape[4]
        r, nc = h // g, t // q
        if gy is None:
            gy = x.new_zeros(b, t, h, p)
        gy, gY, gD_part = stages.out_backward(gy, x, g, q)  # gY [B,c,G,R,Q,P]
        g_init = None
        if ctx.one_chunk:  # the forward's diagonal block alone, y = M @ X: nothing flows through states
            gX = M.transpose(-1, -2) @ gY
            gB, gC, g_cs = Bc.new_zeros(Bc.shape), Cc.new_zeros(Cc.shape), cs.new_zeros(cs.shape)
        else:
            gX, gB, gC, g_cs, g_init = _SSDChunked._backward_states(ctx, gY, gfinal, x, cs, Bc, Cc, X, dte, Bd, decay,
                                                                    start, od, Cd)
            _bmm3(gX, q, p).baddbmm_(_bmm3(M, q, q).transpose(1, 2), _bmm3(gY, q, p))  # 1. Y += M @ X
        # 1. diagonal blocks, the rest: M = L * CB with L = exp(cs_l - cs_s)
        gM = gY @ X.transpose(-1, -2)  # [B,c,G,R,Q,Q]
        gCB = stages.decay_blocks_backward(gM, M_kept, cs, CB, g_cs)  # [B,c,G,Q,Q]; adds to g_cs
        gC.add_(gCB @ Bc)
        gB.add_(gCB.transpose(-1, -2) @ Cc)

        # cumsum over the chunk, dt * A, x * dt, and the D skip
        g_dA = g_cs.flip(-1).cumsum(-1).flip(-1)  # [B,c,G,R,Q]
        gA = (g_dA * dt.view(b, nc, q, g, r).permute(0, 1, 3, 4, 2)).sum((0, 1, 4)).reshape(h)
        # [B,T, x | B | C] buffer given: the gradients go straight into their columns (no cat after)
        gx = x.new_empty(b, t, h, p) if out is None else out[..., : h * p].view(b, t, h, p)
        g_dt, gD = stages.x_in_backward(gy, gX, x, dt, D, A, g_dA, gD_part, gx)
        if out is None:
            gBm = gB.transpose(2, 3).reshape(b, t, g, n)
            gCm = gC.transpose(2, 3).reshape(b, t, g, n)
        else:
            gBm = out[..., h * p: h * p + g * n].view(b, nc, q, g, n).copy_(gB.transpose(2, 3))
            gCm = out[..., h * p + g * n:].view(b, nc, q, g, n).copy_(gC.transpose(2, 3))
        return gx, g_dt, gA, gBm, gCm, gD, g_init, None, None, None, None

    @staticmethod
    def _backward_states(ctx, gY, gfinal, x, cs, Bc, Cc, X, dte, Bd, decay, start, od, Cd):
        """Steps 4, 3 and 2 backwards (read-out, chunk to chunk, chunk end states): (gX, gB, gC, g_cs, g_init)."""
        stages = ctx.stages
        b, t, h, p = x.shape
        g, n = Bc.shape[2], Bc.shape[4]
        r, nc = h // g, t // ctx.q

        # 4. read-out: Y += Cd @ start with Cd = C * od
        Z = gY @ start.transpose(-1, -2)  # d/dCd  [B,c,G,R,Q,N]
        g_start = Cd.transpose(-1, -2) @ gY  # [B,c,G,R,N,P]
        gC, g_cs = stages.scale_heads_backward(Z, Cc, od)  # [B,c,G,Q,N]; through od = exp(cs) (masked)

        # 3. chunk to chunk, backwards
        gS = torch.empty_like(start)
        g_decay = decay.new_empty(decay.shape)
        gcur = x.new_zeros(b, g, r, n, p) if gfinal is None else gfinal.reshape(b, g, r, p, n).transpose(-1, -2)
        for c in range(nc - 1, -1, -1):
            gS[:, c] = gcur
            g_decay[:, c] = torch.linalg.vecdot(gcur.flatten(-2), start[:, c].flatten(-2))
            gcur = torch.addcmul(g_start[:, c], decay[:, c, :, :, None, None], gcur)
        g_init = gcur.transpose(-1, -2).reshape(b, h, p, n) if ctx.has_init else None

        # 2. chunk end states: S = Bd^T @ X with Bd = B * dte
        gX = Bd @ gS  # [B,c,G,R,Q,P]
        W = X @ gS.transpose(-1, -2)  # d/dBd  [B,c,G,R,Q,N]
        gB, g_dte = stages.scale_heads_backward(W, Bc, dte)  # times dte: d/d(cs_last - cs)
        g_cs.sub_(g_dte)
        g_cs[..., -1] += g_dte.sum(-1) + g_decay * decay
        return gX, gB, gC, g_cs, g_init


def _ssd_kernels(x, dt, Bm, Cm, q):
    """The SSD kernels of model/fast/kernels/train.c apply: CPU fp32, x [B,T,H,P] and B, C [B,T,G,N] each
    with contiguous rows per token and batch stride T * token stride, dt contiguous, chunk <= 1024."""
    if not _cpu_f32(x, dt, Bm, Cm) or q > 1024 or not dt.is_contiguous():
        return False
    for v in (x, Bm, Cm):
        b, t, h, p = v.shape
        if v.stride(3) != 1 or v.stride(2) != p or v.stride(0) != t * v.stride(1):
            return False
    return True


_HEAD_MAJOR = (0, 1, 3, 4, 2, 5)  # [B,c,Q,G,R,P] -> [B,c,G,R,Q,P]


def _bmm3(t6, rows, cols):
    """A contiguous [..., rows, cols] tensor as a [-1, rows, cols] batch (a view)."""
    return t6.view(-1, rows, cols)


def ssd_chunked_train(x_bthp, dt_bth, A_h, B_btgn, C_btgn, D_h, chunk_size, initial_state=None, seg_bt=None,
                      use_kernels=False):
    """``hybrid_rl.model.mamba.ssd_chunked`` with a hand-written backward. Returns (y [B,T,H,P] fp32, final state
    [B,H,P,N] fp32); T is padded to a multiple of the chunk inside (dt = 0 there: inert)."""
    t = x_bthp.shape[1]
    q = min(chunk_size, t)
    pad = (-t) % q
    x, dt = x_bthp.float(), dt_bth.float()
    Bm, Cm = B_btgn.float(), C_btgn.float()
    if pad:
        (x, dt, Bm, Cm), seg_bt = pad_time(pad, (x, dt, Bm, Cm), seg_bt)
    init = None if initial_state is None else initial_state.float()
    y, final = _SSDChunked.apply(x, dt, A_h.float(), Bm.contiguous(), Cm.contiguous(), D_h.float(), init,
                                 None if seg_bt is None else seg_bt.contiguous(), q, _library(use_kernels), True)
    return (y[:, :t] if pad else y), final


# ----------------------------------------------------------------------------- RMS norms
class _RMSNorm(torch.autograd.Function):
    """out = x * rsqrt(mean(x^2 over the last dim) + eps) * w, over groups of the last dim when
    ``group`` < its size (w spans the whole last dim).  Optionally gated first: x = y * silu(z)."""

    @staticmethod
    def forward(ctx, y, z, w, group, eps, lib):
        shape = y.shape
        ctx.kernel = lib is not None and z is None and group == shape[-1] and _cpu_f32(y, w)
        if ctx.kernel:  # the plain norm in one pass each way (model/fast/kernels/train.c)
            x = y.contiguous()
            out, rstd = torch.empty_like(x), x.new_empty(x.numel() // group)
            ctx.lib = lib
            ctx.lib.rms_norm_fwd(_ptr(x), _ptr(w), _ptr(out), _ptr(rstd), rstd.numel(), group, eps)
            ctx.save_for_backward(w, x, rstd)
            return out
        if z is not None:
            sz = torch.sigmoid(z)
            gate = sz.mul(z)  # silu(z)
            x = y * gate
        else:
            x = y
        xg = x.reshape(*shape[:-1], shape[-1] // group, group)
        rstd = torch.linalg.vector_norm(xg, dim=-1, keepdim=True).square_().div_(group).add_(eps).rsqrt_()
        normed = xg * rstd
        out = normed.view(shape) * w
        if z is not None:
            ctx.save_for_backward(w, normed, rstd, y, z, sz, gate)
        else:
            ctx.save_for_backward(w, normed, rstd)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, go):
        if ctx.kernel and go.dtype == torch.float32:
            w, x, rstd = ctx.saved_tensors
            go = go.contiguous()
            gx, gw = torch.empty_like(x), torch.empty_like(w)
            ctx.lib.rms_norm_bwd(_ptr(go), _ptr(x), _ptr(w), _ptr(rstd), _ptr(gx), _ptr(gw), rstd.numel(),
                                           x.shape[-1])
            return gx, None, gw if ctx.needs_input_grad[2] else None, None, None, None
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows one unpack)
        w, normed, rstd = saved[:3]
        group = ctx.group
        shape = go.shape
        gw = (go * normed.view(shape)).sum(tuple(range(go.dim() - 1))) if ctx.needs_input_grad[2] else None
        gn = (go * w).reshape(normed.shape)
        dot = torch.linalg.vecdot(gn, normed).div_(group)[..., None]
        gx = torch.addcmul(gn, normed, dot, value=-1.0).mul_(rstd).view(shape)
        if len(saved) == 3:
            return gx, None, gw, None, None, None
        y, z, sz, gate = saved[3:]
        gy = gx * gate if ctx.needs_input_grad[0] else None
        gz = None
        if ctx.needs_input_grad[1]:
            # d silu(z) = s (1 + z (1 - s)) = s + silu(z) - s silu(z),  s = sigmoid(z)
            gz = gx.mul_(y).mul_(torch.addcmul(sz + gate, sz, gate, value=-1.0))
        return gy, gz, gw, None, None, None


def _cpu_f32(*tensors):
    """All on the CPU in fp32 (what the train kernels take)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class _Relu2(torch.autograd.Function):
    """relu(h)^2 (the dense MLP's activation), CPU fp32 in one kernel pass each way; h is kept."""

    @staticmethod
    def forward(ctx, h, lib):
        h = h.contiguous()
        act = torch.empty_like(h)
        ctx.lib = lib
        ctx.lib.relu2_out(_ptr(h), _ptr(act), h.numel())
        ctx.save_for_backward(h)
        return act

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        g = g.contiguous().to(h.dtype)
        gh = torch.empty_like(h)
        ctx.lib.relu2_grad(_ptr(g), _ptr(h), _ptr(gh), h.numel())
        return gh, None


def relu2_train(h, use_kernels=False):
    """relu(h)^2 with autograd: ``_Relu2`` with the kernels on CPU fp32 (no autocast), else PyTorch's ops."""
    lib = _library(use_kernels)
    if lib is not None and _cpu_f32(h) and not torch.is_autocast_enabled("cpu"):
        return _Relu2.apply(h, lib)
    return torch.square(F.relu(h))


def rms_norm_train(x, weight, eps, use_kernels=False):
    """``hybrid_rl.model.norms.rms_norm`` with a hand-written backward (fp32 inside, cast back)."""
    return _RMSNorm.apply(x.float(), None, weight.float(), x.shape[-1], eps, _library(use_kernels)).to(x.dtype)


def gated_group_rms_norm_train(y, z, weight, group_size, eps):
    """``hybrid_rl.model.norms.gated_group_rms_norm`` with a hand-written backward (fp32 inside, z's dtype out)."""
    return _RMSNorm.apply(y.float(), z.float(), weight.float(), group_size, eps, None).to(z.dtype)


# ----------------------------------------------------------------------------- the whole Mamba mixer


class _Saved:
    """Stands in for an autograd ctx when one Function runs another's forward and backward inside."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


class _MambaMixer(torch.autograd.Function):
    """Everything of the Mamba-2 mixer between its projections, training forward, CPU fp32 with the
    model/kernels train kernels: ``proj`` [B,T, z | xBC | dt] -> the gated, normed [B,T,d_inner].

    conv + SiLU and the gated group norm are one kernel pass each way (their backwards recompute the conv
    output and the gates rather than keeping them); the chunked scan is ``_SSDChunked``'s forward and
    backward.  The backward writes every gradient of ``proj`` into one [B,T,in_proj] buffer (no cat of
    the split's pieces)."""

    @staticmethod
    def forward(ctx, proj, conv_w, conv_b, dt_bias, A_log, D, norm_w, seg_bt, dims):
        d_inner, heads, head_dim, groups, state, q, clamp, group, eps = dims
        lib = ctx.lib = kernels.library()
        b, t, width = proj.shape
        gn = groups * state
        conv_dim, k = d_inner + 2 * gn, conv_w.shape[0]
        rs = proj.stride(1)
        xc = proj.new_empty(b, t, conv_dim)
        lib.conv_silu_fwd(_ptr(proj[..., d_inner:]), _ptr(conv_w), _ptr(conv_b), _ptr(seg_bt), _ptr(xc),
                          b, t, conv_dim, k, rs)
        v = proj[..., d_inner + conv_dim:] + dt_bias
        dt = F.softplus(v)
        if clamp > 0:
            dt.clamp_(min=clamp)
        A = -torch.exp(A_log)
        sctx = _Saved()
        y, _ = _SSDChunked.forward(sctx, xc[..., :d_inner].view(b, t, heads, head_dim), dt, A,
                                   xc[..., d_inner:d_inner + gn].view(b, t, groups, state),
                                   xc[..., d_inner + gn:].view(b, t, groups, state), D, None, seg_bt, q, lib,
                                   need_final=False)
        out = proj.new_empty(b, t, d_inner)
        rstd = proj.new_empty(b * t, d_inner // group)
        lib.gated_norm_fwd(_ptr(y), _ptr(proj), _ptr(norm_w), _ptr(out), _ptr(rstd), b * t, d_inner, group, rs, eps)
        ctx.save_for_backward(proj, conv_w, conv_b, norm_w, v, A, y, rstd, seg_bt, *sctx.saved_tensors)
        ctx.dims, ctx.q, ctx.ssd_stages, ctx.ssd_one_chunk = dims, q, sctx.stages, sctx.one_chunk
        return out

    @staticmethod
    def backward(ctx, go):
        with _autocast_off(go.device.type):  # a backward run inside an autocast context: the kernels take fp32
            return _MambaMixer._backward(ctx, go)

    @staticmethod
    def _backward(ctx, go):
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows one unpack)
        proj, conv_w, conv_b, norm_w, v, A, y, rstd, seg_bt = saved[:9]
        d_inner, heads, head_dim, groups, state, q, clamp, group, eps = ctx.dims
        lib = ctx.lib  # the forward's (the kernels stay in use for this step)
        b, t, width = proj.shape
        conv_dim, k = d_inner + 2 * groups * state, conv_w.shape[0]
        rs = proj.stride(1)
        go = go.to(proj.dtype).contiguous()
        gproj = proj.new_empty(b, t, width)
        gy = proj.new_empty(b, t, d_inner)
        g_norm_w = norm_w.new_empty(d_inner)
        lib.gated_norm_bwd(_ptr(go), _ptr(y), _ptr(proj), _ptr(norm_w), _ptr(rstd), _ptr(gy), _ptr(gproj),
                           _ptr(g_norm_w), b * t, d_inner, group, rs, width)
        sctx = _Saved()
        sctx.saved_tensors, sctx.q, sctx.has_init, sctx.stages = saved[9:], ctx.q, False, ctx.ssd_stages
        sctx.one_chunk = ctx.ssd_one_chunk
        g_xc = proj.new_empty(b, t, conv_dim)
        _, g_dt, gA, _, _, gD, *_ = _SSDChunked._backward(sctx, gy.view(b, t, heads, head_dim), None, out=g_xc)
        g_conv_w, g_conv_b = conv_w.new_empty(k, conv_dim), conv_b.new_empty(conv_dim)
        lib.conv_silu_bwd(_ptr(proj[..., d_inner:]), _ptr(conv_w), _ptr(conv_b), _ptr(seg_bt), _ptr(g_xc),
                          _ptr(g_xc), _ptr(gproj[..., d_inner:]), _ptr(g_conv_w), _ptr(g_conv_b), b, t, conv_dim, k,
                          rs, width)
        g_v = gproj[..., d_inner + conv_dim:]
        torch.mul(g_dt, torch.sigmoid(v), out=g_v)  # softplus' = sigmoid
        if clamp > 0:
            g_v.masked_fill_(F.softplus(v) < clamp, 0.0)  # clamp(min): no gradient below it
        g_dt_bias = g_v.sum((0, 1))
        return gproj, g_conv_w, g_conv_b, g_dt_bias, gA * A, gD, g_norm_w, None, None


def mixer_kernels_usable(proj, *params, seg_bt=None, chunk_size=1):
    """True when ``mamba_mixer_train`` can run: CPU fp32 contiguous tensors, no autocast, the kernels
    built, T a multiple of the chunk (or shorter than one)."""
    if torch.is_autocast_enabled("cpu") or proj.device.type != "cpu" or not proj.is_contiguous():
        return False
    t = proj.shape[1]
    if t % min(chunk_size, t):
        return False
    for p in (proj, *params):
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return False
    if seg_bt is not None and seg_bt.device.type != "cpu":
        return False
    return kernels.library() is not None


def mamba_mixer_train(mixer, proj, seg_bt=None):
    """The training forward of ``Mamba2Mixer`` between in_proj and out_proj through ``_MambaMixer``
    (check ``mixer_kernels_usable`` first).  Returns [B,T,d_inner] fp32."""
    cfg = mixer.cfg
    q = min(cfg.chunk_size, proj.shape[1])
    dims = (mixer.d_inner, mixer.heads, mixer.head_dim, mixer.groups, mixer.state_size, q,
            float(cfg.time_step_min_clamp), mixer.norm.group_size, float(mixer.norm.eps))
    seg = None if seg_bt is None else seg_bt.to(torch.int64).contiguous()
    return _MambaMixer.apply(proj, mixer.conv1d.weight_kc().contiguous(), mixer.conv1d.bias, mixer.dt_bias,
                             mixer.A_log, mixer.D, mixer.norm.weight, seg, dims)
