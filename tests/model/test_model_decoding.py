"""Cached decoding, packed rows, routing record/replay, balancing, MTP, cache sizes."""

import pytest
import torch

from hybrid_rl.model import HybridCache, HybridConfig, HybridLM, cache_bytes

ATOL = 1e-4


def ids_of(model, b, t, seed=0):
    return torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def test_step_by_step_decoding_equals_full_forward(make_model):
    model = make_model(seed=1)
    ids = ids_of(model, 2, 21)
    with torch.no_grad():
        ref = model(ids).logits
    cache = model.new_cache(2)
    model.extend(cache, ids[:, :1])
    for t in range(1, 21):
        logits = model.decode_step(cache, ids[:, t])
        torch.testing.assert_close(logits, ref[:, t], atol=ATOL, rtol=0)


def test_packed_rows_equal_separate_documents(make_model):
    model = make_model(seed=2)
    a, b, c = ids_of(model, 1, 11, 1), ids_of(model, 1, 20, 2), ids_of(model, 1, 6, 3)
    packed = torch.cat([a, b, c], 1)
    doc_ids = torch.tensor([[5] * 11 + [9] * 20 + [5] * 6])  # a reused id still starts a new document
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids).logits
        sep = torch.cat([model(a).logits, model(b).logits, model(c).logits], 1)
    torch.testing.assert_close(out, sep, atol=ATOL, rtol=0)


def test_packed_rows_gradients_equal_separate_documents(make_model):
    model = make_model(seed=3).train()
    a, b = ids_of(model, 1, 9, 1), ids_of(model, 1, 14, 2)
    doc_ids = torch.tensor([[0] * 9 + [1] * 14])
    loss = model(torch.cat([a, b], 1), doc_ids=doc_ids).logits.logsumexp(-1).sum()
    g_packed = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    loss = model(a).logits.logsumexp(-1).sum() + model(b).logits.logsumexp(-1).sum()
    g_sep = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for gp, gs in zip(g_packed, g_sep):
        if gp is not None:
            torch.testing.assert_close(gp, gs, atol=1e-4, rtol=1e-3)


def test_fork_and_extend_equal_fresh_prefill(make_model):
    model = make_model(seed=4)
    prompt, turn = ids_of(model, 1, 13, 1)[0], ids_of(model, 3, 7, 2)
    cache = model.new_cache(1)
    model.extend(cache, [prompt])
    group = cache.fork(0, 3)
    logits = model.extend(group, list(turn))
    fresh = model.new_cache(3)
    ref = model.extend(fresh, [torch.cat([prompt, turn[i]]) for i in range(3)])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    nxt = torch.tensor([1, 2, 3])
    torch.testing.assert_close(model.decode_step(group, nxt), model.decode_step(fresh, nxt), atol=ATOL, rtol=0)
    assert cache.lengths.tolist() == [13]  # forks are copies


def test_rows_of_different_lengths_decode_like_each_alone(make_model):
    model = make_model(seed=5, layer_pattern="M*EM*-")
    prompts = [ids_of(model, 1, n, n)[0] for n in (3, 17, 9)]
    cache = model.new_cache(3)
    model.extend(cache, prompts)
    steps = ids_of(model, 3, 4, 9)
    batched = [model.decode_step(cache, steps[:, s]) for s in range(4)]
    for r, prompt in enumerate(prompts):
        alone = model.new_cache(1)
        model.extend(alone, [prompt])
        for s in range(4):
            torch.testing.assert_close(model.decode_step(alone, steps[r, s:s + 1])[0], batched[s][r], atol=ATOL, rtol=0)


def test_extend_with_different_counts_including_zero(make_model):
    model = make_model(seed=6)
    cache = model.new_cache(3)
    first = model.extend(cache, [ids_of(model, 1, 5, 1)[0], ids_of(model, 1, 8, 2)[0], []])
    second = model.extend(cache, [[], ids_of(model, 1, 3, 3)[0], ids_of(model, 1, 4, 4)[0]])
    torch.testing.assert_close(second[0], first[0])  # a row left alone keeps its logits
    assert cache.lengths.tolist() == [5, 11, 4]
    ref = model(torch.cat([ids_of(model, 1, 8, 2), ids_of(model, 1, 3, 3)], 1)).logits[0, -1]
    torch.testing.assert_close(second[1], ref, atol=ATOL, rtol=0)
    ref = model(ids_of(model, 1, 4, 4)).logits[0, -1]
    torch.testing.assert_close(second[2], ref, atol=ATOL, rtol=0)


