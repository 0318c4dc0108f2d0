"""HF NemotronH interop: our save -> transformers load, transformers save -> our load, configs, bad inputs."""

import json
import math
import os
import re

import pytest
import torch

from hybrid_rl.model.config import HybridConfig
from hybrid_rl.model.hf import (
    CheckpointError, from_disk_state_dict, hf_config_to_hybrid, hybrid_to_hf_config, load_pretrained, parse_size,
    save_pretrained, to_disk_state_dict, transformers_config,
)

transformers = pytest.importorskip("transformers")

# every layer kind, LatentMoE, 2 B/C groups, MTP block (transformers ignores mtp.*)
SMALL = dict(
    vocab_size=272, hidden_size=64, layer_pattern="ME*-M*E", num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=96, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
    chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, moe_latent_size=24, routed_scaling_factor=2.5,
)


def small_cfg(**overrides) -> HybridConfig:
    return HybridConfig(**{**SMALL, **overrides})


def make_model(cfg: HybridConfig, seed: int = 0):
    from hybrid_rl.model import HybridLM

    torch.manual_seed(seed)
    model = HybridLM(cfg)
    with torch.no_grad():  # non-trivial values everywhere, including the router bias and norms
        for name, t in model.state_dict().items():
            if name.endswith(("norm.weight", "norm_f.weight", "e_score_correction_bias")) or "layernorm" in name:
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


def ids(cfg, b=2, t=19, seed=1):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def our_logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("preset", HybridConfig.preset_names())
def test_config_roundtrip_and_matches_transformers(preset, tmp_path):
    cfg = HybridConfig.from_preset(preset)
    ours = hybrid_to_hf_config(cfg)
    assert hf_config_to_hybrid(json.loads(json.dumps(ours))) == cfg
    (tmp_path / "config.json").write_text(json.dumps(ours))
    theirs_dir = tmp_path / "theirs"
    transformers.AutoConfig.from_pretrained(tmp_path).save_pretrained(theirs_dir)
    theirs = json.loads((theirs_dir / "config.json").read_text())
    assert json.loads(json.dumps(ours)) == theirs  # byte-for-byte the keys and values transformers writes


def test_config_legacy_spellings():
    cfg = small_cfg(time_step_min_clamp=2e-3)
    legacy = {k: v for k, v in hybrid_to_hf_config(cfg).items()
              if k not in ("layers_block_type", "mtp_layers_block_type", "n_groups", "conv_kernel", "chunk_size",
                           "layer_norm_epsilon", "time_step_min")}
    legacy.update(hybrid_override_pattern=cfg.layer_pattern, mtp_hybrid_override_pattern="*E",
                  mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=8, layer_norm_epsilon=1e-5, mamba_dt_min=0.5,
                  num_hidden_layers=len(cfg.layer_pattern), rope_theta=10000, torch_dtype="bfloat16")
    assert hf_config_to_hybrid(legacy) == cfg.replace(preset="")
    names = dict(legacy, hybrid_override_pattern=None)
    names.pop("hybrid_override_pattern")
    names["layers_block_type"] = ["mamba", "moe", "attention", "mlp", "mamba", "attention", "moe"]
    assert hf_config_to_hybrid(names).layer_pattern == cfg.layer_pattern


def test_config_fields_mapped():
    cfg = small_cfg(num_mtp_layers=1, mtp_layer_pattern="*E", time_step_min_clamp=5e-3, rms_norm_eps=1e-6)
    hf = hybrid_to_hf_config(cfg)
    assert hf["model_type"] == "nemotron_h" and hf["architectures"] == ["NemotronHForCausalLM"]
    assert hf["layers_block_type"][:3] == ["linear_attention", "moe", "full_attention"]
    assert hf["num_nextn_predict_layers"] == 1 and hf["mtp_layers_block_type"] == ["full_attention", "moe"]
    assert hf["layer_norm_epsilon"] == 1e-6 and hf["time_step_min"] == hf["time_step_limit"][0] == 5e-3
    assert hf_config_to_hybrid(hf) == cfg
    no_clamp = small_cfg(time_step_min_clamp=0.0)
    hf = hybrid_to_hf_config(no_clamp)
    assert hf["time_step_min"] == 0.001 and hf["hybrid_rl_time_step_min_clamp"] == 0.0  # transformers needs min > 0
    assert hf_config_to_hybrid(hf) == no_clamp
    # without our key the pair says the same: time_step_limit [0, inf] is no clamp (time_step_min only sets the init)
    assert hf_config_to_hybrid({k: v for k, v in hf.items() if not k.startswith("hybrid_rl")}) == no_clamp


