"""The training-memory formula (hybrid_rl.model.memory) and ``bench memory --train``.

The activation terms are held to what a real forward saves for its backward (``saved_tensors_hooks``,
storage counted once), per layer kind, for each way the forward runs; the totals to the measured peak of a
real step (slow tier)."""

import contextlib
import json
from dataclasses import replace

import pytest
import torch

from hybrid_rl.benchmarks.bench_memory import (
    check_train,
    main,
    measure_train,
    train_memory_markdown,
)
from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.model.memory import (
    TrainSetup,
    activation_bytes_per_token,
    devices_needed,
    largest_param,
    logprob_bytes,
    param_count,
    param_units,
    train_memory,
)

GB = 1e9


# ----------------------------------------------------------------------------- the formula's shape
@pytest.mark.parametrize("preset", HybridConfig.preset_names())
def test_param_count_equals_the_model(preset):
    cfg = HybridConfig.from_preset(preset)
    with torch.device("meta"):  # shapes only
        model = HybridLM(cfg, impl="reference")
    assert param_count(preset) == sum(p.numel() for p in model.parameters())
    assert largest_param(cfg) == max(p.numel() for p in model.parameters())


def test_published_sizes():
    assert round(param_count("nemotron3-nano") / 1e9, 1) == 31.6  # ~31.6B total
    assert 120e9 < param_count("nemotron3-super") < 125e9  # ~120.7B, plus the MTP block


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fsdp_divides_the_state_by_the_devices(dtype):
    one = train_memory("nemotron3-nano", TrainSetup(strategy="fsdp", devices=1, dtype=dtype))
    eight = train_memory("nemotron3-nano", TrainSetup(strategy="fsdp", devices=8, dtype=dtype))
    for term in ("weights", "grads", "optimizer"):
        assert eight[term] == pytest.approx(one[term] / 8, abs=16)
    assert one["optimizer"] == 2 * one["weights"] == 2 * 4 * one["params"]  # fp32 master weights, two fp32 moments
    assert eight["fsdp_gathered"] > 0 == one["fsdp_gathered"]
    ddp = train_memory("nemotron3-nano", TrainSetup(strategy="ddp", devices=8, dtype=dtype))
    assert ddp["weights"] == one["weights"] and ddp["ddp_buckets"] == ddp["grads"]