def test_select_cat_and_sizes(make_model):
    model = make_model(seed=7)
    cache = model.new_cache(2)
    model.extend(cache, list(ids_of(model, 2, 70)))  # past the initial KV capacity
    both = HybridCache.cat([cache.select([1]), cache.select([0])])
    assert both.lengths.tolist() == [70, 70]
    torch.testing.assert_close(model.decode_step(both, torch.tensor([4, 4]))[0],
                               model.decode_step(cache, torch.tensor([4, 4]))[1], atol=ATOL, rtol=0)
    assert cache.nbytes() > 0 and cache.capacity >= 71
    with pytest.raises(IndexError, match="rows"):
        cache.select([5])


def test_cache_bytes_super_at_1m_tokens():
    gib = cache_bytes("nemotron3-super", 1_000_000, 1) / 2 ** 30
    assert 7.5 < gib < 7.9  # bf16 KV (~7.63 GiB) + fp32 SSM state (~0.16 GiB)
    assert HybridLM.cache_bytes(HybridConfig.from_preset("tiny"), 100, 2) == cache_bytes("tiny", 100, 2)


def test_routing_record_from_forward_extend_and_decode_agree(make_model):
    model = make_model(seed=8)
    ids = ids_of(model, 2, 12)
    out = model(ids, record_routing=True)
    n_moe, k = len(model.moe_layers), model.config.num_experts_per_tok
    assert out.routed_experts.shape == (2, 12, n_moe, k)
    cache = model.new_cache(2)
    _, routed = model.extend(cache, ids[:, :11], record_routing=True)
    _, step = model.decode_step(cache, ids[:, 11], record_routing=True)
    rec = torch.cat([routed, step[:, None]], 1)
    assert torch.equal(rec.sort(-1).values, out.routed_experts.sort(-1).values)


def test_routing_replay_reproduces_logits(make_model):
    model = make_model(seed=9)
    ids = ids_of(model, 2, 15)
    out = model(ids, record_routing=True)
    with torch.no_grad():  # perturb the router: free routing now differs, replay must not
        for i in model.moe_layers:
            model.backbone.layers[i].mixer.gate.e_score_correction_bias.add_(torch.randn(model.config.n_routed_experts))
    free = model(ids).logits
    replayed = model(ids, routing=out.routed_experts).logits
    torch.testing.assert_close(replayed, out.logits, atol=1e-5, rtol=0)
    assert (free - out.logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="routing must have shape"):
        model(ids, routing=out.routed_experts[:, :3])


def test_balance_update_moves_bias_toward_underused_experts(make_model):
    model = make_model(seed=10)
    model(ids_of(model, 4, 32))
    layer = model.backbone.layers[model.moe_layers[0]].mixer
    load = layer.expert_load.clone()
    before = layer.gate.e_score_correction_bias.clone()
    stats = model.moe_balance_update(0.01)
    delta = layer.gate.e_score_correction_bias - before
    assert torch.all(delta[load < load.mean()] > 0) and torch.all(delta[load > load.mean()] < 0)
    assert stats[f"moe/layer{model.moe_layers[0]}/tokens"] == 4 * 32 * model.config.num_experts_per_tok
    assert stats["moe/max_load_over_mean"] >= 1.0
    assert layer.expert_load.sum() == 0  # counts restart after an update


def test_mtp_block_loads_and_runs():
    cfg = HybridConfig.from_preset("micro", num_mtp_layers=1, moe_latent_size=64)
    model = HybridLM(cfg).eval()
    names = [n for n in model.state_dict() if n.startswith("mtp.")]
    assert "mtp.layers.0.eh_proj.weight" in names and "mtp.layers.1.final_layernorm.weight" in names
    assert any(n.startswith("mtp.layers.1.mixer.experts.") for n in names)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    logits = model.mtp_logits(ids)
    assert logits.shape == (2, 9, cfg.vocab_size) and torch.isfinite(logits).all()