def test_dt_clamp_is_time_step_limit():
    """The clamp is time_step_limit[0] (mamba_ssm's dt_limit, transformers >= 5.25), whatever time_step_min says."""
    hf = {k: v for k, v in hybrid_to_hf_config(small_cfg()).items() if not k.startswith("time_step")}
    assert hf_config_to_hybrid(hf).time_step_min_clamp == 0.0  # absent: transformers' default [0, inf]
    real = {**hf, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
            "time_step_limit": [0.0, {"__float__": "Infinity"}]}  # what a Nemotron-H checkpoint's config says
    assert hf_config_to_hybrid(real).time_step_min_clamp == 0.0
    assert hf_config_to_hybrid(json.loads(json.dumps({**real, "time_step_limit": [0.01, math.inf]}))).time_step_min_clamp == 0.01
    legacy = {k: v for k, v in real.items() if k != "time_step_limit"}
    assert hf_config_to_hybrid({**legacy, "mamba_dt_limit": [0.01, math.inf]}).time_step_min_clamp == 0.01
    with pytest.raises(CheckpointError, match="mamba_dt_limit upper bound 0.1"):
        hf_config_to_hybrid({**legacy, "mamba_dt_limit": [0.0, 0.1]})


def test_live_transformers_config_keeps_the_clamp():
    """``transformers_config`` (the benchmarks' twin) carries the clamp where transformers >= 5.25 reads it."""
    for clamp in (1e-3, 0.0):
        live = transformers_config(small_cfg(time_step_min_clamp=clamp))
        assert tuple(live.time_step_limit) == (clamp, math.inf)
        assert hf_config_to_hybrid(json.loads(live.to_json_string())).time_step_min_clamp == clamp


@pytest.mark.parametrize("limit, match", [
    ("0.001", "must be a pair"),
    ([0.001], "must be a pair"),
    ([-0.1, math.inf], "lower bound -0.1 must be a number >= 0"),
    (["0.001", math.inf], "lower bound '0.001' must be a number"),
    ([0.0, 0.1], "upper bound 0.1 is not supported"),
    ([0.0, {"__float__": "nan"}], "upper bound nan is not supported"),
])
def test_dt_clamp_errors(limit, match):
    with pytest.raises(CheckpointError, match=match):
        hf_config_to_hybrid({**hybrid_to_hf_config(small_cfg()), "time_step_limit": limit})


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"layers_block_type": ["linear_attention", "conv"]}, "unknown layer type 'conv'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_hidden_act": "silu"}, "squared ReLU"),
    ({"num_attention_heads": 5}, "multiple of num_key_value_heads"),
])
def test_config_errors(change, match):
    hf = {**hybrid_to_hf_config(small_cfg()), **change}
    with pytest.raises(CheckpointError, match=match):
        hf_config_to_hybrid(hf)
    hf = hybrid_to_hf_config(small_cfg())
    del hf["layers_block_type"]
    with pytest.raises(CheckpointError, match="hybrid_override_pattern"):
        hf_config_to_hybrid(hf)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(100) == 100
    assert parse_size("20KB") == 20_000
    with pytest.raises(ValueError, match="2GB"):
        parse_size("big")


