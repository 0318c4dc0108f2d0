"""``HybridLM``: the Nemotron-3 hybrid language model, its training forward, cached decoding and MTP.

Each layer is one mixer with a pre-norm residual, ``h = h + mixer(rmsnorm(h))``; the mixer kind comes
from a letter of ``layer_pattern`` (M Mamba-2, * attention, E MoE, - MLP).  Parameter names equal
transformers' in-memory ``NemotronHForCausalLM`` names with ``backbone.`` for ``model.``, so HF interop
is a rename (``hf_state_dict`` / ``from_hf_state_dict`` below).

Three ways through the same layers (``_Ctx.mode``):
  full    training / scoring: ``forward(input_ids [B,T], doc_ids=None, routing=None, doc_parents=None)``;
          ``doc_parents`` stores a shared prompt once in a packed row (model/shared.py)
  extend  append per-row token lists to a ``HybridCache`` (prefill = extend of an empty row); rows are
          right-padded to one batch, padding is inert (Mamba dt = 0, attention masked, not counted)
  step    ``decode_step``: one token for every row, the fast path

MTP (Super): one block ``mtp.layers.{0..}`` of ``mtp_layer_pattern``; layer 0 fuses
``eh_proj(cat[enorm(emb(t+1)), hnorm(h_t)])`` where h_t is the main model's final (normed) hidden state,
as in vLLM's NemotronH-MTP; the last layer ends with ``final_layernorm``; logits use the shared lm_head.
Only MTP logits are provided (no speculative decoding).

Implementations (``HybridLM(config, impl=...)``, chosen once when the model is built; the parameters
and state_dict are the same for all):
  fast       the default: model/fast's layers (hand-written backwards, padded expert dispatch) and, on
             CPU fp32, the C kernels of model/fast/kernels (a decode step is one kernel call)
  torch      the same layers in PyTorch ops only (what other devices and dtypes run anyway);
             ``HYBRID_RL_KERNELS=0`` in the environment builds a "fast" model as this one
  reference  the readable modules of model/ (mamba.py, moe.py, norms.py) alone: one path, autograd
             through it, the oracle the others are tested against
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from . import fast
from .attention import Attention
from .cache import HybridCache, cache_bytes
from .config import HybridConfig
from .fast import fused, kernels
from .mamba import Mamba2Mixer
from .moe import MLP, MoE
from .norms import RMSNorm
from .shared import SharedPrefixes

IMPLS = ("fast", "torch", "reference")
# layer kind -> mixer of cfg, and "norm" -> RMSNorm of (size, eps): the reference implementation
REFERENCE_LAYERS = {
    "M": Mamba2Mixer,
    "*": Attention,
    "E": MoE,
    "-": lambda cfg: MLP(cfg.hidden_size, cfg.intermediate_size),
    "norm": RMSNorm,
}


def resolve_impl(impl: str) -> str:
    """The implementation a model built with ``impl`` runs (``HYBRID_RL_KERNELS=0`` turns "fast" into "torch")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown model implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    return "torch" if impl == "fast" and not kernels.enabled() else impl


def layer_builders(impl: str) -> dict:
    """The layer builders of a resolved implementation (``REFERENCE_LAYERS``' keys)."""
    return REFERENCE_LAYERS if impl == "reference" else fast.layers(use_kernels=impl == "fast")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] fp32; None with compute_logits=False
    routed_experts: torch.Tensor | None = None  # [B, T, n_moe_layers, k] long, with record_routing=True
    # [B, T, D] final normed hidden, with return_hidden=True or compute_logits=False (the caller then applies
    # lm_head itself, a chunk of tokens at a time: rl.losses.chunked_policy_logprobs)
    hidden_states: torch.Tensor | None = None
    head: object = None  # what ``forward(head=fn)`` returned: fn(hidden [B, T, D], lm_head weight [V, D])


