"""Grouped-query causal attention without positional encoding (Nemotron-H: position comes from Mamba).

Three modes share the projections:
* full sequence (training): SDPA, causal; with packed rows the mask is causal AND same-document.
* extend (prefill of new tokens into a cache): the new keys/values are written into the preallocated
  KV buffers at each row's own offset ``cache.lengths[b] + j``; query j of row b sees the keys
  ``< lengths[b] + j + 1`` (rows of different lengths share one batched call).
* one-step decode: the same with a single query per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_naive(q_bhtd, k_bktd, v_bktd, mask_btt):
    """Reference: explicit softmax(q k^T / sqrt(d)) v with the KV heads repeated. mask True = may attend."""
    rep = q_bhtd.shape[1] // k_bktd.shape[1]
    k = k_bktd.repeat_interleave(rep, dim=1)
    v = v_bktd.repeat_interleave(rep, dim=1)
    scores = (q_bhtd.float() @ k.float().transpose(-1, -2)) / q_bhtd.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask_btt[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q_bhtd.dtype)


def sdpa(q_bhtd, k_bktd, v_bktd, attn_mask=None, is_causal: bool = False):
    """SDPA of grouped-query heads (``q`` [B,H,T,d], ``k``/``v`` [B,Hkv,S,d]). On a GPU in fp32 (outside flash
    attention's dtypes) with more than 2d queries per row the KV heads are repeated first rather than passed
    with ``enable_gqa``: PyTorch's CUDA dispatch then has only its math backend, which materialises the
    [B,H,T,S] scores (and keeps them for the backward); with the heads repeated the memory-efficient kernel
    takes the call. The repeated K and V ([B,H,S,d] each) are smaller than those scores from T > 2d on; a decode
    step or a short extension keeps ``enable_gqa``, as does every other device and dtype."""
    q_len, head_dim = q_bhtd.shape[-2], q_bhtd.shape[-1]
    if (q_bhtd.device.type == "cuda" and q_bhtd.dtype == torch.float32 and k_bktd.shape[-3] != q_bhtd.shape[-3]
            and q_len > 2 * head_dim):
        rep = q_bhtd.shape[-3] // k_bktd.shape[-3]
        return F.scaled_dot_product_attention(q_bhtd, k_bktd.repeat_interleave(rep, -3), v_bktd.repeat_interleave(rep, -3),
                                              attn_mask=attn_mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q_bhtd, k_bktd, v_bktd, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)


def packed_causal_mask(seg_bt):
    """[B,T,T] bool: causal and within the same document."""
    t = seg_bt.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=seg_bt.device))
    return causal & (seg_bt[:, :, None] == seg_bt[:, None, :])


def causal_attention_nwhd(q_nwhd, k_nwkd, v_nwkd):
    """Causal SDPA of sequences laid out [n, W, heads, d] (the layout of gathered documents), same layout out."""
    out = sdpa(q_nwhd.transpose(1, 2), k_nwkd.transpose(1, 2), v_nwkd.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, h_btd, ctx, layer_idx: int):
        b, t, _ = h_btd.shape
        q = self.q_proj(h_btd).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(h_btd).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(h_btd).view(b, t, self.kv_heads, self.head_dim)
        if ctx.shared is not None:  # shared prefixes (model/shared.py): each document after its parent
            o = ctx.shared.apply(self.attend_virtual, q, k, v)  # [B,T,H,Dh]
            return self.o_proj(o.reshape(b, t, -1).to(h_btd.dtype))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,Dh], [B,Hkv,T,Dh]
        if ctx.cache is None:
            o = self.attend_sequences(q, k, v, ctx.seg_bt)
        else:
            k_all, v_all = ctx.cache.write_kv(layer_idx, k, v, ctx.start_b, ctx.kv_used)
            o = sdpa(q.to(k_all.dtype), k_all, v_all, attn_mask=ctx.kv_mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1).to(h_btd.dtype))

    def attend_virtual(self, q, k, v):
        """Virtual sequences of shared prefixes (model/shared.py), [n, W, heads, d]: causal, as plain sequences."""
        return causal_attention_nwhd(q, k, v)

    def attend_sequences(self, q, k, v, seg_bt):
        """Whole sequences (training, scoring): SDPA, causal; with packed rows (``seg_bt`` [B,T], the
        segment of each position) under the causal same-document mask [B,1,T,T]."""
        if seg_bt is None:
            return sdpa(q, k, v, is_causal=True)
        return sdpa(q, k, v, attn_mask=packed_causal_mask(seg_bt)[:, None])