def test_the_kl_reference_is_a_full_fp32_copy_under_ddp_and_a_compute_dtype_shard_under_fsdp():
    """What ``Parallel.frozen_copy`` places (tests/distributed checks the shards of a real one): DDP a full fp32
    copy (or, offloaded, a transient full copy during its pass); FSDP 1/N in the compute dtype, plus one
    all-gathered unit during its pass; none: nothing. A Nano KL run needs more GPUs than one without."""
    nano = "nemotron3-nano"
    base = TrainSetup(strategy="fsdp", devices=8, dtype="bf16", checkpointing=True, logprob_chunk_tokens=1024)
    none, dev, host = (train_memory(nano, replace(base, reference=r)) for r in ("none", "device", "host"))
    params = none["params"]
    units = param_units(HybridConfig.from_preset(nano))
    layers, root = units[:-1], units[-1]  # (Nano has no MTP block)
    assert none["reference"] == none["reference_pass"] == 0
    assert dev["reference"] == 2 * -(-params // 8) and dev["reference_pass"] == 2 * (root + max(layers))
    assert host["reference"] == 0 and host["reference_pass"] == dev["reference_pass"]
    assert dev["total"] == none["total"] + dev["reference"]  # its pass is smaller than the step's activation phase
    fp32 = train_memory(nano, replace(base, dtype="fp32", reference="device"))
    assert fp32["reference"] == 4 * -(-params // 8)
    ddp = [train_memory("tiny", TrainSetup(strategy="ddp", devices=2, reference=r)) for r in ("device", "host")]
    assert ddp[0]["reference"] == 4 * params_of("tiny") and ddp[0]["reference_pass"] == 0
    assert ddp[1]["reference"] == 0 and ddp[1]["reference_pass"] == 4 * params_of("tiny")
    assert devices_needed(nano, replace(base, reference="device"), 80 * GB) > devices_needed(nano, base, 80 * GB)
    super_ = HybridConfig.from_preset("nemotron3-super")  # the reference leaves out the MTP block
    with_mtp = train_memory(super_, replace(base, reference="device"))
    assert super_.num_mtp_layers and with_mtp["reference"] == 2 * -(-sum(param_units(super_)[:-1]) // 8)
    with pytest.raises(ValueError, match="'none', 'device', 'host'"):
        TrainSetup(reference="cpu")


def params_of(preset: str) -> int:
    return sum(p.numel() for p in HybridLM(HybridConfig.from_preset(preset), impl="reference").parameters())


@pytest.mark.parametrize("preset", ["tiny", "small", "nemotron3-super"])
def test_bf16_and_checkpointing_shrink_activations(preset):
    acts = {(dtype, ckpt): train_memory(preset, TrainSetup(dtype=dtype, checkpointing=ckpt, seq_len=4096))
            for dtype in ("fp32", "bf16") for ckpt in (False, True)}
    acts = {key: terms["activations"] for key, terms in acts.items()}
    assert acts["bf16", False] < acts["fp32", False] and acts["bf16", True] < acts["fp32", True]
    assert acts["fp32", True] < acts["fp32", False] / 2 and acts["bf16", True] < acts["bf16", False] / 2


def test_chunked_logprobs_do_not_grow_with_tokens_or_vocab():
    small_v, big_v = HybridConfig.from_preset("tiny"), HybridConfig.from_preset("tiny", vocab_size=131072)
    assert logprob_bytes(big_v, 8192) == 3 * 4 * 8192 * 131072  # three fp32 [T, V] at once
    assert logprob_bytes(big_v, 65536) == 8 * logprob_bytes(big_v, 8192)
    assert logprob_bytes(big_v, 65536, 1024) == logprob_bytes(big_v, 8192, 1024) == 3 * 4 * 1024 * 131072
    assert logprob_bytes(small_v, 65536, 1024) < logprob_bytes(small_v, 65536)


def test_gpu_count_is_the_smallest_that_fits():
    setup = TrainSetup(strategy="fsdp", dtype="bf16", seq_len=8192, checkpointing=True, logprob_chunk_tokens=1024)
    for preset in ("nemotron3-nano", "nemotron3-super"):
        n = devices_needed(preset, setup, 80 * GB, headroom=0.1)
        assert n is not None and n > 1
        totals = [train_memory(preset, replace(setup, devices=k))["total"] for k in (n - 1, n)]
        assert totals[0] > 72 * GB >= totals[1]
    assert devices_needed("nemotron3-super", TrainSetup(strategy="ddp"), 80 * GB) is None  # replicas never fit


def test_bad_input_says_what_is_valid():
    with pytest.raises(ValueError, match="nemotron3-nano"):
        train_memory("nano", TrainSetup())
    with pytest.raises(ValueError, match="'ddp', 'fsdp'"):
        TrainSetup(strategy="zero3")
    with pytest.raises(ValueError, match="devices must be at least 1"):
        TrainSetup(devices=0)
    with pytest.raises(ValueError, match="'fp32', 'bf16'"):
        TrainSetup(dtype="fp8")
    with pytest.raises(ValueError, match="CPU fp32 only"):
        TrainSetup(dtype="bf16", path="kernels")
    with pytest.raises(ValueError, match="logprob_chunk_tokens"):
        TrainSetup(logprob_chunk_tokens=0)


# ----------------------------------------------------------------------------- against what a forward saves
def saved_bytes_per_layer(model, ids, bf16: bool) -> dict[str, int]:
    """Bytes each layer (by index, plus "head") saves for the backward in a forward and a full-vocabulary
    log-softmax, parameters left out, each storage counted once, where it is first saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, where = {}, ["embed"]
    hooks = [block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
             for i, block in enumerate(model.backbone.layers)]
    hooks.append(model.backbone.norm_f.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head")))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (where[0], t.untyped_storage().nbytes())
        return t

    region = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), region:
        torch.log_softmax(model(ids).logits, -1)
    for h in hooks:
        h.remove()
    out: dict = {}
    for layer, nbytes in seen.values():
        out[layer] = out.get(layer, 0) + nbytes
    return out


# micro as it is (no latent, one group), and tiny's widths (LatentMoE, two groups) with each layer kind once
SAVED_CONFIGS = {"micro": {}, "tiny": {"layer_pattern": "M*E-"}}


@pytest.mark.parametrize("preset", list(SAVED_CONFIGS))
@pytest.mark.parametrize("impl,dtype", [("fast", "fp32"), ("torch", "fp32"), ("torch", "bf16")])
def test_activations_equal_the_saved_tensors(preset, impl, dtype):
    """Per token (the difference of two lengths: per-layer constants such as weight casts cancel), every
    layer kind, the final norm and lm_head, against the formula of the path the model runs."""
    torch.manual_seed(0)
    cfg = HybridConfig.from_preset(preset, **SAVED_CONFIGS[preset])
    model = HybridLM(cfg, impl=impl)
    path = "kernels" if model.impl == "fast" else "torch"
    q = cfg.chunk_size
    # two and three chunks: a sequence of one chunk keeps less (no chunk states: model/fast/train_ops.py's
    # one-chunk path), which the per-token formula, written for long sequences, does not count
    short, long = (saved_bytes_per_layer(model, torch.randint(0, cfg.vocab_size, (1, t)), dtype == "bf16")
                   for t in (2 * q, 3 * q))
    tokens = q
    for layer, kind in [*enumerate(cfg.layer_pattern), ("head", "head")]:
        measured = (long[layer] - short[layer]) / tokens
        want = activation_bytes_per_token(cfg, kind, dtype, path, seq_len=q)
        if kind == "head":
            want += 4 * cfg.vocab_size  # the log-softmax output (the formula's log-prob pass)
        assert measured == pytest.approx(want, rel=0.002), (layer, kind)


# ----------------------------------------------------------------------------- the benchmark
def test_train_cli_prints_tables_and_json(capsys, tmp_path):
    out_file = tmp_path / "memory_train.json"
    assert main(["--train", "--devices", "8", "--logprob-chunk", "1024", "--json-out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "80 GB GPUs needed" in out and "nemotron3-super" in out
    json_lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1
    doc = json.loads(json_lines[0])
    assert doc == json.loads(out_file.read_text())
    assert len(doc["plan"]) == len(HybridConfig.preset_names()) * 4 and all(r["devices"] for r in doc["answer"])
    md = train_memory_markdown(doc)
    assert md.startswith("## Memory: training per device") and "### How many 80 GB GPUs" in md
    assert md.count("| nemotron3-super |") == 5  # four plan rows and the answer


def test_train_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--train", "--devices", "0"])
    assert exit_.value.code == 2 and "devices must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--check"])  # --check belongs to --train
    assert exit_.value.code == 2 and "add --train" in capsys.readouterr().err


def test_markdown_renders_the_check():
    result = measure_train(TrainSetup(devices=8, checkpointing=False))
    result["check"] = [{"preset": "tiny", "batch": 4, "seq_len": 512, "micro_batches": 2, "checkpointing": True,
                        "formula_bytes": 110 * 2**20, "measured_bytes": 100 * 2**20,
                        "activations_bytes": 1, "rel_error": 0.1}]
    md = train_memory_markdown(result)
    assert "### The formula against measured peaks" in md and "+10.0%" in md and "Largest error: 10.0%" in md


@pytest.mark.slow
def test_slow_check_on_tiny_within_15_percent():
    rows = check_train([("tiny", 2, 256, 2)])
    assert [r["checkpointing"] for r in rows] == [False, True]
    for r in rows:
        assert abs(r["rel_error"]) < 0.15, r


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_rollout_cache_is_what_the_engine_allocates(dtype):
    # the pool's model is fp32 and the engine does not autocast, so its cache is fp32 whatever the trainer's dtype
    setup = TrainSetup(strategy="ddp", devices=1, dtype=dtype, batch=1, seq_len=64, rollout_batch=3, rollout_context=40)
    model = HybridLM(HybridConfig.from_preset("micro"))
    cache = model.new_cache(3, capacity=40)
    allocated = sum(t.numel() * t.element_size() for t in [*cache.conv.values(), *cache.ssm.values(), *cache.k.values(),
                                                           *cache.v.values(), cache.last_hidden])
    assert train_memory("micro", setup)["rollout_cache"] == pytest.approx(allocated, rel=0.05)