class _Ctx:
    """What the mixers need to know about the current call besides their input."""

    def __init__(self, mode, moe_slot, cache=None, seg_bt=None, valid_bt=None, n_new_b=None, start_b=None,
                 kv_mask=None, kv_used=0, replay=None, record=False, shared=None, count_bt=None):
        self.mode, self.moe_slot, self.cache = mode, moe_slot, cache
        self.count_bt = count_bt  # [B, T] bool: positions whose routing counts toward the MoE load (None: valid_bt's)
        # shared prefixes (model/shared.py): the sequence layers run their bodies on its virtual sequences,
        # each a plain sequence (``plain``: this call's context without packing)
        self.shared = shared
        self.plain = _Ctx(mode, moe_slot) if shared is not None else None
        self.seg_bt, self.valid_bt, self.n_new_b, self.start_b = seg_bt, valid_bt, n_new_b, start_b
        self.kv_mask, self.kv_used = kv_mask, kv_used
        self.replay = replay  # [N, n_moe, k] or None
        self.recorded = {} if record else None

    def replay_for(self, layer_idx):
        if self.replay is None or layer_idx not in self.moe_slot:
            return None
        return self.replay[:, self.moe_slot[layer_idx]]

    def record(self, layer_idx, idx_nk):
        if self.recorded is not None and layer_idx in self.moe_slot:
            self.recorded[self.moe_slot[layer_idx]] = idx_nk

    def routed(self, lead_shape):
        """Recorded experts as [*lead_shape, n_moe, k] (None when not recording or no MoE layer)."""
        if not self.recorded:
            return None
        stacked = torch.stack([self.recorded[s] for s in sorted(self.recorded)], dim=1)  # [N, n_moe, k]
        return stacked.view(*lead_shape, *stacked.shape[1:])


