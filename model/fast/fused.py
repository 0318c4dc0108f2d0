"""The layer stack of ``HybridLM.decode_step`` as one kernel call (model/fast/kernels, CPU fp32).

At decode sizes the per-layer work is a few small matrix products and a pass over the Mamba state, so
the Python around each layer (module calls, allocations, dispatch) costs as much as the arithmetic.
``decode_layers`` runs every layer of one step in C: per layer the projections (a GEMM over weights
kept as 16-column panels, which stream from memory once per step), the fused mixer kernel, the
residual add and the next pre-norm.

The program is a per-layer kind plus fixed slots of pointers, ints and floats; the layouts are fixed
by ``decode_layers`` in decode.c:

  Mamba      ptrs: in_proj, out_proj, conv_w [K,C], conv_b, dt_bias, A, D, gated-norm w, conv state, SSM
             state; ints: K, H, P, G, N, norm group, in_proj width; floats: dt clamp, gated-norm eps
  MoE        ptrs: [gate|latent|shared-up] weights, [fc2_latent|shared-down] (latent) , shared down
             (no latent), selection bias, load counter, packed up, packed down; ints: E, k, expert dim,
             I, shared I, latent?, norm_topk; floats: routed scaling
  attention  ptrs: [q|k|v] weights, o_proj, K buffer, V buffer; ints: Hq, Hkv, Dh, capacity
  MLP        ptrs: up, down; ints: intermediate
  every layer: pointer slot 15 = the next norm's weight, float slot 3 = its eps; after the layers' slots one more,
  the first layer's pre-norm weight (its eps is an argument).
  Dense weights are passed as 16-column panels (``dense_panels``), rebuilt when a parameter changes.

The pointer table is rebuilt only when a parameter's identity, version or storage, or a buffer's identity
or storage, changes (derived weights are rebuilt after an optimizer step); buffers are read through their
pointers, so an in-place load count or balance update keeps it.  Moved cache buffers (select, cat, growth)
only rewrite the cache's slots (~0.09 ms instead of a ~0.45 ms rebuild).

Noticing a changed parameter means reading every parameter's identity, version and storage: ~20 us a call
with warm caches, ~150 us between the kernels of a rollout (a cache miss per read), ~5% of the engine's
time. Inside ``steady_weights(model)`` the caller promises that the weights change only where it says so
(``weights_changed(model)``) or by an optimizer step: the program then reads them all at its first call
and after each ``weights_changed``, and at its other calls only the optimizer step count. The engine plays
inside that scope and names the weight loads of its step hook.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import threading

import torch

from . import kernels

SLOT_P, SLOT_I, SLOT_F = 16, 12, 4
_RUN_LOCK = threading.Lock()  # one decode step at a time per process (each uses every OpenMP thread)
KINDS = {"M": 0, "E": 1, "*": 2, "-": 3}
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def program_for(model, h_bd, cache):
    """The model's decode program when the kernels can take this step (CPU fp32, no autograd), else None.

    Kept on the model (outside its state_dict and ``.to()``), rebuilt when the model's config changes."""
    if not kernels.usable(h_bd, model.lm_head.weight, *cache.tensors()):
        return None
    program = model.__dict__.get("_program")
    if program is None or (not program.checked() and program.config != model.config):
        program = model.__dict__["_program"] = DecodeProgram(model)
    return program


@contextlib.contextmanager
def steady_weights(model):
    """A scope in which ``model``'s parameters, buffers and config change only by an optimizer step or where
    ``weights_changed(model)`` says so: the decode program checks them at its first call in the scope and
    after each ``weights_changed``, instead of at every call (module docstring). Scopes nest; outside every
    scope each call checks everything, as before."""
    state = model.__dict__
    state["_steady_depth"] = state.get("_steady_depth", 0) + 1
    weights_changed(model)
    try:
        yield model
    finally:
        state["_steady_depth"] -= 1


def weights_changed(model) -> None:
    """Inside ``steady_weights``: the model's weights (or config) may have changed; the next call checks them."""
    model.__dict__["_weights_epoch"] = model.__dict__.get("_weights_epoch", 0) + 1


def _steady_epoch(model) -> int | None:
    """The model's weights epoch inside a ``steady_weights`` scope, None outside every scope."""
    state = model.__dict__
    return state.get("_weights_epoch", 0) if state.get("_steady_depth") else None


