"""model/fast: the CPU decode kernels, each on its own and as the whole-model decode program, against
the PyTorch path they replace (a "torch" twin) and the reference; the padded expert dispatch; the build."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from hybrid_rl.model import HybridLM
from hybrid_rl.model.fast import fused, kernels
from hybrid_rl.model.fast.layers import FastMamba2Mixer, FastMoE, dispatch_padded
from hybrid_rl.model.hybrid import _Ctx
from hybrid_rl.model.mamba import REFERENCE_OPS, Mamba2Mixer
from hybrid_rl.model.moe import dispatch_naive, route
from hybrid_rl.model.norms import rms_norm
from model_test_utils import randomize, small_config, twin

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


def both_paths(model, prompts, steps=6):
    """(the run of a "torch" twin of ``model``, the run of ``model``): (logits, routes, cache, expert loads)."""
    runs = []
    for m in (twin(model, "torch"), model):
        for layer in m.modules():
            if hasattr(layer, "expert_load"):
                layer.expert_load.zero_()
        logits, routes, cache = decode_run(m, prompts, steps)
        runs.append((logits, routes, cache, [layer.expert_load.clone() for layer in m.modules()
                                             if hasattr(layer, "expert_load")]))
    return runs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_decode_equals_pytorch_path(name):
    model = randomize(HybridLM(small_config(**CONFIGS[name])).eval(), seed=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (9, 3, 14, 1)]  # ragged rows
    (ref_logits, ref_routes, ref_cache, ref_loads), (logits, routes, cache, loads) = both_paths(model, prompts)
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


def test_fused_path_sees_weight_updates():
    """The derived weight copies (concatenated projections, packed experts) follow optimizer steps."""
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=5)
    prompts = [torch.arange(5), torch.arange(3)]
    decode_run(model, prompts, 2)  # builds the derived copies
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.arange(12)[None]).logits.square().mean().backward()
    opt.step()
    (ref, _, _, _), (got, _, _, _) = both_paths(model, prompts, steps=3)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_steady_weights_checks_the_weights_once_and_again_after_each_announced_change(monkeypatch):
    """Inside ``steady_weights`` the program reads the parameters at its first call, after ``weights_changed``
    and after an optimizer step, not at every call; what it computes equals a twin outside any scope."""
    model = randomize(HybridLM(small_config()).eval(), seed=3)
    reads = []
    signature = fused.DecodeProgram._weights_signature
    monkeypatch.setattr(fused.DecodeProgram, "_weights_signature", lambda self: reads.append(1) or signature(self))
    prompts = [torch.arange(5), torch.arange(3)]
    decode_run(model, prompts, 3)
    assert len(reads) == 4  # outside a scope: every call (one extension, three steps)
    reads.clear()
    with model.steady_weights():
        before, _, _ = decode_run(model, prompts, 3)
        assert len(reads) == 1
        with torch.no_grad():
            model.lm_head.weight.mul_(0.5)  # halves every logit exactly
        model.weights_changed()
        halved, _, _ = decode_run(model, prompts, 3)
        assert len(reads) == 2
        for a, b in zip(before, halved):
            torch.testing.assert_close(b, a * 0.5, atol=1e-6, rtol=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(torch.arange(12)[None]).logits.square().mean().backward()
        opt.step()
        stepped, _, _ = decode_run(model, prompts, 3)
        assert len(reads) == 3
        assert not torch.allclose(stepped[0], halved[0])
    reads.clear()
    decode_run(model, prompts, 1)
    assert len(reads) == 2  # the scope ended: every call again


def test_packed_expert_panels_hold_the_transposed_weights():
    model = randomize(HybridLM(small_config(moe_intermediate_size=20)), seed=6)
    moe = next(m for m in model.modules() if isinstance(m, FastMoE))
    up_p, down_p = moe.packed_experts()
    up_t, down_t = moe.transposed_experts()
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
    code = ("import torch, warnings; from hybrid_rl.model import HybridLM, HybridConfig\n"
            "from hybrid_rl.model.fast import kernels\n"
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
    monkeypatch.setenv("HYBRID_RL_KERNELS", "0")  # read when a model is built: a "fast" model runs as "torch"
    plain = randomize(HybridLM(small_config()).eval(), seed=7)
    assert plain.impl == "torch"
    without, _, _ = decode_run(plain, prompts, 3)
    assert "_program" not in plain.__dict__
    for a, b in zip(with_program, without):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_decode_program_table_follows_moved_cache_buffers_and_changed_weights():
    """Moved cache buffers only rewrite the cache's pointer slots; an in-place update of a buffer (the load
    counter) keeps the table; an updated parameter rebuilds it.  Every step equals a fresh program's."""
    model = randomize(HybridLM(small_config()).eval(), seed=8)
    cache = model.new_cache(3)
    model.extend(cache, [torch.arange(5), torch.arange(3), torch.arange(7)])
    tok = torch.tensor([3, 4, 5])

    def step(c, t):
        got = model.decode_step(c.select(range(c.batch_size)), t)  # a copy: the program sees new buffers
        model.__dict__.pop("_program")
        fresh = model.decode_step(c.select(range(c.batch_size)), t)
        assert torch.equal(got, fresh)
        return got

    first = step(cache, tok)
    swapped = step(cache.select([2, 0, 1]), tok[[2, 0, 1]])  # rows are independent: same logits, reordered
    assert torch.equal(swapped, first[[2, 0, 1]])
    model.decode_step(cache.select([0, 1, 2]), tok)
    program = model.__dict__["_program"]
    weights = program._weights_sig
    for layer in model.modules():
        if hasattr(layer, "expert_load"):
            layer.expert_load += 1  # read through its pointer: no rebuild
    model.decode_step(cache.select([0, 1, 2]), tok)
    assert program._weights_sig is weights
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    doubled = model.decode_step(cache.select([0, 1, 2]), tok)
    assert program._weights_sig is not weights
    torch.testing.assert_close(doubled, 2 * first, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- robustness of the fused path
def _assert_same_decode(model, reference, prompts, steps=3):
    for a, b in zip(decode_run(reference, prompts, steps)[0], decode_run(model, prompts, steps)[0]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_fused_decode_batch_one_across_cache_growth():
    """Capacity 1 grows several times during decoding (the KV buffers move; the program follows)."""
    model = randomize(HybridLM(small_config()).eval(), seed=8)
    runs = []
    for m in (twin(model, "torch"), model):
        cache = m.new_cache(1, capacity=1)
        out = [m.extend(cache, [torch.arange(3)])]
        for t in range(12):
            out.append(m.decode_step(cache, torch.tensor([t % 97])))
        runs.append(out)
        assert cache.capacity >= 15
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_fused_path_follows_fused_adamw_assign_loads_and_config_changes():
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=9)
    prompts = [torch.arange(5), torch.arange(2)]
    decode_run(model, prompts, 2)  # builds the program and the derived weights
    # AdamW(fused=True) on a CPU updates parameters without bumping their version counters
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.arange(12)[None]).logits.square().mean().backward()
    opt.step()
    _assert_same_decode(model, twin(model, "fast"), prompts)
    # parameters replaced by new tensors
    other = randomize(HybridLM(model.config), seed=10).state_dict()
    model.load_state_dict(other, assign=True)
    _assert_same_decode(model, twin(model, "fast"), prompts)
    # a config value read by the kernels
    model.config.routed_scaling_factor = 0.5
    with torch.no_grad():
        ref = twin(model, "fast")(torch.arange(6)[None]).logits[0, -1]
    cache = model.new_cache(1)
    model.extend(cache, [torch.arange(5)])
    torch.testing.assert_close(model.decode_step(cache, torch.tensor([5]))[0], ref, atol=1e-4, rtol=0)
    # .data edits bump no version: invalidate() is the documented way
    with torch.no_grad():
        model.backbone.norm_f.weight.data.mul_(2.0)
    kernels.invalidate(model)
    _assert_same_decode(model, twin(model, "fast"), prompts)


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