class Block(nn.Module):
    def __init__(self, cfg: HybridConfig, kind: str, layers: dict):
        super().__init__()
        self.norm = layers["norm"](cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = layers[kind](cfg)

    def forward(self, h, ctx, layer_idx):
        return h + self.mixer(self.norm(h), ctx, layer_idx)


class _Recompute:
    """A block as ``torch.utils.checkpoint`` calls it: the first call is the forward; a second one is the
    backward's recompute, which must not count the MoE expert loads again (they drive the bias balancing)."""

    def __init__(self, block: Block, ctx, layer_idx: int):
        self.block, self.ctx, self.layer_idx, self.calls = block, ctx, layer_idx, 0

    def __call__(self, h):
        self.calls += 1
        load = getattr(self.block.mixer, "expert_load", None)
        if self.calls == 1 or load is None:
            return self.block(h, self.ctx, self.layer_idx)
        before = load.clone()
        try:  # the recompute may stop early by raising once it has what the backward needs
            return self.block(h, self.ctx, self.layer_idx)
        finally:
            load.copy_(before)


class Backbone(nn.Module):
    def __init__(self, cfg: HybridConfig, layers: dict):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, kind, layers) for kind in cfg.layer_pattern)
        self.norm_f = layers["norm"](cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    def __init__(self, cfg: HybridConfig, kind: str, layers: dict, first: bool, last: bool):
        super().__init__(cfg, kind, layers)
        if first:
            self.enorm = layers["norm"](cfg.hidden_size, cfg.rms_norm_eps)
            self.hnorm = layers["norm"](cfg.hidden_size, cfg.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        if last:
            self.final_layernorm = layers["norm"](cfg.hidden_size, cfg.rms_norm_eps)


class MTP(nn.Module):
    def __init__(self, cfg: HybridConfig, layers: dict):
        super().__init__()
        n = len(cfg.mtp_layer_pattern)
        self.layers = nn.ModuleList(MTPLayer(cfg, kind, layers, first=i == 0, last=i == n - 1)
                                    for i, kind in enumerate(cfg.mtp_layer_pattern))


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig, impl: str = "fast"):
        """``impl``: "fast", "torch" or "reference" (the module docstring); ``self.impl`` is the one running."""
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"HybridLM needs a HybridConfig, got {type(config).__name__}; "
                            "use HybridConfig.from_preset('tiny') or HybridConfig(...)")
        self.config = config
        self.impl = resolve_impl(impl)
        layers = layer_builders(self.impl)
        self.backbone = Backbone(config, layers)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.num_mtp_layers:
            self.mtp = MTP(config, layers)
        self.moe_layers = [i for i, kind in enumerate(config.layer_pattern) if kind == "E"]
        self.activation_checkpointing = False  # set_activation_checkpointing
        self._moe_slot = {layer: slot for slot, layer in enumerate(self.moe_layers)}
        if self.impl == "fast":  # the projections and the lm_head train through the kernels' GEMM
            fast.use_kernel_linears(self)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        """transformers' NemotronH init: normal(initializer_range) for matrices, Mamba's A/D/dt init,
        out_proj scaled by 1/sqrt(num_layers)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "D", "dt_bias") or "norm" in name.rsplit(".", 2)[-2] or "conv1d" in name:
                continue
            if name.endswith("out_proj.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p.div_(math.sqrt(self.config.num_layers))
            else:
                nn.init.normal_(p, std=std)

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids, doc_ids=None, routing=None, record_routing: bool = False,
                return_hidden: bool = False, compute_logits: bool = True, head=None, doc_parents=None,
                load_mask=None) -> ModelOutput:
        """``compute_logits=False`` skips lm_head: ``logits`` is None and ``hidden_states`` holds the final
        normed hidden [B, T, D], so a caller can score the vocabulary a chunk of tokens at a time instead of
        holding [B, T, V] fp32 logits. ``head=fn`` does that inside this call: ``ModelOutput.head`` is
        ``fn(hidden, lm_head.weight)`` and no logits are made. Inside is what a sharded (FSDP) model needs:
        its lm_head weight is whole, and its gradient reduced, only within its own forward and backward.
        ``load_mask`` [B, T] bool: the positions whose routed experts count toward the MoE load (the selection-bias
        balance update and the ``moe/*`` figures); a packed batch leaves its padding out. None: every position."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if load_mask is not None and tuple(load_mask.shape) != (b, t):
            raise ValueError(f"load_mask must have input_ids' shape {[b, t]}, got {list(load_mask.shape)}")
        seg = self._segments(doc_ids, input_ids) if doc_ids is not None else None
        shared = None
        if doc_parents is not None:
            if doc_ids is None:
                raise ValueError("doc_parents needs doc_ids: it names, per position, the document (by its doc id) "
                                 "that the position's document continues")
            if bool((doc_parents >= 0).any()):
                shared, seg = SharedPrefixes(doc_ids, doc_parents), None
        replay = self._check_routing(routing, b, t)
        ctx = _Ctx("full", self._moe_slot, seg_bt=seg, replay=replay, record=record_routing, shared=shared,
                   count_bt=None if load_mask is None else load_mask.bool())
        h = self._layers(self.backbone.embeddings(input_ids), ctx)
        h = self.backbone.norm_f(h)
        if head is not None:
            return ModelOutput(None, ctx.routed((b, t)), h if return_hidden else None, head(h, self.lm_head.weight))
        logits = self.lm_head(h).float() if compute_logits else None
        return ModelOutput(logits, ctx.routed((b, t)), h if return_hidden or not compute_logits else None)

    def _layers(self, h, ctx):
        checkpointed = self.activation_checkpointing and ctx.mode == "full" and torch.is_grad_enabled()
        for i, block in enumerate(self.backbone.layers):
            if checkpointed:
                h = torch.utils.checkpoint.checkpoint(_Recompute(block, ctx, i), h, use_reentrant=False)
            else:
                h = block(h, ctx, i)
        return h

    def set_activation_checkpointing(self, enabled: bool = True) -> "HybridLM":
        """Keep only each block's input in the training forward and recompute the block in the backward
        (``torch.utils.checkpoint``, non-reentrant): activation memory of one block instead of all of them,
        for about one more forward of compute. Values and gradients are unchanged."""
        self.activation_checkpointing = bool(enabled)
        return self

    @staticmethod
    def _segments(doc_ids, input_ids):
        """doc ids -> non-decreasing segment index (a new segment wherever the id changes); None if one."""
        if doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        change = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
        if not bool(change.any()):
            return None
        return F.pad(torch.cumsum(change, dim=1), (1, 0))

    def _check_routing(self, routing, b, t):
        if routing is None:
            return None
        want = (b, t, len(self.moe_layers), self.config.num_experts_per_tok)
        if tuple(routing.shape) != want:
            raise ValueError(f"routing must have shape [B, T, n_moe_layers, k] = {list(want)}, "
                             f"got {list(routing.shape)}")
        if routing.min() < 0 or routing.max() >= self.config.n_routed_experts:
            raise ValueError(f"routing holds expert ids outside [0, {self.config.n_routed_experts})")
        return routing.reshape(b * t, *want[2:])

    # ------------------------------------------------------------------ cached decoding
    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None, capacity: int = 64) -> HybridCache:
        """Empty rows. KV/conv dtype: the parameters' dtype, or on a GPU under autocast its dtype. (A bf16 cache
        beside fp32 weights rounds keys, values and the last hidden state that the trainer's fp32 forward keeps:
        rollout and trainer log-probs parted by 1.4e-3 on an H200 (random-init ``tiny``; 9.5e-7 with an fp32 cache)
        and by 0.046 in a CPU simulation at 30x the head (2e-5 with an fp32 cache).)"""
        w = self.backbone.embeddings.weight
        if dtype is None:
            on = w.device.type
            dtype = torch.get_autocast_dtype(on) if on == "cuda" and torch.is_autocast_enabled(on) else w.dtype
        return HybridCache.empty(self.config, batch_size, w.device, dtype, capacity)

    def _logits_from_cache(self, cache):
        return self.lm_head(cache.last_hidden.to(self.lm_head.weight.dtype)).float()

    def steady_weights(self):
        """A scope in which the weights change only by an optimizer step or where ``weights_changed()`` says
        so: the CPU decode program then checks them once, not at every ``extend`` / ``decode_step``
        (``fused.steady_weights``). The rollout engine plays inside one."""
        return fused.steady_weights(self)

    def weights_changed(self) -> None:
        """Inside ``steady_weights``: the weights were loaded or edited in place; the next call checks them."""
        fused.weights_changed(self)

    @torch.no_grad()
    def extend(self, cache: HybridCache, tokens, record_routing: bool = False, rows=None):
        """Append new tokens to rows of the cache; returns those rows' last-position logits [R, V] (and
        routed experts [R, T_max, n_moe, k] with -1 at padding when ``record_routing``).

        ``rows=None``: every row, ``tokens`` one list per row of the cache (an empty one: the row only gets
        its logits). ``rows=[r, ...]`` (distinct): only those cache rows, ``tokens`` one list per named row;
        the others are not touched and nothing is copied. On the CPU in fp32 (``impl="fast"``) the whole
        layer stack runs over the packed new tokens in one kernel call, in place (``fused.DecodeProgram.
        extend``; attention as that many decode steps would attend); elsewhere the named rows are selected,
        extended and written back."""
        n_rows = cache.batch_size if rows is None else len(rows)
        if len(tokens) != n_rows:
            raise ValueError(f"extend got token lists for {len(tokens)} rows, "
                             f"{'the cache has' if rows is None else 'rows names'} {n_rows}")
        device = cache.lengths.device
        if rows is not None:
            rows = [int(r) for r in rows]
            if len(set(rows)) != len(rows) or any(not 0 <= r < cache.batch_size for r in rows):
                raise ValueError(f"extend(rows={rows}): rows must be distinct and in [0, {cache.batch_size})")
        program = fused.program_for(self, self.backbone.embeddings.weight, cache) if self.impl == "fast" else None
        if program is not None:
            return self._extend_program(program, cache, *_flat_tokens(tokens), rows, record_routing)
        seqs = [torch.as_tensor(r, dtype=torch.long, device=device).reshape(-1) for r in tokens]
        if rows is None:
            return self._extend_rows(cache, seqs, record_routing)
        sub = cache.select(rows, room=max(map(len, seqs), default=0))
        out = self._extend_rows(sub, seqs, record_routing)
        cache.put_rows(rows, sub)
        return out

    def _extend_program(self, program, cache, flat, counts, rows, record_routing):
        """``extend`` through the decode program's ``extend`` (see there): ``flat`` the new tokens of every
        row back to back, ``counts`` how many each row has."""
        rows = list(range(cache.batch_size)) if rows is None else rows
        fed = [i for i, n in enumerate(counts) if n]
        routes = None
        if fed:
            rows_r = torch.tensor([rows[i] for i in fed], dtype=torch.long)
            n_new_r = torch.tensor([counts[i] for i in fed], dtype=torch.long)
            cache.reserve(int((cache.lengths.index_select(0, rows_r) + n_new_r).max()))
            h = self.backbone.embeddings.weight.index_select(0, flat)  # as the module's lookup, without its call
            last, routes = program.extend(h, cache, rows_r, n_new_r, record_routing)
            cache.last_hidden = cache.last_hidden.index_copy(0, rows_r, last.to(cache.last_hidden.dtype))
            cache.lengths = cache.lengths.index_add(0, rows_r, n_new_r)
        else:
            program.pointers(cache)  # the head's panels follow the weights even when no row gets tokens
        everyone = len(rows) == cache.batch_size and rows == list(range(len(rows)))
        last_hidden = cache.last_hidden if everyone else cache.last_hidden.index_select(0, torch.tensor(rows, dtype=torch.long))
        logits = program.head(last_hidden.float())
        if not record_routing:
            return logits
        t, k = max(counts, default=0), self.config.num_experts_per_tok
        routed = torch.full((len(rows), t, program.n_moe, k), -1, dtype=torch.long)
        start = 0
        for i in fed:
            n = counts[i]
            routed[i, :n] = routes[:, start:start + n].transpose(0, 1)
            start += n
        return logits, routed

    def _extend_rows(self, cache: HybridCache, rows, record_routing: bool):
        """``extend`` of every row of ``cache`` through the layers' own extension paths."""
        device = cache.lengths.device
        n_new = [int(r.numel()) for r in rows]
        t = max(n_new)
        if t == 0:
            return (self._logits_from_cache(cache), None) if record_routing else self._logits_from_cache(cache)
        ids = torch.zeros(cache.batch_size, t, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, : r.numel()] = r
        n_new_b = torch.tensor(n_new, device=device)
        ragged = min(n_new) != t
        valid = (torch.arange(t, device=device) < n_new_b[:, None]) if ragged else None
        start = cache.lengths.clone()
        used = int(start.max()) + t
        cache.reserve(used)
        q_pos = start[:, None] + torch.arange(t, device=device)  # [B,T]
        kv_mask = (torch.arange(used, device=device) <= q_pos[..., None])[:, None]  # [B,1,T,used]
        ctx = _Ctx("extend", self._moe_slot, cache=cache, valid_bt=valid, n_new_b=n_new_b if ragged else None,
                   start_b=start, kv_mask=kv_mask, kv_used=used, record=record_routing)
        h = self.backbone.norm_f(self._layers(self.backbone.embeddings(ids), ctx))
        has = n_new_b > 0
        last = h[torch.arange(cache.batch_size, device=device), (n_new_b - 1).clamp(min=0)]
        cache.last_hidden = torch.where(has[:, None], last.to(cache.last_hidden.dtype), cache.last_hidden)
        cache.lengths = start + n_new_b
        logits = self._logits_from_cache(cache)
        if not record_routing:
            return logits
        routed = ctx.routed((cache.batch_size, t))
        if routed is not None and valid is not None:
            routed = routed.masked_fill(~valid[..., None, None], -1)
        return logits, routed

    @torch.no_grad()
    def decode_step(self, cache: HybridCache, token_ids, record_routing: bool = False):
        """One token for every row; returns logits [B, V] (and routed experts [B, n_moe, k])."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=cache.lengths.device).reshape(-1)
        if ids.numel() != cache.batch_size:
            raise ValueError(f"decode_step got {ids.numel()} tokens for a cache of {cache.batch_size} rows")
        start = cache.lengths
        used = int(start.max()) + 1
        cache.reserve(used)
        program = fused.program_for(self, self.backbone.embeddings.weight, cache) if self.impl == "fast" else None
        if program is not None:
            # every layer in one kernel call (model/fast/fused.py); same arithmetic as the path below
            h = self.backbone.embeddings.weight.index_select(0, ids)  # the embedding's rows, without a module call
            ctx = _Ctx("step", self._moe_slot, record=record_routing)
            h, logits, routes = program.run(h, cache, record_routing)
            if record_routing:
                ctx.recorded = dict(enumerate(routes))
        else:
            h = self.backbone.embeddings(ids)
            kv_mask = (torch.arange(used, device=ids.device) <= start[:, None])[:, None, None]  # [B,1,1,used]
            ctx = _Ctx("step", self._moe_slot, cache=cache, start_b=start, kv_mask=kv_mask, kv_used=used,
                       record=record_routing)
            h = self.backbone.norm_f(self._layers(h[:, None], ctx))[:, 0]
            logits = self.lm_head(h).float()
        cache.last_hidden = h.to(cache.last_hidden.dtype)
        cache.lengths = start + 1
        if record_routing:
            return logits, ctx.routed((cache.batch_size,))
        return logits

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None, generator=None):
        """Batched cached generation; returns the new tokens [B, max_new_tokens] (see model/generate.py)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                        eos_token_id=eos_token_id, generator=generator)

    # ------------------------------------------------------------------ MTP
    def mtp_logits(self, input_ids, hidden=None):
        """Logits of the MTP block: position t predicts token t+2 from h_t and token t+1. [B, T-1, V]."""
        if not self.config.num_mtp_layers:
            raise ValueError("this model has no MTP block (config.num_mtp_layers = 0)")
        if hidden is None:
            hidden = self.forward(input_ids, return_hidden=True).hidden_states
        emb = self.backbone.embeddings(input_ids[:, 1:])
        h_prev = hidden[:, :-1]
        first, ctx = self.mtp.layers[0], _Ctx("full", {})
        h = first.eh_proj(torch.cat([first.enorm(emb), first.hnorm(h_prev)], dim=-1))
        base = self.config.num_layers
        for i, layer in enumerate(self.mtp.layers):
            h = layer(h, ctx, base + i)
        return self.lm_head(self.mtp.layers[-1].final_layernorm(h)).float()

    # ------------------------------------------------------------------ MoE balancing
    @torch.no_grad()
    def moe_balance_update(self, rate: float) -> dict[str, float]:
        """Aux-loss-free selection-bias update from the loads counted since the last call.

        Each MoE layer's ``e_score_correction_bias`` moves by ``rate`` toward under-used experts
        (``+rate`` below the mean load, ``-rate`` above).  Returns ``moe/layer{i}/...`` statistics."""
        out: dict[str, float] = {}
        worst = 0.0
        for i in self.moe_layers:
            stats = self.backbone.layers[i].mixer.balance_update(rate)
            for k, v in stats.items():
                out[f"moe/layer{i}/{k}"] = v
            worst = max(worst, stats.get("max_load_over_mean", 0.0))
        if self.moe_layers:
            out["moe/max_load_over_mean"] = worst
        return out

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def cache_bytes(config_or_preset, seq_len: int, batch: int = 1) -> int:
        return cache_bytes(config_or_preset, seq_len, batch)


# ---------------------------------------------------------------------- transformers in-memory names
def hf_state_dict(model: HybridLM) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' in-memory NemotronH names (``model.`` prefix, no ``mtp.*``)."""
    return {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v
            for k, v in model.state_dict().items() if not k.startswith("mtp.")}


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> ours."""
    return {("backbone." + k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}


def _flat_tokens(tokens) -> tuple[torch.Tensor, list[int]]:
    """Per-row token lists (ints, or tensors of any shape) -> (all of them back to back, long [N]; each row's
    count): one tensor built from the ints when every row is a list or tuple of ints, else one cat."""
    if all(isinstance(r, (list, tuple)) for r in tokens):
        flat = [t for r in tokens for t in r]
        try:
            return torch.tensor(flat, dtype=torch.long), [len(r) for r in tokens]
        except (TypeError, ValueError, RuntimeError):
            pass  # nested lists or tensors inside: the general path below reads them as tensors do
    seqs = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in tokens]
    flat = torch.cat(seqs) if seqs else torch.zeros(0, dtype=torch.long)
    return flat, [int(s.numel()) for s in seqs]