def dense_panels(mixer, kind: str) -> tuple:
    """The mixer's dense projection weights as panels (``kernels.linear_panels``), in the program's
    slot order; kept while the parameters are unchanged (rebuilt after an optimizer step)."""
    if kind == "M":
        params = (mixer.in_proj.weight, mixer.out_proj.weight)
        weights = lambda: params  # noqa: E731
    elif kind == "E":
        params = tuple(mixer.step_params())
        shared_down = mixer.shared_experts.down_proj.weight if mixer.cfg.n_shared_experts else None

        def weights():
            w_in, w_out = mixer.step_weights()
            return w_in, w_out, shared_down if w_out is None else None
    elif kind == "*":
        params = (mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight, mixer.o_proj.weight)
        weights = lambda: (torch.cat(params[:3]), params[3])  # noqa: E731 - [q; k; v] as one projection
    else:
        params = (mixer.up_proj.weight, mixer.down_proj.weight)
        weights = lambda: params  # noqa: E731
    return kernels.derived(mixer, "panels", params, lambda: tuple(
        None if w is None else kernels.linear_panels(w) for w in weights()))


class DecodeProgram:
    """Constant part of the program for one model: kinds, ints, floats (capacity filled in per step)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.n = len(cfg.layer_pattern)
        self.kinds = torch.tensor([KINDS[k] for k in cfg.layer_pattern], dtype=torch.int32)
        self.ints = torch.zeros(self.n, SLOT_I, dtype=torch.int32)
        self.floats = torch.zeros(self.n, SLOT_F, dtype=torch.float32)
        norms = [block.norm for block in model.backbone.layers[1:]] + [model.backbone.norm_f]
        self._eps0 = model.backbone.layers[0].norm.eps  # the first pre-norm's (its weight: the table's last slot)
        for i, (kind, block) in enumerate(zip(cfg.layer_pattern, model.backbone.layers)):
            mixer = block.mixer
            if kind == "M":
                self.ints[i, :7] = torch.tensor([cfg.conv_kernel, mixer.heads, mixer.head_dim, mixer.groups,
                                                 mixer.state_size, mixer.norm.group_size, cfg.mamba_in_proj_dim])
                self.floats[i, :2] = torch.tensor([cfg.time_step_min_clamp, mixer.norm.eps])
            elif kind == "E":
                shared = cfg.moe_shared_expert_intermediate_size if cfg.n_shared_experts else 0
                self.ints[i, :7] = torch.tensor([cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_expert_dim,
                                                 cfg.moe_intermediate_size, shared, int(cfg.moe_latent_size is not None),
                                                 int(cfg.norm_topk_prob)])
                self.floats[i, 0] = cfg.routed_scaling_factor
            elif kind == "*":
                self.ints[i, :3] = torch.tensor([mixer.heads, mixer.kv_heads, mixer.head_dim])
            else:
                self.ints[i, 0] = cfg.intermediate_size
            self.floats[i, SLOT_F - 1] = norms[i].eps
        self.config = copy.deepcopy(cfg)  # the program is rebuilt when the model's config differs from it
        self.n_moe = cfg.layer_pattern.count("E")
        self._work, self._work_key = torch.empty(0, dtype=torch.float32), None
        self._ext_work = torch.empty(0, dtype=torch.float32)  # an extension's workspace (grows, never shrinks)
        self._capacity = None  # the KV capacity written into the attention layers' ints
        # where each parameter and buffer lives (read anew each step: walking the modules costs ~0.5 ms)
        self._homes = [(m._parameters, n) for m in model.modules() for n in m._parameters]
        self._buffer_homes = [(m._buffers, n) for m in model.modules() for n in m._buffers]
        # the cache's pointer slots: (flat index into the table, store name, layer)
        self._cache_slots = [(i * SLOT_P + j, store, i) for i, kind in enumerate(cfg.layer_pattern)
                             for j, store in ((8, "conv"), (9, "ssm")) if kind == "M"] + \
                            [(i * SLOT_P + j, store, i) for i, kind in enumerate(cfg.layer_pattern)
                             for j, store in ((2, "k"), (3, "v")) if kind == "*"]
        self._weights_sig, self._cache_sig = None, None
        self._checked_epoch: int | None = None  # the steady scope's epoch of the last full check
        self._table: list[int] = []  # the pointer slots as ints (weights and cache)
        self._ptrs, self._head_panels = None, None

    def _weights_signature(self) -> tuple:
        """What a rebuilt table would differ by: the optimizer steps of the process, per parameter its
        identity, version and storage, per buffer its identity and storage (flat lists: cheap to build and
        to compare).  Buffers (the selection bias, the load counter) are read through their pointers, never
        copied, so an in-place update of one (a load count, a balance update) keeps the table."""
        params = [t for t in (home[name] for home, name in self._homes) if t is not None]
        buffers = [t for t in (home[name] for home, name in self._buffer_homes) if t is not None]
        try:
            versions = list(map(_VERSION, params))
        except RuntimeError:  # inference tensors keep no version counter
            versions = list(map(kernels.version, params))
        return (kernels.optimizer_steps(), list(map(id, params)), versions, list(map(_DATA_PTR, params)),
                list(map(id, buffers)), list(map(_DATA_PTR, buffers)))

    def checked(self) -> bool:
        """Inside a ``steady_weights`` scope, the weights and config were checked since its last change."""
        epoch = _steady_epoch(self.model)
        return (epoch is not None and epoch == self._checked_epoch and self._weights_sig is not None
                and self._weights_sig[0] == kernels.optimizer_steps())

    def pointers(self, cache) -> torch.Tensor:
        """The pointer slots as an int64 tensor; reused while no weight and no cache buffer has changed.
        A changed weight rebuilds the table; moved cache buffers (select, cat, growth) only rewrite the
        cache's slots. Inside ``steady_weights`` the weights are read only when ``checked()`` is False."""
        checked = self.checked()
        weights = self._weights_sig if checked else self._weights_signature()
        stores = {"conv": cache.conv, "ssm": cache.ssm, "k": cache.k, "v": cache.v}
        cache_sig = [stores[store][i].data_ptr() for _, store, i in self._cache_slots]
        if weights != self._weights_sig:
            self._table = self._collect(cache)
            head = self.model.lm_head.weight
            self._head_panels = kernels.derived(self.model.lm_head, "panels", (head,),
                                                lambda: kernels.linear_panels(head))
            self._weights_sig, self._cache_sig = weights, None
        if not checked:  # only once the table holds these weights (a rebuild that raised leaves it unchecked)
            self._checked_epoch = _steady_epoch(self.model)
        if cache_sig != self._cache_sig:
            for (slot, _, _), ptr in zip(self._cache_slots, cache_sig):
                self._table[slot] = ptr
            self._ptrs = torch.tensor(self._table, dtype=torch.int64)
            self._cache_sig = cache_sig
        return self._ptrs

    def _collect(self, cache) -> list[int]:
        ptrs = [0] * (self.n * SLOT_P + 1)  # every layer's slots, then the first pre-norm's weight
        p = kernels.ptr
        layers = self.model.backbone.layers
        next_norm = [block.norm.weight for block in layers[1:]] + [self.model.backbone.norm_f.weight]
        for i, block in enumerate(self.model.backbone.layers):
            mixer, base = block.mixer, i * SLOT_P
            slots: list = []
            dense = dense_panels(mixer, self.model.config.layer_pattern[i])
            if self.kinds[i] == 0:
                conv_w, a = mixer.scan_weights()
                slots = [*dense, conv_w, mixer.conv1d.bias, mixer.dt_bias, a, mixer.D, mixer.norm.weight,
                         cache.conv[i], cache.ssm[i]]
            elif self.kinds[i] == 1:
                up_p, down_p = mixer.packed_experts()
                slots = [*dense, mixer.gate.e_score_correction_bias, mixer.expert_load, up_p, down_p]
            elif self.kinds[i] == 2:
                slots = [*dense, cache.k[i], cache.v[i]]
            else:
                slots = list(dense)
            for j, t in enumerate(slots):
                ptrs[base + j] = p(t) if t is not None else 0
            ptrs[base + SLOT_P - 1] = p(next_norm[i])
        ptrs[self.n * SLOT_P] = p(layers[0].norm.weight)
        return ptrs

    def run(self, h_bd, cache, record: bool):
        """h_bd: embeddings [B, D] (consumed as the residual stream). Returns (final normed hidden [B, D],
        logits [B, V], routes [n_moe, B, k] long or None)."""
        with _RUN_LOCK:  # the tables and the workspace are shared by every caller of this model
            return self._run(h_bd, cache, record)

    def _sync_capacity(self, cache) -> None:
        """The KV capacity the attention layers' ints hold (a step's workspace depends on it)."""
        if self.n and cache.k and cache.capacity != self._capacity:
            self._capacity = cache.capacity
            self.ints[self.kinds == 2, 3] = self._capacity
            self._work_key = None

    def head(self, x_nd):
        """Logits [N, V] of final normed hidden states [N, D], through the head's panels (as a decode step;
        ``pointers`` keeps them current)."""
        p, (n, d) = kernels.ptr, x_nd.shape
        vocab = self.model.lm_head.weight.shape[0]
        logits = x_nd.new_empty(n, vocab)
        kernels.library().linear_packed(p(x_nd), p(self._head_panels), p(logits), n, d, d, vocab, vocab)
        return logits

    def _run(self, h_bd, cache, record: bool):
        b, d = h_bd.shape
        p = kernels.ptr
        self._sync_capacity(cache)
        lib = kernels.library()
        if self._work_key != b:  # the workspace depends on the rows and the KV capacity
            size = lib.decode_work_size(self.n, p(self.kinds), p(self.ints), b, d)
            if self._work.numel() < size:
                self._work = torch.empty(size, dtype=torch.float32)
            self._work_key = b
        x = torch.empty_like(h_bd)  # the first pre-norm, then each layer's (decode_layers)
        routes = torch.empty(self.n_moe, b, self.model.config.num_experts_per_tok, dtype=torch.long) if record else None
        ptrs = self.pointers(cache)
        lib.decode_layers(self.n, p(self.kinds), p(ptrs), p(self.ints), p(self.floats),
                          p(h_bd), p(x), p(self._work), p(cache.lengths), p(routes) if record else None, b, d,
                          self._eps0)
        return x, self.head(x), routes

    def extend(self, h_md, cache, rows_r, n_new_r, record: bool):
        """A cache extension of some rows in one kernel call (``extend_layers``): ``h_md`` the new tokens'
        embeddings [M, D] (consumed as the residual stream), packed row after row; ``rows_r`` the cache rows
        (long [R], distinct), ``n_new_r`` their new tokens (long [R], each >= 1, summing to M). The rows'
        conv windows, SSM states and KV buffers are extended in place (the caller reserves the KV room and
        then advances ``cache.lengths``); other rows are not touched. Returns (the final normed hidden state
        of each row's last new token [R, D], routes [n_moe, M, k] long or None).

        Without ``record``, from the output of the last layer that writes the cache (Mamba or attention) on,
        only the rows' last tokens are computed: the other new tokens reach no logit past that point (for
        ``tiny``: the last attention layer's queries and output projection, and the final MoE layer). The
        experts' load counters of those last layers then count the last tokens only; with ``record`` every
        token is routed and counted."""
        with _RUN_LOCK:
            return self._extend(h_md, cache, rows_r, n_new_r, record)

    def _extend(self, h_md, cache, rows_r, n_new_r, record: bool):
        m, d = h_md.shape
        r, p = rows_r.numel(), kernels.ptr
        self._sync_capacity(cache)
        lib = kernels.library()
        size = lib.extend_work_size(self.n, p(self.kinds), p(self.ints), m, r, d)
        if self._ext_work.numel() < size:
            self._ext_work = torch.empty(size, dtype=torch.float32)
        len_r = cache.lengths.index_select(0, rows_r).contiguous()
        off_r = (torch.cumsum(n_new_r, 0) - n_new_r).contiguous()
        x = torch.empty_like(h_md)
        routes = torch.empty(self.n_moe, m, self.model.config.num_experts_per_tok, dtype=torch.long) if record else None
        ptrs = self.pointers(cache)
        lib.extend_layers(self.n, p(self.kinds), p(ptrs), p(self.ints), p(self.floats), p(h_md), p(x),
                          p(self._ext_work), p(rows_r), p(len_r), p(n_new_r), p(off_r),
                          p(routes) if record else None, r, m, d, self._eps0)
        return x[:r], routes