# ----------------------------------------------------------------------------- the decode program's kernels, one by one
def test_linear_packed_kernel_equals_linear():
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(5, 40, generator=gen)[:, 3:36]  # rows with a stride: [5, 33] of a [5, 40] buffer
    w = torch.randn(37, 33, generator=gen)  # 37 outputs: a partial last panel
    out, panels = torch.empty(5, 37), kernels.linear_panels(w)  # panels alive during the call
    kernels.library().linear_packed(kernels.ptr(x), kernels.ptr(panels), kernels.ptr(out), 5, 33, x.stride(0), 37, 37)
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_add_rms_norm_kernel_equals_residual_add_and_rms_norm():
    gen = torch.Generator().manual_seed(21)
    h, delta, w = torch.randn(3, 37, generator=gen), torch.randn(3, 37, generator=gen), torch.randn(37, generator=gen)
    for d in (None, delta):
        got, out = h.clone(), torch.empty(3, 37)
        kernels.library().add_rms_norm(kernels.ptr(got), None if d is None else kernels.ptr(d), kernels.ptr(w),
                                       kernels.ptr(out), 3, 37, 1e-5)
        ref = h if d is None else h + d
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)  # the residual stream, updated in place
        torch.testing.assert_close(out, rms_norm(ref, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_router_kernel_equals_route(norm_topk):
    gen = torch.Generator().manual_seed(22)
    n, d, e, k = 9, 16, 7, 3
    h, gate, bias = torch.randn(n, d, generator=gen), torch.randn(e, d, generator=gen), 0.1 * torch.randn(e, generator=gen)
    idx_ref, w_ref = route(h, gate, bias, k, 2.5, norm_topk)
    logits = F.linear(h, gate)
    idx, w, load = torch.empty(n, k, dtype=torch.long), torch.empty(n, k), torch.zeros(e)
    kernels.library().moe_route(kernels.ptr(logits), kernels.ptr(bias), kernels.ptr(idx), kernels.ptr(w),
                                kernels.ptr(load), n, e, k, int(norm_topk), e, 2.5)
    order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)  # the same experts, in any slot order
    assert torch.equal(idx.gather(1, order), idx_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6, rtol=1e-5)
    assert torch.equal(load, torch.bincount(idx_ref.reshape(-1), minlength=e).float())


def test_experts_kernel_equals_naive_dispatch_and_shared_activation():
    model = randomize(HybridLM(small_config(moe_intermediate_size=20)), seed=23)
    moe = next(m for m in model.modules() if isinstance(m, FastMoE))
    cfg, gen = moe.cfg, torch.Generator().manual_seed(23)
    n, k, d = 11, cfg.num_experts_per_tok, cfg.hidden_size
    x, shared_up = torch.randn(n, d, generator=gen), torch.randn(n, 48, generator=gen)
    idx, w = route(x, moe.gate.weight.detach(), torch.zeros(cfg.n_routed_experts), k, 2.5, True)
    up_p, down_p = moe.packed_experts()
    out = torch.empty(n, d + 48)
    p = kernels.ptr
    kernels.library().moe_experts(p(x), p(idx), p(w), p(up_p), p(down_p), p(out), p(shared_up), n, k,
                                  cfg.n_routed_experts, d, cfg.moe_intermediate_size, d, d + 48, 48, 48)
    with torch.no_grad():
        ref = dispatch_naive(x, idx, w, moe.experts.up_proj, moe.experts.down_proj)
    torch.testing.assert_close(out[:, :d], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, d:], F.relu(shared_up).square(), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_mamba_scan_kernel_equals_reference_mixer_on_a_ragged_extension():
    """One ``mamba_scan`` call against the reference mixer's body, continuing a cached conv window and
    SSM state; rows of 5, 2 and 0 new tokens (padding leaves the state alone)."""
    cfg = small_config(layer_pattern="M")
    model = randomize(HybridLM(cfg), seed=24)
    fast_mixer = model.backbone.layers[0].mixer
    ref_mixer = Mamba2Mixer(cfg)
    ref_mixer.load_state_dict(fast_mixer.state_dict())
    assert isinstance(fast_mixer, FastMamba2Mixer)
    gen = torch.Generator().manual_seed(24)
    n_new = torch.tensor([5, 2, 0])
    proj = torch.randn(3, 5, cfg.mamba_in_proj_dim, generator=gen)
    caches = [model.new_cache(3) for _ in range(2)]
    for cache in caches:  # the same non-trivial history in both
        cache.conv[0].copy_(torch.randn(cache.conv[0].shape, generator=torch.Generator().manual_seed(1)))
        cache.ssm[0].copy_(torch.randn(cache.ssm[0].shape, generator=torch.Generator().manual_seed(2)))
    got = fast_mixer._scan_fused(proj, caches[0], 0, n_new)
    valid = torch.arange(5) < n_new[:, None]
    ctx = _Ctx("extend", {}, cache=caches[1], valid_bt=valid, n_new_b=n_new)
    ref = ref_mixer._mix(proj, ctx, 0, REFERENCE_OPS)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert got[~valid].abs().max() == 0
    torch.testing.assert_close(caches[0].conv[0], caches[1].conv[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0].ssm[0], caches[1].ssm[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["M", "E", "*", "-"])
def test_decode_program_of_each_layer_kind_equals_reference(pattern):
    """``decode_layers`` with one layer of each kind (the attention step has no other kernel test)."""
    model = randomize(HybridLM(small_config(layer_pattern=pattern)).eval(), seed=25)
    prompts = [torch.arange(7), torch.arange(3), torch.arange(1)]
    got = decode_run(model, prompts, 5)[0]
    assert isinstance(model.__dict__.get("_program"), fused.DecodeProgram)
    for a, b in zip(decode_run(twin(model, "reference"), prompts, 5)[0], got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the padded expert dispatch
def test_padded_dispatch_with_transposed_weights_equals_naive():
    gen = torch.Generator().manual_seed(1)
    n, d, i, e, k = 19, 8, 12, 4, 2
    x = torch.randn(n, d, generator=gen)
    up, down = torch.randn(e, i, d, generator=gen) * 0.3, torch.randn(e, d, i, generator=gen) * 0.3
    idx, w = route(x, torch.randn(e, d, generator=gen), torch.zeros(e), k, 1.0, True)
    ref = dispatch_naive(x, idx, w, up, down)
    transposed = (up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous())
    with torch.no_grad():
        for t in (transposed, None):
            torch.testing.assert_close(dispatch_padded(x, idx, w, up, down, transposed=t), ref, atol=1e-5, rtol=1e-5)


def test_expert_transposed_copy_follows_parameter_updates():
    from hybrid_rl.model import HybridConfig

    moe = FastMoE(HybridConfig.from_preset("micro"), use_kernels=False)
    experts = moe.experts
    torch.nn.init.normal_(experts.up_proj)
    torch.nn.init.normal_(experts.down_proj)
    up_t, down_t = moe.transposed_experts()
    assert torch.equal(up_t, experts.up_proj.transpose(1, 2)) and torch.equal(down_t, experts.down_proj.transpose(1, 2))
    assert moe.transposed_experts()[0] is up_t  # kept while unchanged
    opt = torch.optim.SGD(experts.parameters(), lr=0.1)
    (experts.up_proj.sum() + experts.down_proj.pow(2).sum()).backward()
    opt.step()
    up_t, down_t = moe.transposed_experts()
    assert torch.equal(up_t, experts.up_proj.transpose(1, 2)) and torch.equal(down_t, experts.down_proj.transpose(1, 2))
    experts.load_state_dict({"up_proj": torch.zeros_like(experts.up_proj), "down_proj": experts.down_proj.detach()})
    assert moe.transposed_experts()[0].abs().max() == 0


# ----------------------------------------------------------------------------- extension of some rows, in place
def _prefilled(model, lengths=(9, 3, 14, 1), seed=1):
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(lengths))
    model.extend(cache, [torch.randint(0, 97, (n,), generator=gen) for n in lengths])
    return cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_extension_of_some_rows_equals_their_decode_steps_bit_for_bit(name):
    """The extension program over a row's new tokens computes what that many decode steps compute (one
    row's arithmetic never depends on the other tokens of its call): logits, routing, conv windows, SSM
    states and keys/values equal bit for bit; the rows not named are not touched."""
    model = randomize(HybridLM(small_config(**CONFIGS[name])).eval(), seed=3)
    cache = _prefilled(model)
    before = cache.select(range(4))
    gen = torch.Generator().manual_seed(7)
    rows, feeds = [2, 0], [torch.randint(0, 97, (n,), generator=gen) for n in (5, 3)]
    logits, routed = model.extend(cache, feeds, record_routing=True, rows=rows)
    assert logits.shape == (2, 97) and routed.shape == (2, 5, 2, model.config.num_experts_per_tok)
    assert bool((routed[1, 3:] == -1).all())  # the shorter row's padding
    for k, (row, feed) in enumerate(zip(rows, feeds)):
        alone = before.select([row])
        for t, token in enumerate(feed):  # the same tokens, a decode step each, in a cache of this row alone
            step_logits, step_routed = model.decode_step(alone, token[None], record_routing=True)
            assert torch.equal(step_routed[0], routed[k, t])
        assert torch.equal(step_logits[0], logits[k])
        assert int(cache.lengths[row]) == int(alone.lengths[0])
        for a, b in zip(alone.tensors(), cache.select([row]).tensors()):
            if a.dim() == 4:  # keys / values: the used positions
                a, b = a[..., :int(alone.lengths[0]), :], b[..., :int(alone.lengths[0]), :]
            assert torch.equal(a, b)
    for row in (1, 3):
        for a, b in zip(before.select([row]).tensors(), cache.select([row]).tensors()):
            assert torch.equal(a, b[..., :a.shape[2], :] if a.dim() == 4 else b)


def test_extension_of_some_rows_equals_the_pytorch_path():
    """A model without the kernels extends the named rows through a copy (select, extend, write back): the
    same values to fp32 round-off, the same experts and expert loads, the other rows untouched."""
    model = randomize(HybridLM(small_config(moe_latent_size=24)).eval(), seed=5)
    runs = []
    for m in (twin(model, "torch"), model):
        cache = _prefilled(m)
        for layer in m.modules():
            if hasattr(layer, "expert_load"):
                layer.expert_load.zero_()
        logits, routed = m.extend(cache, [torch.arange(4, 10), torch.arange(2)], record_routing=True, rows=[3, 1])
        loads = [layer.expert_load.clone() for layer in m.modules() if hasattr(layer, "expert_load")]
        runs.append((logits, routed, cache, loads))
    (ref, ref_routed, ref_cache, ref_loads), (got, routed, cache, loads) = runs
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert torch.equal(routed.sort(-1).values, ref_routed.sort(-1).values)
    assert all(torch.equal(a, b) for a, b in zip(loads, ref_loads))
    assert torch.equal(cache.lengths, ref_cache.lengths) and cache.lengths.tolist() == [9, 5, 14, 7]


def test_extension_rows_must_be_distinct_and_in_the_cache():
    model = randomize(HybridLM(small_config()).eval(), seed=2)
    cache = _prefilled(model)
    for rows, match in (([1, 1], "distinct"), ([4], r"in \[0, 4\)"), ([-1], r"in \[0, 4\)")):
        with pytest.raises(ValueError, match=match):
            model.extend(cache, [[5]] * len(rows), rows=rows)
    with pytest.raises(ValueError, match="token lists for 1 rows, rows names 2"):
        model.extend(cache, [[5]], rows=[0, 1])
    assert cache.lengths.tolist() == [9, 3, 14, 1]  # nothing was fed


@pytest.mark.parametrize("k, n", [(33, 37), (64, 96), (40, 16), (17, 200)])
def test_linear_packed_rows_do_not_depend_on_their_batch(k, n):
    """Each output row is one chain of fused multiply-adds over k, whatever the number of rows, the block a
    row falls in, or the panel width the machine's vectors allow: a row gives the same bits in any batch."""
    gen = torch.Generator().manual_seed(k + n)
    x, w = torch.randn(29, k, generator=gen), torch.randn(n, k, generator=gen)
    panels, lib, p = kernels.linear_panels(w), kernels.library(), kernels.ptr

    def product(rows):
        out = torch.empty(rows.shape[0], n)
        lib.linear_packed(p(rows), p(panels), p(out), rows.shape[0], k, k, n, n)
        return out

    full = product(x)
    torch.testing.assert_close(full, F.linear(x, w), atol=1e-4, rtol=1e-5)
    for lo, hi in ((0, 1), (5, 6), (3, 10), (7, 29), (13, 25)):
        assert torch.equal(product(x[lo:hi].contiguous()), full[lo:hi])


def test_an_extension_without_new_tokens_reads_the_current_head():
    """``extend`` where no row gets tokens only reads the head: on a fresh model (no table built yet) and after the
    weights change, it gives the torch path's logits."""
    with torch.no_grad():
        fast = randomize(HybridLM(small_config(), impl="fast")).eval()
        cache = fast.new_cache(2)
        plain = twin(fast, "torch")
        torch.testing.assert_close(fast.extend(cache, [[], []]), plain.extend(plain.new_cache(2), [[], []]))
        prompt = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
        fast.extend(cache, prompt)
        slow = twin(fast, "torch")
        slow_cache = slow.new_cache(2)
        slow.extend(slow_cache, prompt)
        for model in (fast, slow):
            model.lm_head.weight.mul_(2.0)  # the weights move (an optimizer step)
        torch.testing.assert_close(fast.extend(cache, [[], []]), slow.extend(slow_cache, [[], []]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.extend(cache, [[]], rows=[1]), slow.extend(slow_cache, [[]], rows=[1]), atol=1e-4, rtol=1e-4)
