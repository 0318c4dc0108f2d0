"""model/kernels: the fused CPU decode kernels against the PyTorch path they replace, and their build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_rl.model import HybridLM, fused, kernels
from model_test_utils import randomize, small_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels are not built")

CONFIGS = {
    "base": {},
    "latent": dict(moe_latent_size=24),
    "no_shared": dict(n_shared_experts=0),
    "odd_sizes": dict(ssm_state_size=6, mamba_head_dim=10, head_dim=12, moe_intermediate_size=20,
                      moe_shared_expert_intermediate_size=36, conv_kernel=3, n_groups=1),
    "no_clamp": dict(time_step_min_clamp=0.0, norm_topk_prob=False),
    "conv1_odd_hidden": dict(conv_kernel=1, hidden_size=40, moe_latent_size=13, num_attention_heads=2,
                             num_key_value_heads=1),
}


def decode_run(model, prompts, steps, seed=0):
    """Ragged prefill, then `steps` decode steps on fixed random tokens. Returns (logits list, routing list, cache)."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(prompts))
    logits, routed = model.extend(cache, prompts, record_routing=True)
    out, routes = [logits], [routed]
    for _ in range(steps):
        tok = torch.randint(0, model.config.vocab_size, (len(prompts),), generator=gen)
        logits, routed = model.decode_step(cache, tok, record_routing=True)
        out.append(logits)
        routes.append(routed)
    return out, routes, cache