def test_generate_greedy_equals_argmax_of_forward(make_model):
    model = make_model(seed=11)
    prompt = ids_of(model, 2, 6)
    new = model.generate(prompt, max_new_tokens=5)
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 6:])


def test_generate_refuses_empty_prompts_and_ids_outside_the_vocabulary(make_model):
    model = make_model()
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"prompt 1 is empty.*BOS id"):
        model.generate([[1, 2], []], max_new_tokens=2)
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"prompt 0 holds token id {bad}, outside the model's vocabulary \[0, {vocab}\)"):
            model.generate([[1, bad]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids are integers"):
        model.generate(torch.ones(1, 3), max_new_tokens=2)
    assert model.generate([[1, vocab - 1], [2]], max_new_tokens=2).shape == (2, 2)  # the edges are fine


def test_bad_inputs_have_clear_errors(make_model):
    with pytest.raises(ValueError, match="layer_pattern.*'X'"):
        HybridConfig.from_preset("micro", layer_pattern="MXE")
    with pytest.raises(ValueError, match="num_attention_heads"):
        HybridConfig.from_preset("micro", num_attention_heads=3)
    with pytest.raises(ValueError, match="mamba_num_heads"):
        HybridConfig.from_preset("micro", mamba_num_heads=3, n_groups=2)
    model = make_model()
    with pytest.raises(ValueError, match="rows"):
        model.decode_step(model.new_cache(2), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(ids_of(model, 1, 4), doc_ids=torch.zeros(1, 3, dtype=torch.long))


def test_bf16_autocast_keeps_ssm_state_fp32_and_stays_close(make_model):
    model = make_model(seed=12)
    ids = ids_of(model, 2, 20)
    ref = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).logits
        cache = model.new_cache(2, dtype=torch.bfloat16)
        model.extend(cache, ids[:, :19])
        step = model.decode_step(cache, ids[:, 19])
    assert low.dtype == torch.float32 and all(s.dtype == torch.float32 for s in cache.ssm.values())
    assert next(iter(cache.k.values())).dtype == torch.bfloat16
    scale = ref.abs().mean()  # mean, not max: bf16 may flip a near-tied expert choice for a token
    assert (low - ref).abs().mean() < 0.05 * scale and (step - ref[:, 19]).abs().mean() < 0.05 * scale


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="time_step_min_clamp"):
        HybridConfig.from_preset("micro", time_step_min_clamp=-1.0)
    with pytest.raises(ValueError, match="mtp_layer_pattern"):
        HybridConfig.from_preset("micro", num_mtp_layers=1, mtp_layer_pattern="")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        HybridConfig.from_preset("micro", num_experts_per_tok=9)
    # accepted before: a pad id past the vocabulary crashed generate once a row finished; eps <= 0 gave NaN logits
    with pytest.raises(ValueError, match=r"pad_token_id=600 is not a token id of the vocabulary \[0, 320\)"):
        HybridConfig.from_preset("micro", pad_token_id=600)
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive number"):
        HybridConfig.from_preset("micro", rms_norm_eps=-1.0)
    with pytest.raises(ValueError, match="moe_shared_expert_intermediate_size must be positive with a shared expert"):
        HybridConfig.from_preset("micro", moe_shared_expert_intermediate_size=0)


def test_a_bf16_cache_stays_bf16_through_an_fp32_extension():
    """The conv window an extension leaves keeps the cache's dtype (it became fp32 with an fp32 model, so the rows of
    one cache disagreed in dtype and a cat promoted them)."""
    from hybrid_rl.model import HybridConfig, HybridLM

    model = HybridLM(HybridConfig.from_preset("micro"), impl="torch").eval()
    cache = model.new_cache(2, dtype=torch.bfloat16)
    with torch.no_grad():
        model.extend(cache, [[5, 6, 7], [8, 9]])  # ragged rows
        model.extend(cache, torch.tensor([[5, 6], [8, 9]]))  # equal rows
    assert cache.conv and {x.dtype for x in cache.conv.values()} == {torch.bfloat16}
