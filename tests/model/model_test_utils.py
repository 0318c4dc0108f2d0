"""Shared helpers for the model tests: small random configs, non-trivial weights, a transformers twin."""

import torch

from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.model.hybrid import hf_state_dict


def small_config(**overrides) -> HybridConfig:
    """Every layer kind, chunk 16 so short sequences span several chunks."""
    base = dict(vocab_size=97, hidden_size=64, layer_pattern="M*E-ME", num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                n_groups=2, chunk_size=16, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=48, moe_latent_size=None, routed_scaling_factor=2.5)
    return HybridConfig(**{**base, **overrides})


@torch.no_grad()
def randomize(model: HybridLM, seed: int = 0) -> HybridLM:
    """Non-trivial weights everywhere (so that a wrong A, dt, D, norm or bias cannot pass unnoticed).

    dt_bias is drawn so that some heads fall under the 1e-3 dt clamp."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(r * 0.7)
        elif name.endswith("dt_bias"):
            p.copy_(r * 2.5 - 3.0)
        elif name.endswith(".D"):
            p.copy_(r)
        elif "norm" in name:
            p.copy_(1 + 0.3 * r)
        elif name.endswith("conv1d.bias"):
            p.copy_(0.2 * r)
        else:
            p.copy_(r * min(0.2, 1.5 / p.shape[-1] ** 0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def to_hf_config(cfg: HybridConfig):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, hybrid_override_pattern=cfg.layer_pattern,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, ssm_state_size=cfg.ssm_state_size,
        mamba_num_heads=cfg.mamba_num_heads, mamba_head_dim=cfg.mamba_head_dim, n_groups=cfg.n_groups,
        conv_kernel=cfg.conv_kernel, chunk_size=cfg.chunk_size, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_latent_size=cfg.moe_latent_size, n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
        layer_norm_epsilon=cfg.rms_norm_eps, time_step_min=cfg.time_step_min_clamp,
        # the dt clamp: transformers >= 5.25 clamps at time_step_limit[0] (mamba_ssm's dt_limit), as model/hf.py
        # reads it; time_step_min only sets the dt init (our exports write both equal)
        time_step_limit=(cfg.time_step_min_clamp, float("inf")),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def hf_twin(model: HybridLM):
    """transformers' NemotronHForCausalLM holding the same weights (copied by the name rename)."""
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM(to_hf_config(model.config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=True)
    assert not missing and not unexpected
    return hf


def twin(model: HybridLM, impl: str) -> HybridLM:
    """A model of implementation ``impl`` (HybridLM's ``impl=``) holding ``model``'s weights, in eval mode."""
    other = HybridLM(model.config, impl=impl).eval()
    other.load_state_dict(model.state_dict())
    return other