def test_expert_layout_roundtrip():
    up = torch.randn(3, 5, 4)
    state = {"backbone.layers.1.mixer.experts.up_proj": up, "lm_head.weight": torch.randn(2, 2)}
    disk = to_disk_state_dict(state)
    assert sorted(disk) == ["backbone.layers.1.mixer.experts.0.up_proj.weight",
                            "backbone.layers.1.mixer.experts.1.up_proj.weight",
                            "backbone.layers.1.mixer.experts.2.up_proj.weight", "lm_head.weight"]
    back = from_disk_state_dict(disk)
    assert torch.equal(back["backbone.layers.1.mixer.experts.up_proj"], up)
    renamed = from_disk_state_dict({k.replace("backbone.", "model."): v for k, v in disk.items()})
    assert sorted(renamed) == sorted(back)  # a file written from transformers' in-memory names reads the same
    del disk["backbone.layers.1.mixer.experts.1.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"experts\.1\.up_proj\.weight is missing"):
        from_disk_state_dict(disk)


# ---------------------------------------------------------------------- weights, both directions


@pytest.mark.parametrize("tied", [False, True])
def test_our_save_loads_in_transformers(tmp_path, tied):
    """Tied embeddings too: transformers' NemotronH does not tie the head back, so the save writes it."""
    cfg = small_cfg(num_mtp_layers=1, tie_word_embeddings=tied)
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "ckpt")
    files = sorted(os.listdir(tmp_path / "ckpt"))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left behind
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    x = ids(cfg)
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), atol=1e-4, rtol=0)
    # and back: our load of our save gives the same weights, MTP block included
    again = load_pretrained(tmp_path / "ckpt")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_save_loads_here(tmp_path, shard):
    cfg = small_cfg()
    hf_cfg = transformers_config(cfg)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if name.endswith("e_score_correction_bias") or "norm" in name:
                t.add_(0.1 * torch.randn_like(t))
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    model = load_pretrained(tmp_path)
    x = ids(cfg)
    torch.testing.assert_close(our_logits(model, x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_transformers_dt_limit_is_the_clamp_that_loads(tmp_path):
    """A checkpoint whose config says what Nemotron-H's does (time_step_min 0.001, time_step_limit [0, inf]) runs
    without a dt clamp in transformers, and loads here as the same model: with dt_bias pushed down so that most
    dt fall below 0.001 (and in_proj scaled up so that the scan's input term shows), a clamp at time_step_min
    would change the logits."""
    cfg = small_cfg(time_step_min_clamp=0.001)
    hf_cfg = transformers_config(cfg)
    hf_cfg.time_step_min, hf_cfg.time_step_limit = 0.001, (0.0, math.inf)
    torch.manual_seed(4)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for name, t in hf.state_dict().items():
            if name.endswith("dt_bias"):
                t.fill_(-9.0)  # softplus(-9 + x): ~1e-4, below the 0.001 of time_step_min
            if name.endswith("in_proj.weight"):
                t.mul_(30.0)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.time_step_min_clamp == 0.0
    x = ids(cfg)
    torch.testing.assert_close(our_logits(model, x), hf_logits(hf, x), atol=1e-5, rtol=0)
    clamped = type(model)(model.config.replace(time_step_min_clamp=0.001)).eval()
    clamped.load_state_dict(model.state_dict())
    assert (our_logits(clamped, x) - hf_logits(hf, x)).abs().max() > 1e-4  # the old reading: another model (7e-4)


def test_sharded_save_and_dtype(tmp_path):
    cfg = small_cfg()
    model = make_model(cfg)
    save_pretrained(model, tmp_path / "bf16", max_shard_bytes="30KB", dtype=torch.bfloat16)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "backbone.layers.1.mixer.experts.3.down_proj.weight" in index["weight_map"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path / "bf16")
    assert loaded.backbone.embeddings.weight.dtype == torch.bfloat16
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t.float(), ref[name].to(t.dtype).float(), atol=0, rtol=0)
    as_fp32 = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert as_fp32.lm_head.weight.dtype == torch.float32


def test_tokenizer_saved_beside(tmp_path):
    from hybrid_rl.model.tokenizer import ByteTokenizer, load_tokenizer

    save_pretrained(make_model(small_cfg()), tmp_path, tokenizer=ByteTokenizer())
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [7, 2]  # stop at end of turn, and at <eos>


def test_save_is_atomic_and_replaces_whole(tmp_path, monkeypatch):
    model = make_model(small_cfg())
    target = tmp_path / "ckpt"
    save_pretrained(model, target, max_shard_bytes="30KB")
    assert (target / "model.safetensors.index.json").exists()
    import hybrid_rl.model.hf as hf_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_mod, "_write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, target)
    assert (target / "model.safetensors.index.json").exists()  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # and no temp dir remains
    monkeypatch.undo()
    save_pretrained(model, target)  # single file now: the old shards are gone, not mixed in
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(model, target, overwrite=False)


# ---------------------------------------------------------------------- bad inputs


@pytest.fixture
def saved(tmp_path):
    save_pretrained(make_model(small_cfg()), tmp_path / "ok")
    return tmp_path / "ok"


def _rewrite(directory, edit):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_named(saved):
    _rewrite(saved, lambda t: t.pop("backbone.layers.2.mixer.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\), first backbone\.layers\.2\.mixer\.q_proj\.weight"):
        load_pretrained(saved)


def test_extra_tensor_named(saved):
    _rewrite(saved, lambda t: t.update({"backbone.layers.0.mixer.bogus": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\), first backbone\.layers\.0\.mixer\.bogus"):
        load_pretrained(saved)


def test_misshaped_tensor_named(saved):
    _rewrite(saved, lambda t: t.update({"backbone.norm_f.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"backbone\.norm_f\.weight has shape \[65\], expected \[64\]"):
        load_pretrained(saved)


def test_a_truncated_weights_file_is_named(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        load_pretrained(saved)


def test_a_malformed_shard_index_is_named(saved):
    (saved / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(CheckpointError, match="is not a safetensors index.*'weight_map'"):
        load_pretrained(saved)
    (saved / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a safetensors index"):
        load_pretrained(saved)


def test_config_does_not_match_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = 32
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json belongs to these weights"):
        load_pretrained(saved)


def test_directory_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="not a checkpoint directory"):
        load_pretrained(saved / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json.*--init"):
        load_pretrained(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(saved)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "mamba2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'mamba2', expected 'nemotron_h'"):
        load_pretrained(saved)


# ---------------------------------------------------------------------- hybrid-rl convert


def test_convert_cli_init_convert_info(tmp_path, capsys):
    from hybrid_rl.cli import main

    fresh, resharded = tmp_path / "fresh", tmp_path / "bf16"
    assert main(["convert", "--init", "micro", str(fresh), "hidden_size=64", "--seed", "1"]) == 0
    assert json.loads((fresh / "config.json").read_text())["hidden_size"] == 64
    assert main(["convert", str(fresh), str(resharded), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    assert (resharded / "model.safetensors.index.json").exists() and (resharded / "tokenizer.json").exists()
    a, b = load_pretrained(fresh), load_pretrained(resharded)
    for name, t in b.state_dict().items():
        assert torch.equal(t, a.state_dict()[name].to(t.dtype)), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(resharded)
    tok = transformers.AutoTokenizer.from_pretrained(resharded)
    assert hf.dtype == torch.bfloat16 and len(tok) == 272
    assert main(["convert", "--info", str(resharded)]) == 0
    assert "MEM*E-" in capsys.readouterr().out


def test_convert_cli_errors(tmp_path, capsys):
    from hybrid_rl.cli import main

    assert main(["convert", "--init", "micro", str(tmp_path / "m")]) == 0
    assert main(["convert", "--init", "micro", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--init", "micro", str(tmp_path / "m"), "--overwrite"]) == 0
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m" / "config.json"), str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["convert", "--init", "micro", str(tmp_path / "y"), "hiden_size=3"]) == 2
    assert "hidden_size" in capsys.readouterr().err
    assert main(["convert", "--init", "micro", str(tmp_path / "z"), "vocab_size=100"]) != 0
    assert not (tmp_path / "z").exists() and not (tmp_path / "x").exists()


def test_a_save_without_a_shared_expert_warns_that_transformers_cannot_load_it_faithfully(tmp_path, caplog):
    """transformers' NemotronH always builds a shared expert: a checkpoint without one loads there with random weights."""
    with caplog.at_level("WARNING", logger="hybrid_rl.model"):
        save_pretrained(make_model(small_cfg()), tmp_path / "with")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="hybrid_rl.model"):
        save_pretrained(make_model(small_cfg(n_shared_experts=0)), tmp_path / "without")
    assert any("n_shared_experts=0" in r.getMessage() and "transformers" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key, value, message", [
    ("norm_topk_prob", "false", "norm_topk_prob='false' (str) must be a JSON true or false"),  # loaded as True before
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon='1e-5' (str) must be a JSON number"),
    ("hidden_size", 128.0, "hidden_size=128.0 (float) must be a JSON integer"),
])
def test_config_values_of_the_wrong_type_are_named(key, value, message):
    hf = hybrid_to_hf_config(small_cfg())
    hf[key] = value
    with pytest.raises(CheckpointError, match=re.escape(message)):
        hf_config_to_hybrid(hf)


def test_keys_a_config_leaves_out_mean_what_they_mean_to_transformers():
    """A config.json without num_experts_per_tok / moe_latent_size loads as transformers would read it (its defaults:
    2 experts per token, no latent), not with this project's laptop-sized defaults."""
    hf = hybrid_to_hf_config(small_cfg())
    for key in ("num_experts_per_tok", "moe_latent_size", "eos_token_id"):
        hf.pop(key)
    cfg = hf_config_to_hybrid(hf)
    reference = transformers.NemotronHConfig()
    assert cfg.num_experts_per_tok == reference.num_experts_per_tok and cfg.moe_latent_size == reference.moe_latent_size
    assert hf_config_to_hybrid({**hybrid_to_hf_config(small_cfg()), "eos_token_id": []}).eos_token_id == HybridConfig().eos_token_id


# ---------------------------------------------------------------------- what transformers writes, as it writes it


def test_a_tied_config_with_a_head_of_its_own_loads_untied_as_in_transformers(tmp_path, caplog):
    """transformers' NemotronH never ties: its checkpoint of a tie_word_embeddings=true config holds its own
    lm_head.weight. That head was replaced by the embeddings here (other logits than transformers')."""
    cfg = small_cfg()
    hf_cfg = transformers_config(cfg)
    hf_cfg.tie_word_embeddings = True
    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    assert not torch.equal(hf.lm_head.weight, hf.get_input_embeddings().weight)
    hf.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="hybrid_rl.model"):
        model = load_pretrained(tmp_path)
    assert "loaded untied" in caplog.text and not model.config.tie_word_embeddings
    x = ids(cfg)
    torch.testing.assert_close(our_logits(model, x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_an_fp32_router_beside_bf16_weights_stays_fp32(tmp_path):
    """transformers keeps the router (mixer.gate.weight) in fp32 in its bf16 checkpoints; loading with the
    checkpoint's dtype rounded it to bf16, which the trainers' .float() cannot undo."""
    from safetensors.torch import load_file, save_file

    cfg = small_cfg()
    model = make_model(cfg)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    disk = load_file(tmp_path / "model.safetensors")
    routers = {k: v for k, v in to_disk_state_dict(model.state_dict()).items() if k.endswith("mixer.gate.weight")}
    assert routers
    save_file({**disk, **{k: v.float().contiguous() for k, v in routers.items()}}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = load_pretrained(tmp_path)
    assert loaded.backbone.embeddings.weight.dtype == torch.bfloat16
    ours = dict(loaded.named_parameters())
    for name, t in model.state_dict().items():
        if name.endswith("mixer.gate.weight"):
            assert ours[name].dtype == torch.float32 and torch.equal(ours[name], t)
    x = ids(cfg)
    assert torch.isfinite(our_logits(loaded, x)).all()


def test_mtp_layers_in_the_config_without_their_weights_load_without_the_block(tmp_path, caplog):
    """transformers drops the mtp.* weights when it loads and saves without them, but keeps
    num_nextn_predict_layers in config.json: such a checkpoint was refused ("missing 16 tensor(s)")."""
    from safetensors.torch import load_file, save_file

    cfg = small_cfg(num_mtp_layers=1, mtp_layer_pattern="*E")
    model = make_model(cfg)
    save_pretrained(model, tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in disk.items() if not k.startswith("mtp.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="hybrid_rl.model"):
        loaded = load_pretrained(tmp_path)
    assert "without the MTP block" in caplog.text and loaded.config.num_mtp_layers == 0
    x = ids(cfg)
    torch.testing.assert_close(our_logits(loaded, x), our_logits(model, x), atol=1e-5, rtol=0)


def test_config_fields_transformers_reads_its_own_way(tmp_path, caplog):
    """num_key_value_heads null (as many as the query heads), the legacy mamba_conv_bias spelling (refused when
    false, like use_conv_bias), and n_shared_experts 0 beside shared-expert weights (transformers builds the
    shared expert whatever the field says) load as transformers reads them."""
    hf = {**hybrid_to_hf_config(small_cfg(num_key_value_heads=4)), "num_key_value_heads": None}
    assert hf_config_to_hybrid(hf).num_key_value_heads == 4
    with pytest.raises(CheckpointError, match="mamba_conv_bias=False is not supported"):
        hf_config_to_hybrid({**hybrid_to_hf_config(small_cfg()), "mamba_conv_bias": False})
    cfg = small_cfg()
    model = make_model(cfg)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_shared_experts": 0}))
    with caplog.at_level("WARNING", logger="hybrid_rl.model"):
        loaded = load_pretrained(tmp_path)
    assert "n_shared_experts=0" in caplog.text and loaded.config.n_shared_experts == 1
    x = ids(cfg)
    torch.testing.assert_close(our_logits(loaded, x), our_logits(model, x), atol=0, rtol=0)
