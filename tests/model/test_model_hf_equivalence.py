"""Our logits equal transformers' NemotronHForCausalLM with the same weights (fp32, CPU)."""

import pytest
import torch

from model_test_utils import hf_twin

CONFIGS = {
    "all-kinds": {},
    "latent-moe": dict(moe_latent_size=24, layer_pattern="ME*M-E"),
    "one-group-mqa": dict(n_groups=1, num_key_value_heads=1, layer_pattern="MM*EE-", chunk_size=8),
    "unnormed-top3": dict(norm_topk_prob=False, layer_pattern="E*M", num_experts_per_tok=3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(make_model, name):
    model = make_model(seed=len(name), **CONFIGS[name])
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # (no cache: transformers 5.25's cache fails on a stack whose first layer keeps no state, "E*M")
        ours, ref = model(ids).logits, hf(ids, use_cache=False).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["all-kinds", "latent-moe"])
def test_cached_prefill_then_decode_matches_transformers_forward(make_model, name):
    model = make_model(seed=3, **CONFIGS[name])
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits  # [B,T,V]
    cache = model.new_cache(2)
    logits = model.extend(cache, ids[:, :19])
    assert (logits - ref[:, 18]).abs().max() <= 1e-4
    for t in range(19, 29):
        logits = model.decode_step(cache, ids[:, t])
        assert (logits - ref[:, t]).abs().max() <= 1e-4, f"decode step at position {t}"
    assert cache.lengths.tolist() == [29, 29]


def test_param_names_are_transformers_names_with_backbone(make_model):
    from transformers import NemotronHForCausalLM

    from model_test_utils import to_hf_config

    model = make_model(moe_latent_size=24)
    hf = NemotronHForCausalLM(to_hf_config(model.config))
    theirs = {k.replace("model.", "backbone.", 1): v.shape for k, v in hf.state_dict().items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == theirs
