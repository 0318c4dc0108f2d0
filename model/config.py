"""``HybridConfig``: the shape of a Nemotron-3-style hybrid model, with named presets.

Field names follow transformers' ``NemotronHConfig`` wherever one exists, so that import/export
(model/hf.py) is a rename table, not a translation. The layer stack is a string of letters:

    M  Mamba-2 mixer         *  attention (GQA, no positional encoding)
    E  MoE (LatentMoE when moe_latent_size is set)     -  dense squared-ReLU MLP

Presets (``HybridConfig.from_preset(name, **overrides)``):
    micro            ~1M params, every layer kind: quickstart and fast tests on a laptop CPU
    tiny             the canonical benchmark model of docs/PEERS (~9.1M params with vocab 512)
    small            ~150M params, for a single GPU
    nemotron3-nano   the published Nano 30B-A3B shape
    nemotron3-super  the published Super 120B-A12B shape (LatentMoE + one MTP block)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hybrid_rl.registry import Registry

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
# transformers >= 5.14 spells the layer list as layers_block_type names
HF_BLOCK_NAMES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}


@dataclass
class HybridConfig:
    preset: str = ""  # the preset these values started from ("" = none); informational on save
    vocab_size: int = 512
    hidden_size: int = 256
    layer_pattern: str = "MEMEM*EMEM*E"  # one letter per layer, see module docstring
    rms_norm_eps: float = 1e-5  # Nemotron-H uses 1e-5 everywhere (block norms, final norm, gated norm)
    tie_word_embeddings: bool = False  # Nemotron 3 keeps lm_head separate from the embeddings
    initializer_range: float = 0.02

    # attention: GQA, causal, scale 1/sqrt(head_dim), no bias, no RoPE (position comes from Mamba)
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64

    # dense MLP ('-' layers): down(relu(up(x))**2), no gate
    intermediate_size: int = 512

    # Mamba-2: d_in = mamba_num_heads * mamba_head_dim (not expand * hidden)
    mamba_num_heads: int = 8
    mamba_head_dim: int = 64
    ssm_state_size: int = 32
    n_groups: int = 2  # B/C groups; head h reads group h // (heads / n_groups)
    conv_kernel: int = 4
    chunk_size: int = 64  # SSD chunk length for training/prefill; any sequence length works
    # dt >= this after the softplus, in every path (prefill, extend, one-step decode) so they agree.
    # A checkpoint's time_step_limit[0] (mamba_ssm's dt_limit; model/hf.py). The presets keep 1e-3, the clamp
    # transformers <= 5.24 applied (at time_step_min) when they were made; real Nemotron-H checkpoints say 0 (no clamp).
    time_step_min_clamp: float = 1e-3

    # MoE ('E' layers): sigmoid router on the full hidden state, bias for selection only
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 256
    moe_shared_expert_intermediate_size: int = 256
    n_shared_experts: int = 1  # 0 or 1 shared expert (on the full hidden state)
    moe_latent_size: int | None = 128  # LatentMoE: routed experts run in this width; None = plain MoE
    routed_scaling_factor: float = 1.0  # Nano 2.5, Super 5.0
    norm_topk_prob: bool = True

    # multi-token prediction (Super): one block of this pattern, reused for draft steps
    num_mtp_layers: int = 0  # 0 = no MTP block; 1 = one block (weights mtp.*)
    mtp_layer_pattern: str = "*E"

    # special token ids carried into config.json (the byte tokenizer's ids by default)
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        bad = sorted({c for c in self.layer_pattern + self.mtp_layer_pattern if c not in LAYER_KINDS})
        if bad:
            raise ValueError(
                f"layer_pattern {self.layer_pattern!r} has unknown layer letter(s) {''.join(bad)!r}; "
                "use M (Mamba-2), * (attention), E (MoE) or - (MLP)"
            )
        if not self.layer_pattern:
            raise ValueError("layer_pattern is empty; give at least one layer, e.g. 'M*E'")
        positive = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                    "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
        if self.n_shared_experts not in (0, 1):
            raise ValueError(f"n_shared_experts must be 0 or 1, got {self.n_shared_experts}")
        if self.moe_latent_size is not None and self.moe_latent_size <= 0:
            raise ValueError(f"moe_latent_size must be positive or null, got {self.moe_latent_size}")
        if self.time_step_min_clamp < 0:
            raise ValueError(f"time_step_min_clamp must be >= 0 (0 = no clamp), got {self.time_step_min_clamp}")
        if self.num_mtp_layers and not self.mtp_layer_pattern:
            raise ValueError("mtp_layer_pattern is empty but num_mtp_layers = 1; give the MTP block's layers, e.g. '*E'")
        if self.num_mtp_layers not in (0, 1):
            raise ValueError(f"num_mtp_layers must be 0 or 1 (one MTP block reused for draft steps), got {self.num_mtp_layers}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps} (a norm of 0 would divide by 0)")
        if self.n_shared_experts and "E" in self.layer_pattern + self.mtp_layer_pattern and self.moe_shared_expert_intermediate_size <= 0:
            raise ValueError(f"moe_shared_expert_intermediate_size must be positive with a shared expert, got "
                             f"{self.moe_shared_expert_intermediate_size} (or set n_shared_experts=0)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a token id of the vocabulary [0, {self.vocab_size}); "
                                 f"give an id below vocab_size (or raise vocab_size)")

    # ------------------------------------------------------------------ derived sizes (one place)
    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:  # the x|B|C slice that goes through the causal conv
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:  # [z | x | B | C | dt]
        return 2 * self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    @property
    def moe_expert_dim(self) -> int:  # width the routed experts run in
        return self.moe_latent_size or self.hidden_size

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset_names(cls) -> list[str]:
        return PRESETS.names()

    @classmethod
    def preset_defaults(cls, name: str) -> dict:
        """The preset's field values (used by the config loader for ``model: {preset: NAME}``)."""
        return {**PRESETS.get(name), "preset": name}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HybridConfig":
        return cls(**{**cls.preset_defaults(name), **overrides})

    def replace(self, **changes) -> "HybridConfig":
        return dataclasses.replace(self, **changes)