def both_paths(model, monkeypatch, prompts, steps=6):
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HYBRID_RL_KERNELS", flag)
        for m in model.modules():
            if hasattr(m, "expert_load"):
                m.expert_load.zero_()
        logits, routes, cache = decode_run(model, prompts, steps)
        loads = [m.expert_load.clone() for m in model.modules() if hasattr(m, "expert_load")]
        runs[flag] = (logits, routes, cache, loads)
    return runs["0"], runs["1"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_decode_equals_pytorch_path(name, monkeypatch):
    model = randomize(HybridLM(small_config(**CONFIGS[name])).eval(), seed=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (9, 3, 14, 1)]  # ragged rows
    (ref_logits, ref_routes, ref_cache, ref_loads), (logits, routes, cache, loads) = both_paths(model, monkeypatch, prompts)
    for a, b in zip(ref_logits, logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    for a, b in zip(ref_routes, routes):  # same experts chosen (order within a token's k is free)
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    for a, b in zip(ref_loads, loads):  # the balancer counts the same tokens (padding excluded)
        assert torch.equal(a, b)
    assert torch.equal(cache.lengths, ref_cache.lengths)
    for store in ("conv", "ssm", "k", "v"):
        for layer, t in getattr(ref_cache, store).items():
            got = getattr(cache, store)[layer]
            if store in ("k", "v"):  # only the used positions of each row are defined
                for row, n in enumerate(ref_cache.lengths.tolist()):
                    torch.testing.assert_close(got[row, :, :n], t[row, :, :n], atol=1e-4, rtol=0)
            else:
                torch.testing.assert_close(got, t, atol=1e-4, rtol=0)


def test_fused_decode_equals_full_forward():
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=4)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    cache = model.new_cache(3)
    torch.testing.assert_close(model.extend(cache, ids[:, :7]), ref[:, 6], atol=1e-4, rtol=0)
    for t in range(7, 20):
        torch.testing.assert_close(model.decode_step(cache, ids[:, t]), ref[:, t], atol=1e-4, rtol=0)


def test_fused_path_sees_weight_updates(monkeypatch):
    """The derived weight copies (concatenated projections, packed experts) follow optimizer steps."""
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=5)
    prompts = [torch.arange(5), torch.arange(3)]
    decode_run(model, prompts, 2)  # builds the derived copies
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.arange(12)[None]).logits.square().mean().backward()
    opt.step()
    (ref, _, _, _), (got, _, _, _) = both_paths(model, monkeypatch, prompts, steps=3)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_packed_expert_panels_hold_the_transposed_weights():
    model = randomize(HybridLM(small_config(moe_intermediate_size=20)), seed=6)
    experts = next(m for m in model.modules() if hasattr(m, "packed"))
    up_p, down_p = experts.packed()
    up_t, down_t = experts.transposed()
    for packed, plain in ((up_p, up_t), (down_p, down_t)):
        e, panels, k, width = packed.shape
        assert width == 16 and panels == -(-plain.shape[2] // 16)
        unpacked = packed.permute(0, 2, 1, 3).reshape(e, k, panels * 16)
        assert torch.equal(unpacked[..., :plain.shape[2]], plain)
        assert unpacked[..., plain.shape[2]:].abs().max() == 0 if panels * 16 > plain.shape[2] else True


def test_kernels_stay_off_under_autograd_and_other_dtypes():
    x = torch.zeros(2, 3)
    with torch.no_grad():
        assert kernels.usable(x)
        assert not kernels.usable(x.double()) and not kernels.usable(x.t())
    assert not kernels.usable(x)  # grad mode: the PyTorch path (the kernels have no backward)


def _python(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_kernels_build_into_the_cache_dir_and_a_missing_compiler_falls_back(tmp_path):
    code = ("import torch, warnings; from hybrid_rl.model import kernels, HybridLM, HybridConfig\n"
            "m = HybridLM(HybridConfig.from_preset('micro')).eval()\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); out = m.generate(torch.tensor([[1, 2, 3]]), 4)\n"
            "print('LIB', kernels.library() is not None, 'TOKENS', out.shape[1], 'WARN', ' | '.join(str(x.message) for x in w))\n")
    built = _python(code, {"HYBRID_RL_KERNEL_DIR": str(tmp_path / "k")})
    assert built.returncode == 0, built.stderr
    assert "LIB True TOKENS 4" in built.stdout
    assert len(list((tmp_path / "k").glob("decode-*.so"))) == 1
    missing = _python(code, {"HYBRID_RL_KERNEL_DIR": str(tmp_path / "k2"), "CC": str(tmp_path / "no-such-cc")})
    assert missing.returncode == 0, missing.stderr
    assert "LIB False TOKENS 4" in missing.stdout
    assert "kernels unavailable, using the PyTorch path" in missing.stdout and "no-such-cc" in missing.stdout


def test_decode_step_runs_the_layer_program_and_without_kernels_the_pytorch_path(monkeypatch):
    model = randomize(HybridLM(small_config()).eval(), seed=7)
    prompts = [torch.arange(6), torch.arange(2)]
    with_program, _, _ = decode_run(model, prompts, 3)
    assert isinstance(model.__dict__.get("_program"), fused.DecodeProgram)
    plain = randomize(HybridLM(small_config()).eval(), seed=7)
    monkeypatch.setenv("HYBRID_RL_KERNELS", "0")
    without, _, _ = decode_run(plain, prompts, 3)
    assert "_program" not in plain.__dict__
    for a, b in zip(with_program, without):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- robustness of the fused path
def _fresh_twin(model):
    twin = HybridLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _assert_same_decode(model, reference, prompts, steps=3):
    for a, b in zip(decode_run(reference, prompts, steps)[0], decode_run(model, prompts, steps)[0]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_fused_decode_batch_one_across_cache_growth(monkeypatch):
    """Capacity 1 grows several times during decoding (the KV buffers move; the program follows)."""
    model = randomize(HybridLM(small_config()).eval(), seed=8)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("HYBRID_RL_KERNELS", flag)
        cache = model.new_cache(1, capacity=1)
        out = [model.extend(cache, [torch.arange(3)])]
        for t in range(12):
            out.append(model.decode_step(cache, torch.tensor([t % 97])))
        runs[flag] = out
        assert cache.capacity >= 15
    for a, b in zip(runs["0"], runs["1"]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_fused_path_follows_fused_adamw_assign_loads_and_config_changes():
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=9)
    prompts = [torch.arange(5), torch.arange(2)]
    decode_run(model, prompts, 2)  # builds the program and the derived weights
    # AdamW(fused=True) on a CPU updates parameters without bumping their version counters
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.arange(12)[None]).logits.square().mean().backward()
    opt.step()
    _assert_same_decode(model, _fresh_twin(model), prompts)
    # parameters replaced by new tensors
    other = randomize(HybridLM(model.config), seed=10).state_dict()
    model.load_state_dict(other, assign=True)
    _assert_same_decode(model, _fresh_twin(model), prompts)
    # a config value read by the kernels
    model.config.routed_scaling_factor = 0.5
    twin = HybridLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = twin(torch.arange(6)[None]).logits[0, -1]
    cache = model.new_cache(1)
    model.extend(cache, [torch.arange(5)])
    torch.testing.assert_close(model.decode_step(cache, torch.tensor([5]))[0], ref, atol=1e-4, rtol=0)
    # .data edits bump no version: invalidate() is the documented way
    with torch.no_grad():
        model.backbone.norm_f.weight.data.mul_(2.0)
    kernels.invalidate(model)
    _assert_same_decode(model, _fresh_twin(model), prompts)


def test_router_kernel_handles_inf_bias_and_many_experts():
    lib = kernels.library()
    for e, k in ((6, 3), (5000, 4)):
        gen = torch.Generator().manual_seed(e)
        logits = torch.randn(4, e, generator=gen)
        bias = torch.full((e,), float("-inf"))
        bias[[0, e - 1]] = 0.0  # two selectable experts; the rest masked with -inf
        bias[e - 1] = 10.0
        idx, w = torch.empty(4, k, dtype=torch.long), torch.empty(4, k)
        load = torch.zeros(e)
        lib.moe_route(kernels.ptr(logits), kernels.ptr(bias), kernels.ptr(idx), kernels.ptr(w), kernels.ptr(load),
                      4, e, k, 1, e, 2.0)
        assert (idx[:, 0] == e - 1).all() and (idx[:, 1] == 0).all()  # beyond any fixed table size
        assert all(len(set(row)) == k for row in idx.tolist())  # no expert chosen twice
        assert load.sum() == 4 * k and load[e - 1] == 4
        scores = torch.sigmoid(logits).gather(1, idx)
        torch.testing.assert_close(w, 2.0 * scores / scores.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_fused_decode_under_a_low_precision_default_dtype_and_inference_mode():
    with torch.inference_mode():
        model = randomize(HybridLM(small_config()).eval(), seed=11)
        prompts = [torch.arange(4), torch.arange(7)]
        ref = decode_run(model, prompts, 2)[0]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # workspaces must still be fp32
    try:
        with torch.inference_mode():  # inference tensors keep no version counter
            got = decode_run(model, prompts, 2)[0]
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_two_threads_decoding_one_model_agree_with_one_thread():
    import threading

    model = randomize(HybridLM(small_config()).eval(), seed=12)
    jobs = {"a": [torch.arange(3)], "b": [torch.arange(9), torch.arange(2), torch.arange(5)]}
    expected = {name: decode_run(model, prompts, 8, seed=1)[0] for name, prompts in jobs.items()}
    results, errors = {}, []

    def work(name):
        try:
            for _ in range(3):
                results[name] = decode_run(model, jobs[name], 8, seed=1)[0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in jobs:
        for a, b in zip(expected[name], results[name]):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
