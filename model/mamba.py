"""Mamba-2 mixer: causal depthwise conv, the chunked SSD scan, and the one-step recurrence.

Legend: B batch, T time, C conv channels (x|B|C slice), H heads, P head dim, G groups, N state size,
Q chunk length, c chunk index, K conv kernel.

The recurrence per head (``ssd_naive``, the reference everything else is tested against):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t        S: [P, N], kept in fp32
    y_t = S_t @ C_t + D * x_t

``ssd_chunked`` computes the same thing in chunks of Q steps (the SSD algorithm of Mamba-2): a masked
quadratic block inside each chunk, one state per chunk, a decay recurrence across chunks, and the
state read-out.  Departures from transformers' torch path (which we match to fp32 round-off):

* B and C stay per group; heads of a group share one C.B^T product and one batched matmul
  (transformers repeats B and C to every head first).
* Packed rows: ``seg_bt`` (non-decreasing segment index per token) zeroes every decay that crosses a
  document boundary, so the state and the conv window restart at each document -- equal to running
  the documents separately.
* dt is clamped to ``dt >= time_step_min_clamp`` after the softplus in *every* path (prefill, extend
  and the one-step decode), so prefill and decode agree.  transformers >= 5.25 clamps at
  ``time_step_limit[0]`` (mamba_ssm's ``dt_limit``) in every path too, and a checkpoint's clamp is read
  from there (model/hf.py), so our logits match its forward and our decode matches our prefill.
* Tokens of an ``extend`` that are only right padding get dt = 0: exp(0 * A) = 1 and dt * x = 0, so
  they leave the state untouched, which lets rows of different lengths share one batched scan.

This is the reference implementation: one readable path for training, scoring and cache extension
(autograd runs through ``ssd_chunked`` itself), and the one-step recurrence for decode steps.
model/fast/ keeps the same mixer with hand-written backwards and CPU kernels (``FastMamba2Mixer``),
tested against this one in values and gradients.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .norms import fp32_region, gated_group_rms_norm


# ----------------------------------------------------------------------------- the scan, naive and fast
def ssd_naive(x_bthp, dt_bth, A_h, B_btgn, C_btgn, D_h, initial_state=None, seg_bt=None):
    """Sequential reference recurrence. Returns (y [B,T,H,P] fp32, final state [B,H,P,N] fp32)."""
    b, t, h, p = x_bthp.shape
    g, n = B_btgn.shape[2], B_btgn.shape[3]
    rep = h // g
    x, dt = x_bthp.float(), dt_bth.float()
    Bh = B_btgn.float().repeat_interleave(rep, dim=2)  # [B,T,H,N]
    Ch = C_btgn.float().repeat_interleave(rep, dim=2)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
    ys = []
    for i in range(t):
        if seg_bt is not None and i > 0:
            keep = (seg_bt[:, i] == seg_bt[:, i - 1]).float()[:, None, None, None]
            state = state * keep
        decay = torch.exp(dt[:, i] * A_h.float())[:, :, None, None]  # [B,H,1,1]
        state = decay * state + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        y = (state * Ch[:, i, :, None, :]).sum(-1) + D_h.float()[:, None] * x[:, i]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _segsum(a_q):
    """[..., Q] -> [..., Q, Q] with out[l, s] = sum(a[s+1..l]) for l >= s, -inf above the diagonal.

    Built from a masked cumulative sum (not a difference of cumsums): used across chunks, where the
    total decay of a long sequence can be large."""
    q = a_q.shape[-1]
    a = a_q[..., None].expand(*a_q.shape, q)  # [..., l, s] = a[l]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a_q.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strict, 0.0), dim=-2)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a_q.device))
    return out.masked_fill(~causal, -math.inf)


def pad_time(pad, tensors_bt, seg_bt=None):
    """Zero-pads each [B, T, ...] tensor by ``pad`` steps along T (zero dt: inert steps of the scan);
    the segment index of packed rows continues with the last segment. Returns (tensors, seg_bt)."""
    padded = tuple(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in tensors_bt)
    if seg_bt is not None:
        seg_bt = torch.cat([seg_bt, seg_bt[:, -1:].expand(seg_bt.shape[0], pad)], dim=1)
    return padded, seg_bt


def ssd_chunked(x_bthp, dt_bth, A_h, B_btgn, C_btgn, D_h, chunk_size, initial_state=None, seg_bt=None):
    """Chunked SSD scan, equal to ``ssd_naive``. Returns (y [B,T,H,P] fp32, final state [B,H,P,N] fp32).

    ``seg_bt`` must be non-decreasing along T (segment index of packed documents).  Chunk states are
    kept transposed, ``[N, R*P]`` per group, so that the state and read-out products are plain batched
    matmuls over the heads of a group (no broadcast copies)."""
    b, t, h, p = x_bthp.shape
    g, n = B_btgn.shape[2], B_btgn.shape[3]
    r, q = h // g, min(chunk_size, t)  # a shorter chunk is exact too, and avoids padding short inputs
    pad = (-t) % q
    nc = (t + pad) // q
    x = x_bthp.float()
    dt = dt_bth.float()
    xdt = x * dt[..., None]
    dA = dt * A_h.float()  # [B,T,H]
    Bm, Cm = B_btgn.float(), C_btgn.float()
    if pad:
        (xdt, dA, Bm, Cm), seg_bt = pad_time(pad, (xdt, dA, Bm, Cm), seg_bt)
    xdt6 = xdt.view(b, nc, q, g, r, p)  # [B,c,Q,G,R,P]
    B_c = Bm.view(b, nc, q, g, n).transpose(2, 3)  # [B,c,G,Q,N]
    C_c = Cm.view(b, nc, q, g, n).transpose(2, 3)  # [B,c,G,Q,N]
    cs = torch.cumsum(dA.view(b, nc, q, g, r), dim=2)  # [B,c,Q,G,R] decay from chunk start
    cs_h = cs.permute(0, 1, 3, 4, 2)  # [B,c,G,R,Q]
    seg_c = None if seg_bt is None else seg_bt.view(b, nc, q)

    # 1. intra-chunk (diagonal blocks): y[l] = sum_s C_l.B_s * exp(cs_l - cs_s) * xdt_s
    # differences of the in-chunk cumsum, as mamba_ssm's kernels do (|cs| is bounded by one chunk)
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    if seg_c is not None:
        causal = causal & (seg_c[..., :, None] == seg_c[..., None, :])[:, :, None, None]  # [B,c,1,1,Q,Q]
    logL = (cs_h[..., :, None] - cs_h[..., None, :]).masked_fill(~causal, -math.inf)  # [B,c,G,R,Q,Q]
    CB = C_c @ B_c.transpose(-1, -2)  # [B,c,G,Q,Q]
    y_diag = (torch.exp(logL) * CB[:, :, :, None]) @ xdt6.permute(0, 1, 3, 4, 2, 5)  # [B,c,G,R,Q,P]

    # 2. state contributed by each chunk at its last position, as [N, R*P] per group
    decay_to_end = torch.exp(cs[:, :, -1:] - cs)  # [B,c,Q,G,R]
    if seg_c is not None:
        decay_to_end = decay_to_end * (seg_c == seg_c[..., -1:])[..., None, None]
    xd = (xdt6 * decay_to_end[..., None]).transpose(2, 3).reshape(b, nc, g, q, r * p)  # [B,c,G,Q,RP]
    states = B_c.transpose(-1, -2) @ xd  # [B,c,G,N,RP]

    # 3. across chunks: state at the start of each chunk (and the final one)
    if initial_state is None:
        init = x.new_zeros(b, 1, g, n, r * p)
    else:
        init = initial_state.float().view(b, g, r, p, n).permute(0, 1, 4, 2, 3).reshape(b, 1, g, n, r * p)
    states = torch.cat([init, states], dim=1)  # [B,c+1,G,N,RP]
    chunk_decay = _segsum(F.pad(cs[:, :, -1].permute(0, 2, 3, 1), (1, 0)))  # [B,G,R,to=c+1,from=c+1]
    if seg_c is not None:
        end_seg = torch.cat([seg_c[:, :1, 0], seg_c[:, :, -1]], dim=1)  # [B,c+1]: segment of each state
        same = (end_seg[:, :, None] == end_seg[:, None, :])[:, None, None]
        chunk_decay = chunk_decay.masked_fill(~same, -math.inf)
    new_states = torch.einsum("bgrtz,bzgnrp->btgnrp", torch.exp(chunk_decay), states.view(b, nc + 1, g, n, r, p))
    start = new_states[:, :-1].reshape(b, nc, g, n, r * p)
    final_state = new_states[:, -1].permute(0, 1, 3, 4, 2).reshape(b, h, p, n)

    # 4. read the start state out at every position of the chunk
    out_decay = torch.exp(cs)  # [B,c,Q,G,R]
    if seg_c is not None:
        out_decay = out_decay * (seg_c == end_seg[:, :-1, None])[..., None, None]
    y_off = (C_c @ start).view(b, nc, g, q, r, p) * out_decay.transpose(2, 3)[..., None]  # [B,c,G,Q,R,P]

    y = (y_diag.permute(0, 1, 4, 2, 3, 5) + y_off.transpose(2, 3)).reshape(b, nc * q, h, p)[:, :t]
    y = y + D_h.float()[:, None] * x
    return y, final_state


def ssd_step(state_bhpn, x_bhp, dt_bh, A_h, B_bgn, C_bgn, D_h):
    """One recurrence step, in place on the fp32 state. Returns y [B,H,P] fp32.

    Elementwise in-place updates and a vecdot: at decode sizes these beat batched matmuls of
    [P,1]x[1,N] / [P,N]x[N,1] blocks several times over (the state is read and written twice)."""
    b, h, p = x_bhp.shape
    g, n = B_bgn.shape[1], B_bgn.shape[2]
    r = h // g
    dt = dt_bh.float()
    x = x_bhp.float()
    state = state_bhpn.view(b, g, r, p, n)
    state.mul_(torch.exp(dt * A_h.float()).view(b, g, r, 1, 1))
    state.addcmul_((x * dt[..., None]).view(b, g, r, p, 1), B_bgn.float().view(b, g, 1, 1, n))
    y = torch.linalg.vecdot(state, C_bgn.float().view(b, g, 1, 1, n)).view(b, h, p)
    return torch.addcmul(y, D_h.float()[:, None], x)


# ----------------------------------------------------------------------------- causal conv
def causal_conv(x_btc, weight_kc, bias_c, prefix_bkc=None, seg_bt=None):
    """Depthwise causal conv over time. prefix_bkc: the K-1 inputs before x (None = zeros).

    One fused multiply-add per tap (cheaper forward and backward than conv1d with its layout copies).
    With ``seg_bt`` an output only sums inputs of its own segment (a document restarts its window)."""
    b, t, c = x_btc.shape
    k = weight_kc.shape[0]
    if prefix_bkc is None:
        prefix_bkc = x_btc.new_zeros(b, k - 1, c)
    xp = torch.cat([prefix_bkc.to(x_btc.dtype), x_btc], dim=1)  # [B,K-1+T,C]
    if seg_bt is not None:
        segp = torch.cat([seg_bt[:, :1].expand(b, k - 1), seg_bt], dim=1)
    out = bias_c.to(x_btc.dtype)
    for j in range(k):
        tap = xp[:, j:j + t]
        if seg_bt is not None and j < k - 1:
            tap = tap * (segp[:, j:j + t] == seg_bt)[..., None]
        out = torch.addcmul(out, tap, weight_kc[j].to(x_btc.dtype))
    return out


def causal_conv_naive(x_btc, weight_kc, bias_c):
    """Reference: torch's grouped conv1d with left padding."""
    c, k = x_btc.shape[-1], weight_kc.shape[0]
    y = F.conv1d(x_btc.transpose(1, 2), weight_kc.t()[:, None, :], bias_c, padding=k - 1, groups=c)
    return y[..., : x_btc.shape[1]].transpose(1, 2)


