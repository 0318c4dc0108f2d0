"""Training memory per device, from ``HybridConfig`` fields alone (arithmetic, nothing is allocated).

``train_memory(cfg, TrainSetup(...))`` returns the bytes one device holds in a training step of one
micro-batch, term by term; ``activation_bytes_per_token`` gives what one layer kind keeps for its backward.
Legend: D hidden, V vocab, I = d_inner (Mamba heads x head dim), W = in_proj width, C = conv width
(I + 2GN), H / P / G / N / Q Mamba heads / head dim / groups / state / chunk, Ha / Hkv / Dh attention
heads / KV heads / head dim, E / k / Ie / De / Is experts / experts per token / expert width / expert
input width (latent or D) / shared-expert width, e the compute dtype's bytes (4 fp32, 2 bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrid_rl.registry import check_name

from .cache import cache_bytes
from .config import HybridConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STRATEGIES = ("ddp", "fsdp")
# where and how the step runs: "torch" = a GPU: PyTorch ops (any dtype, autocast) and the multi-tensor AdamW;
# "kernels" = a CPU in fp32: HybridLM's default "fast" implementation, whose C-kernel Functions keep less for
# the Mamba backward, and AdamW's per-parameter loop (torch's default off CUDA)
PATHS = ("torch", "kernels")
REFERENCES = ("none", "device", "host")  # RL's KL reference (algo.kl_beta > 0): none, on the device, in host memory
LOGPROB_BUFFERS = 3  # [tokens, V] fp32 live at once: the log-softmax output, its gradient, the logits' gradient


@dataclass(frozen=True)
class TrainSetup:
    strategy: str = "fsdp"  # "ddp" replicates weights, grads and optimizer state; "fsdp" shards them over devices
    devices: int = 1
    dtype: str = "bf16"  # compute dtype: "bf16" = autocast over fp32 master weights, "fp32" = no autocast
    batch: int = 1  # rows of one micro-batch
    seq_len: int = 8192  # tokens per row; the micro-batch is batch x seq_len tokens
    checkpointing: bool = True  # HybridLM.set_activation_checkpointing
    logprob_chunk_tokens: int | None = None  # log-probs over chunks of this many tokens (None: all at once)
    rollout_batch: int = 0  # rows of the rollout engine's decode cache on the same device (0: none)
    rollout_context: int = 0  # tokens per rollout row
    path: str = "torch"
    reference: str = "none"  # RL's frozen KL reference (algo.kl_beta > 0): "device", or "host" (train.ref_offload)

    def __post_init__(self):
        check_name("parallel strategy", self.strategy, STRATEGIES)
        check_name("training dtype", self.dtype, DTYPE_BYTES)
        check_name("training path", self.path, PATHS)
        check_name("KL reference placement", self.reference, REFERENCES)
        for name in ("devices", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.logprob_chunk_tokens is not None and self.logprob_chunk_tokens < 1:
            raise ValueError("logprob_chunk_tokens must be at least 1 or None (no chunking), "
                             f"got {self.logprob_chunk_tokens}")
        if self.rollout_batch < 0 or self.rollout_context < 0:
            raise ValueError("rollout_batch and rollout_context must be >= 0")
        if self.path == "kernels" and self.dtype != "fp32":
            raise ValueError("the 'kernels' path is CPU fp32 only; use path='torch' for bf16")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def resolve(config_or_preset) -> HybridConfig:
    return HybridConfig.from_preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset


# ----------------------------------------------------------------------------- parameters
def block_params(cfg: HybridConfig, kind: str) -> int:
    """Parameters of one layer of ``kind`` (its pre-norm included)."""
    d = cfg.hidden_size
    if kind == "M":
        i, c, h = cfg.mamba_d_inner, cfg.mamba_conv_dim, cfg.mamba_num_heads
        mixer = d * cfg.mamba_in_proj_dim + c * (cfg.conv_kernel + 1) + 3 * h + i + i * d
    elif kind == "*":
        mixer = 2 * d * cfg.num_attention_heads * cfg.head_dim + 2 * d * cfg.num_key_value_heads * cfg.head_dim
    elif kind == "E":
        mixer = cfg.n_routed_experts * (d + 2 * cfg.moe_intermediate_size * cfg.moe_expert_dim)
        mixer += 2 * d * cfg.moe_shared_expert_intermediate_size * cfg.n_shared_experts
        mixer += 2 * d * cfg.moe_latent_size if cfg.moe_latent_size is not None else 0
    else:
        mixer = 2 * d * cfg.intermediate_size
    return d + mixer


def param_units(cfg: HybridConfig) -> list[int]:
    """Parameters per FSDP unit: each layer, the MTP block, and the rest (embeddings, final norm, lm_head)."""
    d = cfg.hidden_size
    head = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    units = [block_params(cfg, kind) for kind in cfg.layer_pattern] + [head]
    if cfg.num_mtp_layers:
        units.append(sum(block_params(cfg, kind) for kind in cfg.mtp_layer_pattern) + 2 * d * d + 3 * d)
    return units


def param_count(config_or_preset) -> int:
    return sum(param_units(resolve(config_or_preset)))


def largest_param(cfg: HybridConfig) -> int:
    """Elements of the largest single parameter tensor (AdamW's per-parameter loop allocates one of its size)."""
    d, kinds = cfg.hidden_size, set(cfg.layer_pattern + (cfg.mtp_layer_pattern if cfg.num_mtp_layers else ""))
    sizes = [cfg.vocab_size * d]
    if "M" in kinds:
        sizes += [d * cfg.mamba_in_proj_dim, cfg.mamba_d_inner * d]
    if "*" in kinds:
        sizes += [d * cfg.num_attention_heads * cfg.head_dim]
    if "E" in kinds:
        sizes += [cfg.n_routed_experts * cfg.moe_intermediate_size * cfg.moe_expert_dim,
                  d * cfg.moe_shared_expert_intermediate_size, d * cfg.moe_expert_dim, cfg.n_routed_experts * d]
    if "-" in kinds:
        sizes += [d * cfg.intermediate_size]
    return max(sizes)


# ----------------------------------------------------------------------------- activations
def _projection_inputs(cfg: HybridConfig, kind: str, e: int) -> float:
    """The normed block input as the mixer's projections keep it: one fp32 tensor in fp32; under bf16
    autocast each linear keeps its own bf16 cast (the MoE router keeps the fp32 one)."""
    d = cfg.hidden_size
    if e == 4:
        return 4 * d
    if kind == "E":
        return 4 * d + 2 * d * ((cfg.moe_latent_size is not None) + cfg.n_shared_experts)
    return 2 * d * (3 if kind == "*" else 1)


def _ssd_internals(cfg: HybridConfig, q: int, path: str) -> float:
    """What the chunked SSD scan keeps (fp32, per token): X, cs, M, C.B, decay to the end, scaled B and C,
    chunk decays, chunk start states, decay from the start; the PyTorch stages also keep L."""
    h, n, p, g = cfg.mamba_num_heads, cfg.ssm_state_size, cfg.mamba_head_dim, cfg.n_groups
    floats = cfg.mamba_d_inner + 3 * h + h * q + g * q + 2 * h * n + h / q + h * n * p / q
    return 4 * (floats + (h * q if path == "torch" else 0))


def activation_bytes_per_token(config_or_preset, kind: str, dtype: str = "fp32", path: str = "torch",
                               seq_len: int | None = None) -> float:
    """Bytes one layer of ``kind`` ("M", "*", "E", "-") keeps for its backward per token, with its pre-norm;
    "head" = final norm and lm_head input, "embed" = the token ids.  The log-softmax output is not in here
    (``logprob_bytes``).  Counted from the tensors the implementation saves (tests hold it to
    ``saved_tensors_hooks`` on a real forward); per-layer constants (weight copies) are left out.
    ``seq_len``: the SSD chunk is min(chunk_size, seq_len); T is taken as a multiple of it."""
    cfg = resolve(config_or_preset)
    e = DTYPE_BYTES[dtype]
    d = cfg.hidden_size
    norm = 4 * d + 4  # the block norm: its fp32 input (or normed output) and one rstd per token
    if kind == "embed":
        return 8
    if kind == "head":
        return norm + e * d
    if kind not in "M*E-" or len(kind) != 1:
        raise ValueError(f"unknown layer kind {kind!r}; use M, *, E, -, head or embed")
    kept = norm + _projection_inputs(cfg, kind, e)
    if kind == "M":
        i, w, c, h, g = cfg.mamba_d_inner, cfg.mamba_in_proj_dim, cfg.mamba_conv_dim, cfg.mamba_num_heads, cfg.n_groups
        gn = cfg.n_groups * cfg.ssm_state_size
        q = min(cfg.chunk_size, seq_len or cfg.chunk_size)
        if path == "kernels":  # _MambaMixer: proj, softplus input, conv+SiLU out, scan out, gated-norm rstd
            kept += 4 * (w + h + c + i + g + h) + 4 * i
        else:  # in_proj out, conv out, dt steps, scan inputs in fp32, gated norm (normed, y, gates; z in bf16)
            clamp = 4 * h if cfg.time_step_min_clamp > 0 else 0
            scan_in = 4 * c + 8 * gn if e == 4 else 4 * i + 8 * gn
            gated = 4 * (4 * i + g) + (4 * i if e == 2 else 0)
            kept += e * w + e * c + 4 * h + clamp + scan_in + 4 * h + gated + e * i
        return kept + _ssd_internals(cfg, q, path)
    if kind == "*":
        ha, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        o_proj_in = e * ha * dh if e == 2 else 0  # in fp32 the attention output is o_proj's input as is
        return kept + e * (2 * ha * dh + 2 * hkv * dh) + 4 * ha + o_proj_in
    if kind == "E":
        k, de, ie = cfg.num_experts_per_tok, cfg.moe_expert_dim, cfg.moe_intermediate_size
        router = 4 * cfg.n_routed_experts + 8 * k + 4 * k + (4 * k + 4 if cfg.norm_topk_prob else 0)
        experts = e * k * (2 * de + 2 * ie) + 3 * 8 * k  # gathered rows, relu, relu^2, outputs; sort indices
        latent = e * de if cfg.moe_latent_size is not None else 0
        shared = 2 * e * cfg.moe_shared_expert_intermediate_size * cfg.n_shared_experts
        return kept + router + experts + latent + shared
    return kept + 2 * e * cfg.intermediate_size  # "-": relu(up x) and its square


def backward_workspace_per_token(config_or_preset, kind: str, dtype: str = "fp32", seq_len: int | None = None) -> float:
    """Gradient buffers live together at the peak of one layer's backward, per token (fp32 unless noted):
    the residual stream's gradient in and out (2D), and per kind what its backward holds at once --
    Mamba: the gradients of the projection (W), the scan output and input (I, C), and inside the scan
    gY, gX (I each), Z, W (HN each), gM (HQ), gCB (GQ), gB, gC (GN each), the chunk-state gradients
    (2HNP/Q); attention: the output's gradient and q/k/v gradients with the KV heads expanded (4 Ha Dh, e);
    MoE: the gradients of the expert outputs, inputs (k De each, e), the relu (k Ie, e), the combined
    input (De) and the shared expert's (Is); MLP: 2 I."""
    cfg = resolve(config_or_preset)
    e = DTYPE_BYTES[dtype]
    ws = 8 * cfg.hidden_size
    if kind == "M":
        i, h, g = cfg.mamba_d_inner, cfg.mamba_num_heads, cfg.n_groups
        n, p = cfg.ssm_state_size, cfg.mamba_head_dim
        q = min(cfg.chunk_size, seq_len or cfg.chunk_size)
        ws += 4 * (cfg.mamba_in_proj_dim + cfg.mamba_conv_dim + 3 * i + 2 * h * n + h * q + g * q + 2 * g * n
                   + 2 * h * n * p / q)
    elif kind == "*":
        ws += 4 * e * cfg.num_attention_heads * cfg.head_dim
    elif kind == "E":
        k, de = cfg.num_experts_per_tok, cfg.moe_expert_dim
        ws += e * k * (2 * de + cfg.moe_intermediate_size) + 4 * de
        ws += e * cfg.moe_shared_expert_intermediate_size * cfg.n_shared_experts
    else:
        ws += 2 * e * cfg.intermediate_size
    return ws


def logprob_bytes(config_or_preset, tokens: int, chunk_tokens: int | None = None) -> int:
    """The log-prob pass: ``LOGPROB_BUFFERS`` fp32 [rows, V] at its peak (the log-softmax output kept for
    the backward, its gradient, the logits' gradient), rows = all tokens or one chunk of them."""
    cfg = resolve(config_or_preset)
    rows = tokens if chunk_tokens is None else min(chunk_tokens, tokens)
    return LOGPROB_BUFFERS * 4 * rows * cfg.vocab_size


def activation_peak(cfg: HybridConfig, setup: TrainSetup) -> dict[str, int]:
    """Activation bytes of one micro-batch: ``kept`` (what the forward leaves for the backward: every
    layer's saved tensors, or with checkpointing only each layer's fp32 input [T, D]) and ``peak`` (the
    largest moment of the backward: the layers not yet reached, plus the current layer's saved tensors --
    recomputed when checkpointed -- and its backward workspace)."""
    t = setup.tokens
    per_kind = {kind: activation_bytes_per_token(cfg, kind, setup.dtype, setup.path, setup.seq_len) * t
                for kind in set(cfg.layer_pattern)}
    ws = {kind: backward_workspace_per_token(cfg, kind, setup.dtype, setup.seq_len) * t for kind in per_kind}
    layer_input = 4 * cfg.hidden_size * t
    stored = [layer_input if setup.checkpointing else per_kind[k] for k in cfg.layer_pattern]
    outside = (activation_bytes_per_token(cfg, "head", setup.dtype) + 8) * t  # final norm, lm_head input, ids
    kept = sum(stored) + outside
    peak, below = 0.0, sum(stored)
    for kind, own in zip(reversed(cfg.layer_pattern), reversed(stored)):
        below -= own
        live = below + own + ws[kind] + (per_kind[kind] if setup.checkpointing else 0)
        peak = max(peak, live + 8 * t)
    return {"kept": int(kept), "peak": int(peak)}


# ----------------------------------------------------------------------------- the whole device
def train_memory(config_or_preset, setup: TrainSetup) -> dict[str, int]:
    """Bytes per device of one training step; ``total`` is the step's peak. What it assumes:

    * AdamW, two fp32 moments per parameter, and fp32 master weights: in bf16 the trainer computes under
      autocast, so weights, gradients and optimizer state stay fp32 and bf16 appears only in activations.
    * DDP keeps all of that on every device, plus (on more than one device) its gradient buckets, a second
      fp32 copy of the gradients, and in bf16 autocast's bf16 weight copies kept for the backward (every
      layer's, or one layer's when checkpointed).
    * FSDP divides weights, gradients and optimizer state by the device count and adds the largest unit
      (a layer, or embeddings + lm_head) all-gathered in the compute dtype with its unsharded fp32
      gradient before the reduce-scatter.
    * Gradients are present while the activations are: true from the second micro-batch of an accumulated
      step on; with one micro-batch they grow while the activations are freed (then this over-counts).
    * The activation phase peaks at the larger of the start of the backward (kept activations and the
      log-prob pass, fp32 whatever the compute dtype) and the largest layer backward (``activation_peak``).
    * The optimizer step's transient replaces the activation phase (it wins only when activations are
      small): the square root of the second moment, for all local parameters at once in the multi-tensor
      AdamW (a GPU, path "torch"), for the largest parameter in the per-parameter loop (a CPU, "kernels").
    * ``rollout_cache``: a rollout engine's decode cache on the same device (``cache_bytes``), in fp32: the pool's
      model is fp32 and the engine does not autocast, so its cache takes the weights' dtype (``HybridLM.new_cache``).
    * ``reference`` (RL with ``algo.kl_beta > 0``; ``Parallel.frozen_copy``): on the device, DDP's is a full fp32
      copy, FSDP's a 1/N shard in the compute dtype (no MTP block in either). ``reference_pass`` is what its pass
      adds while it runs, before the policy's forward of a micro-batch (so in place of the activation phase, beside
      the gradients): FSDP's gathered root unit and one gathered layer; an offloaded DDP reference comes to the
      device whole. (Its own activations and log-prob chunk, far below the policy's step, are not counted.)
    """
    cfg = resolve(config_or_preset)
    s = setup
    n = s.devices if s.strategy == "fsdp" else 1
    e = DTYPE_BYTES[s.dtype]
    units = param_units(cfg)
    params = sum(units)
    local = math.ceil(params / n)
    out = {"params": params, "weights": 4 * local, "grads": 4 * local, "optimizer": 8 * local}
    if s.strategy == "ddp":
        out["ddp_buckets"] = 4 * params if s.devices > 1 else 0  # one device: no DDP wrapper
        largest = max(units) if s.checkpointing else params
        out["weight_copies"] = 2 * largest if s.dtype == "bf16" else 0
        out["fsdp_gathered"] = 0
    else:
        out["ddp_buckets"] = out["weight_copies"] = 0
        out["fsdp_gathered"] = (e + 4) * max(units) if n > 1 else 0
    act = activation_peak(cfg, s)
    out["activations_kept"], out["activations"] = act["kept"], act["peak"]
    out["logprobs"] = logprob_bytes(cfg, s.tokens, s.logprob_chunk_tokens)
    out["rollout_cache"] = cache_bytes(cfg, s.rollout_context, s.rollout_batch, kv_bytes=4, conv_bytes=4)
    out["reference"], out["reference_pass"] = reference_bytes(cfg, s, n, e)
    static = sum(out[k] for k in ("weights", "grads", "optimizer", "ddp_buckets", "weight_copies", "rollout_cache",
                                  "reference"))
    step_phase = max(act["kept"] + out["logprobs"], act["peak"]) + out["fsdp_gathered"]
    adamw_temp = 4 * (local if s.path == "torch" else math.ceil(largest_param(cfg) / n))
    out["total"] = int(static + max(step_phase, adamw_temp, out["reference_pass"]))
    return out


def reference_bytes(cfg: HybridConfig, s: TrainSetup, n: int, e: int) -> tuple[int, int]:
    """(bytes the KL reference holds on the device, bytes its pass adds while it runs) per device. The reference
    has no MTP block (no loss reaches it); under FSDP its root unit (embeddings, final norm, lm_head) stays
    gathered through the pass, beside one layer's unit at a time."""
    if s.reference == "none":
        return 0, 0
    units = param_units(cfg)[:cfg.num_layers + 1]  # the layers, then the root unit (param_units' order)
    params = sum(units)
    if s.strategy == "fsdp":
        gathered = e * (units[-1] + max(units[:-1])) if n > 1 else 0
        return (0 if s.reference == "host" else e * math.ceil(params / n)), gathered
    return (0, 4 * params) if s.reference == "host" else (4 * params, 0)


def devices_needed(config_or_preset, setup: TrainSetup, device_bytes: float, headroom: float = 0.1,
                   max_devices: int = 4096) -> int | None:
    """The smallest device count whose per-device ``total`` fits in ``device_bytes`` less ``headroom``
    (a fraction kept free for the allocator, communication buffers and the CUDA context); None if none up
    to ``max_devices``. DDP does not divide the state, so it either fits on one or on none."""
    budget = device_bytes * (1 - headroom)
    for n in range(1, max_devices + 1):
        if train_memory(config_or_preset, _with(setup, devices=n))["total"] <= budget:
            return n
        if setup.strategy == "ddp":
            return None
    return None


def _with(setup: TrainSetup, **changes) -> TrainSetup:
    from dataclasses import replace

    return replace(setup, **changes)