PRESETS: Registry[dict] = Registry("model preset", {
    "micro": dict(
        vocab_size=320, hidden_size=128, layer_pattern="MEM*E-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
        mamba_num_heads=4, mamba_head_dim=32, ssm_state_size=16, n_groups=1, chunk_size=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=128, n_shared_experts=1, moe_latent_size=None,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=256, layer_pattern="MEMEM*EMEM*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
        ssm_state_size=32, mamba_num_heads=8, mamba_head_dim=64, n_groups=2, chunk_size=64,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256, moe_latent_size=128, n_shared_experts=1,
    ),
    "small": dict(
        vocab_size=32768, hidden_size=768, layer_pattern="MEMEM*EMEMEM*EMEMEM*E",
        num_attention_heads=12, num_key_value_heads=2, head_dim=64, intermediate_size=2048,
        ssm_state_size=64, mamba_num_heads=24, mamba_head_dim=64, n_groups=4, chunk_size=128,
        n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024, moe_latent_size=384, n_shared_experts=1,
        routed_scaling_factor=2.5,
    ),
    "nemotron3-nano": dict(
        vocab_size=131072, hidden_size=2688,
        layer_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=1856,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, n_shared_experts=1, moe_latent_size=None,
        routed_scaling_factor=2.5,
    ),
    "nemotron3-super": dict(
        vocab_size=131072, hidden_size=4096,
        layer_pattern="MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, intermediate_size=2688,
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, n_shared_experts=1, moe_latent_size=1024,
        routed_scaling_factor=5.0, num_mtp_layers=1,
    ),
})