# ----------------------------------------------------------------------------- the mixer
class MixerOps(NamedTuple):
    """The pieces of the mixer's body an implementation may replace, each with the reference's signature."""

    conv: Callable  # causal_conv(x_btc, weight_kc, bias_c, prefix_bkc, seg_bt) -> [B,T,C]
    scan: Callable  # ssd_chunked(x, dt, A, B, C, D, chunk_size, initial_state, seg_bt) -> (y, final state)
    gated_norm: Callable  # gated_group_rms_norm(y, z, weight, group_size, eps) -> [B,T,d_inner]


REFERENCE_OPS = MixerOps(causal_conv, ssd_chunked, gated_group_rms_norm)


class CausalConv1d(nn.Module):
    """Holds the conv weights under transformers' names (``conv1d.weight [C,1,K]``, ``conv1d.bias``)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(kernel)
        nn.init.uniform_(self.bias, -bound, bound)

    def weight_kc(self):
        return self.weight[:, 0, :].t()  # [K, C]


class GatedRMSNorm(nn.Module):
    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        return gated_group_rms_norm(y, z, self.weight, self.group_size, self.eps)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.groups, self.state_size = cfg.n_groups, cfg.ssm_state_size
        self.d_inner, self.conv_dim = cfg.mamba_d_inner, cfg.mamba_conv_dim
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.mamba_in_proj_dim, bias=False)
        self.conv1d = CausalConv1d(self.conv_dim, cfg.conv_kernel)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.groups, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=False)
        dt = torch.exp(torch.rand(self.heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _split(self, zxbcdt):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.heads], dim=-1)

    def _dt(self, dt_raw):
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        return dt.clamp(min=self.cfg.time_step_min_clamp) if self.cfg.time_step_min_clamp > 0 else dt

    def _xbc(self, xbc):
        gn = self.groups * self.state_size
        return xbc.split([self.d_inner, gn, gn], dim=-1)

    def forward(self, h_btd, ctx, layer_idx: int):
        if ctx.mode == "step":
            return self._step(h_btd, ctx, layer_idx)
        if ctx.shared is not None:  # shared prefixes (model/shared.py): each document after its parent
            y = ctx.shared.apply(lambda p: self._mix(p, ctx.plain, layer_idx, REFERENCE_OPS), self.in_proj(h_btd))
            return self.out_proj(y.to(h_btd.dtype))
        return self.out_proj(self._mix(self.in_proj(h_btd), ctx, layer_idx, REFERENCE_OPS).to(h_btd.dtype))

    def _mix(self, proj_bti, ctx, layer_idx, ops):
        """Everything between the projections for a whole sequence or a cache extension (continuing the
        cached conv window and SSM state), through ``ops``. Returns the gated, normed [B, T, d_inner]."""
        b, t, _ = proj_bti.shape
        cache = ctx.cache
        z, xbc, dt_raw = self._split(proj_bti)
        prefix = cache.conv[layer_idx] if cache is not None else None
        xbc_conv = F.silu(ops.conv(xbc, self.conv1d.weight_kc(), self.conv1d.bias, prefix, ctx.seg_bt))
        if cache is not None:
            cache.conv[layer_idx] = _last_conv_inputs(prefix, xbc, ctx.n_new_b)
        x, Bm, Cm = self._xbc(xbc_conv)
        dt = self._dt(dt_raw)
        if ctx.valid_bt is not None:
            dt = dt * ctx.valid_bt[..., None]
        with fp32_region(proj_bti):
            y, final = ops.scan(
                x.view(b, t, self.heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
                Bm.view(b, t, self.groups, self.state_size), Cm.view(b, t, self.groups, self.state_size),
                self.D, self.cfg.chunk_size, cache.ssm[layer_idx] if cache is not None else None, ctx.seg_bt,
            )
        if cache is not None:
            cache.ssm[layer_idx] = final.contiguous()  # the decode step updates it in place, row-major
        norm = self.norm
        return ops.gated_norm(y.reshape(b, t, self.d_inner), z, norm.weight, norm.group_size, norm.eps)

    def _step(self, h_b1d, ctx, layer_idx):
        b, cache = h_b1d.shape[0], ctx.cache
        z, xbc, dt_raw = self._split(self.in_proj(h_b1d[:, 0]))
        conv_state = cache.conv[layer_idx]  # [B,K-1,C]
        w_kc = self.conv1d.weight_kc().contiguous()  # [K,C]; the strided view makes every tap slow
        # taps in causal_conv's order (oldest first), so that decode matches prefill
        taps = [*conv_state.unbind(1), xbc]  # K x [B,C]
        xbc_conv = torch.addcmul(self.conv1d.bias, taps[0], w_kc[0])  # [B,C]
        for j in range(1, len(taps)):
            xbc_conv.addcmul_(taps[j], w_kc[j])
        window = torch.cat([conv_state, xbc[:, None].to(conv_state.dtype)], dim=1)  # K inputs; keep the last K-1
        cache.conv[layer_idx] = window[:, 1:].contiguous()
        x, Bm, Cm = self._xbc(F.silu(xbc_conv, inplace=True).to(h_b1d.dtype))
        with fp32_region(h_b1d):
            y = ssd_step(cache.ssm[layer_idx], x.view(b, self.heads, self.head_dim), self._dt(dt_raw),
                         -torch.exp(self.A_log.float()), Bm.view(b, self.groups, self.state_size),
                         Cm.view(b, self.groups, self.state_size), self.D)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y.to(h_b1d.dtype))[:, None]


def _last_conv_inputs(prefix_bkc, xbc_btc, n_new_b):
    """The K-1 conv inputs before each row's next token, after appending n_new_b[b] of xbc's rows."""
    full = torch.cat([prefix_bkc.to(xbc_btc.dtype), xbc_btc], dim=1)  # [B,K-1+T,C]
    km1 = prefix_bkc.shape[1]
    if n_new_b is None:  # the window keeps the cache's dtype (an fp32 forward must not turn a bf16 cache fp32)
        return full[:, full.shape[1] - km1:].to(prefix_bkc.dtype).contiguous()
    idx = n_new_b[:, None] + torch.arange(km1, device=full.device)  # [B,K-1]
    return full.gather(1, idx[..., None].expand(-1, -1, full.shape[2])).to(prefix_bkc.dtype)
