"""``HybridCache``: the decoding state of a batch of rows, and the analytic ``cache_bytes``.

Per Mamba layer: ``conv[l] [B, K-1, C]`` (the last K-1 pre-conv inputs, model dtype) and
``ssm[l] [B, H, P, N]`` (always fp32).  Per attention layer: ``k[l], v[l] [B, Hkv, capacity, Dh]``,
preallocated and grown by doubling; row b holds its keys at positions ``[0, lengths[b])``, so rows of
different lengths live in one tensor and one batched decode step.  ``last_hidden [B, D]`` keeps each
row's final normed hidden state so that ``extend`` can return logits for rows that got no new tokens.

The Mamba state does not grow with the context; only the KV buffers do.
"""

from __future__ import annotations

import torch

from .config import HybridConfig


class HybridCache:
    def __init__(self, lengths, conv, ssm, k, v, last_hidden):
        self.lengths = lengths  # [B] long: tokens seen by each row
        self.conv, self.ssm = conv, ssm  # dict layer -> tensor
        self.k, self.v = k, v  # dict layer -> [B, Hkv, capacity, Dh]
        self.last_hidden = last_hidden  # [B, D]

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, cfg: HybridConfig, batch_size: int, device, dtype, capacity: int = 64,
              layer_pattern: str | None = None):
        pattern = layer_pattern or cfg.layer_pattern
        conv, ssm, k, v = {}, {}, {}, {}
        for i, kind in enumerate(pattern):
            if kind == "M":
                conv[i] = torch.zeros(batch_size, cfg.conv_kernel - 1, cfg.mamba_conv_dim, device=device, dtype=dtype)
                ssm[i] = torch.zeros(batch_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                                     device=device, dtype=torch.float32)
            elif kind == "*":
                shape = (batch_size, cfg.num_key_value_heads, capacity, cfg.head_dim)
                k[i] = torch.zeros(shape, device=device, dtype=dtype)
                v[i] = torch.zeros(shape, device=device, dtype=dtype)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        last = torch.zeros(batch_size, cfg.hidden_size, device=device, dtype=dtype)
        return cls(lengths, conv, ssm, k, v, last)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return next(iter(self.k.values())).shape[2] if self.k else 0

    def reserve(self, total_len: int):
        """Grow the KV buffers (doubling) so every row can hold ``total_len`` positions."""
        cap = self.capacity
        if not self.k or total_len <= cap:
            return
        new_cap = max(total_len, 2 * cap)
        for store in (self.k, self.v):
            for i, t in store.items():
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, :cap] = t
                store[i] = grown

    def write_kv(self, layer, k_bktd, v_bktd, start_b, used: int):
        """Write new keys/values at each row's offset; return the used prefix of the buffers."""
        b, _, t, _ = k_bktd.shape
        kbuf, vbuf = self.k[layer], self.v[layer]
        if t == 1:
            rows = torch.arange(b, device=kbuf.device)
            kbuf[rows, :, start_b] = k_bktd[:, :, 0].to(kbuf.dtype)
            vbuf[rows, :, start_b] = v_bktd[:, :, 0].to(vbuf.dtype)
        else:
            rows = torch.arange(b, device=kbuf.device)[:, None].expand(b, t)
            pos = start_b[:, None] + torch.arange(t, device=kbuf.device)
            kbuf[rows, :, pos] = k_bktd.transpose(1, 2).to(kbuf.dtype)
            vbuf[rows, :, pos] = v_bktd.transpose(1, 2).to(vbuf.dtype)
        return kbuf[:, :, :used], vbuf[:, :, :used]

    # ------------------------------------------------------------------ row operations
    def _map(self, fn) -> "HybridCache":
        return HybridCache(fn(self.lengths), {i: fn(t) for i, t in self.conv.items()},
                           {i: fn(t) for i, t in self.ssm.items()}, {i: fn(t) for i, t in self.k.items()},
                           {i: fn(t) for i, t in self.v.items()}, fn(self.last_hidden))

    def select(self, rows, room: int | None = None) -> "HybridCache":
        """A new cache holding copies of the given rows (in that order; repeats allowed).

        ``room``: the new KV buffers hold the longest selected row plus ``room`` positions, and only the
        used positions are copied (the rest are zero), not the whole buffers: a smaller copy for rows that
        are about to be extended by at most ``room`` tokens."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.batch_size):
            raise IndexError(f"select({rows}): rows must be in [0, {self.batch_size})")
        if room is None or not self.k or not idx.numel():
            return self._map(lambda t: t.index_select(0, idx))
        lengths = self.lengths.index_select(0, idx)
        keep = min(int(lengths.max()), self.capacity)
        capacity = keep + max(int(room), 0)

        def kv(t):
            out = t.new_zeros(idx.numel(), t.shape[1], capacity, t.shape[3])
            out[:, :, :keep] = t[:, :, :keep].index_select(0, idx)
            return out

        pick = lambda t: t.index_select(0, idx)  # noqa: E731
        return HybridCache(lengths, {i: pick(t) for i, t in self.conv.items()}, {i: pick(t) for i, t in self.ssm.items()},
                           {i: kv(t) for i, t in self.k.items()}, {i: kv(t) for i, t in self.v.items()},
                           pick(self.last_hidden))

    def put_rows(self, rows, sub: "HybridCache") -> None:
        """Write the rows of ``sub`` (e.g. a ``select`` of ``rows``, since changed) back over ``rows``, in
        place; only those rows are copied (the KV buffers grown first if ``sub``'s are larger)."""
        if len(rows) != sub.batch_size:
            raise ValueError(f"put_rows: {len(rows)} rows named for a cache of {sub.batch_size}")
        self.reserve(sub.capacity)
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths[idx] = sub.lengths
        for dst_b, src_b in zip(self.tensors(), sub.tensors()):
            if dst_b.shape[1:] == src_b.shape[1:]:
                dst_b[idx] = src_b
            else:  # a KV buffer [B, Hkv, capacity, Dh] with more capacity than sub's
                dst_b[idx, :, :src_b.shape[2]] = src_b

    def fork(self, row: int, n: int) -> "HybridCache":
        """``n`` independent copies of one row (the G samples of a GRPO group)."""
        if not 0 <= row < self.batch_size:
            raise IndexError(f"fork(row={row}): the cache has {self.batch_size} rows")
        return self.select([row] * n)

    @staticmethod
    def cat(caches: list["HybridCache"]) -> "HybridCache":
        if not caches:
            raise ValueError("HybridCache.cat needs at least one cache")
        cap = max(c.capacity for c in caches)
        for c in caches:
            c.reserve(cap)
        first = caches[0]
        cat = lambda get: torch.cat([get(c) for c in caches])  # noqa: E731
        return HybridCache(cat(lambda c: c.lengths), {i: cat(lambda c: c.conv[i]) for i in first.conv},
                           {i: cat(lambda c: c.ssm[i]) for i in first.ssm},
                           {i: cat(lambda c: c.k[i][:, :, :cap]) for i in first.k},
                           {i: cat(lambda c: c.v[i][:, :, :cap]) for i in first.v}, cat(lambda c: c.last_hidden))

    def tensors(self) -> list[torch.Tensor]:
        """The floating-point state: last hidden, conv windows, SSM states, KV buffers."""
        return [self.last_hidden, *self.conv.values(), *self.ssm.values(), *self.k.values(), *self.v.values()]

    def nbytes(self) -> int:
        """Bytes held now (KV buffers at their allocated capacity)."""
        return sum(t.numel() * t.element_size() for t in [self.lengths, *self.tensors()])

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"HybridCache(rows={self.batch_size}, lengths={self.lengths.tolist()}, capacity={self.capacity})"


def cache_bytes(config_or_preset, seq_len: int, batch: int = 1, kv_bytes: int = 2, conv_bytes: int = 2) -> int:
    """Analytic decode-cache size: KV for ``seq_len`` tokens per attention layer (``kv_bytes`` per value,
    bf16 by default), plus per Mamba layer a conv window and an fp32 SSM state, for ``batch`` rows."""
    cfg = HybridConfig.from_preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
    n_attn = cfg.layer_pattern.count("*")
    n_mamba = cfg.layer_pattern.count("M")
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * seq_len * kv_bytes
    ssm = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4
    conv = (cfg.conv_kernel - 1) * cfg.mamba_conv_dim * conv_bytes
    return batch * (n_attn * kv + n_mamba * (ssm + conv))
