"""model/train_ops: every autograd Function against its reference, values and gradients.

References: ``causal_conv_naive`` (torch's grouped conv1d), ``ssd_naive`` (the sequential recurrence),
``dispatch_naive`` (every pair on its own), ``rms_norm_naive`` and a plain gated norm, all through
torch's own autograd; plus gradcheck of each Function in float64 on small inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from hybrid_rl.model.mamba import causal_conv, causal_conv_naive, ssd_chunked, ssd_naive
from hybrid_rl.model.moe import dispatch_grouped, dispatch_naive, route
from hybrid_rl.model.norms import gated_group_rms_norm, rms_norm, rms_norm_naive
from hybrid_rl.model.train_ops import (
    _CausalConv,
    _GroupedExperts,
    _RMSNorm,
    _SSDChunked,
    causal_conv_train,
    grouped_experts,
    ssd_chunked_train,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


def _close_all(got, ref, atol, rtol):
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- causal conv
@pytest.mark.parametrize("t", [1, 2, 3, 5, 13, 64])
def test_causal_conv_values_and_grads_equal_conv1d(t):
    gen = _gen(t)
    x = torch.randn(3, t, 6, generator=gen, requires_grad=True)
    w = torch.randn(4, 6, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    y = causal_conv(x, w, b)  # grad enabled: the Function
    ref = causal_conv_naive(x, w, b)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=gen)
    _close_all(_grads(y, [x, w, b], gy), _grads(ref, [x, w, b], gy), 1e-5, 1e-5)
    with torch.no_grad():  # the Function's forward is the no-grad path's, operation for operation
        assert torch.equal(causal_conv(x, w, b), y)


@pytest.mark.parametrize("cuts", [[5], [1, 2, 9], [0], [3, 4]])
def test_causal_conv_packed_documents_equal_separate_runs(cuts):
    gen = _gen(len(cuts))
    t = 13
    x = torch.randn(2, t, 5, generator=gen, requires_grad=True)
    w = torch.randn(4, 5, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True)
    bounds = [0, *[c for c in cuts if c > 0], t]
    seg = torch.zeros(2, t, dtype=torch.long)
    for i, start in enumerate(bounds[1:-1]):
        seg[:, start:] = i + 1
    y = causal_conv_train(x, w, b, seg_bt=seg)
    ref = torch.cat([causal_conv_naive(x[:, lo:hi], w, b) for lo, hi in zip(bounds, bounds[1:]) if hi > lo], 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=gen)
    _close_all(_grads(y, [x, w, b], gy), _grads(ref, [x, w, b], gy), 1e-5, 1e-5)


def test_causal_conv_gradcheck_float64():
    gen = _gen(3)
    x = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0]])
    for s in (None, seg):
        assert torch.autograd.gradcheck(lambda x, w, b: _CausalConv.apply(x, w, b, s), (x, w, b))


# ----------------------------------------------------------------------------- grouped experts
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kernels_on", ["1", "0"])  # CPU fp32: the C gathers and relu^2, or PyTorch's
def test_grouped_experts_equal_naive_values_and_grads(k, kernels_on, monkeypatch):
    monkeypatch.setenv("HYBRID_RL_KERNELS", kernels_on)
    gen = _gen(k)
    n, d, i, e = 29, 8, 12, 6
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    up = (torch.randn(e, i, d, generator=gen) * 0.3).requires_grad_()
    down = (torch.randn(e, 7, i, generator=gen) * 0.3).requires_grad_()
    gate = torch.randn(e, d, generator=gen)
    bias = torch.zeros(e)
    bias[2] = -100.0  # expert 2 never chosen: its gradients must be zero, not garbage
    idx, w = route(x.detach(), gate, bias, k, 2.5, True)
    w = w.clone().requires_grad_()
    assert not (idx == 2).any()
    fast = dispatch_grouped(x, idx, w, up, down)  # grad enabled: the Function
    ref = dispatch_naive(x, idx, w, up, down)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(fast.shape, generator=gen)
    gf = _grads(fast, [x, up, down, w], gy)
    _close_all(gf, _grads(ref, [x, up, down, w], gy), 1e-4, 1e-4)
    assert gf[1][2].abs().max() == 0 and gf[2][2].abs().max() == 0


def test_grouped_experts_gradcheck_float64():
    gen = _gen(5)
    n, d, i, e, k = 9, 4, 5, 4, 2
    x = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(e, i, d, generator=gen, dtype=torch.float64, requires_grad=True)
    down = torch.randn(e, 3, i, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(e - 1, generator=gen)[:k] for _ in range(n)])  # the last expert unused
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e).tolist()

    def fn(x, w, up, down):
        return _GroupedExperts.apply(x, w, up, down, order, counts, k)

    assert torch.autograd.gradcheck(fn, (x, w, up, down))


def test_grouped_experts_under_cpu_autocast_close_to_fp32():
    gen = _gen(7)
    n, d, i, e, k = 40, 16, 32, 4, 2
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    up = (torch.randn(e, i, d, generator=gen) * 0.2).requires_grad_()
    down = (torch.randn(e, d, i, generator=gen) * 0.2).requires_grad_()
    idx, w = route(x.detach(), torch.randn(e, d, generator=gen), torch.zeros(e), k, 1.0, True)
    ref = dispatch_naive(x, idx, w, up, down)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = grouped_experts(x, idx, w, up, down)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    g = torch.autograd.grad(low.sum(), [x, up, down])
    assert [t.dtype for t in g] == [torch.float32] * 3 and all(torch.isfinite(t).all() for t in g)


# ----------------------------------------------------------------------------- chunked SSD
def _ssd_inputs(b=2, t=37, h=4, p=3, g=2, n=5, seed=0, dtype=torch.float32):
    gen = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, B, C = r(b, t, h, p), r(b, t, g, n), r(b, t, g, n)
    dt = F.softplus(r(b, t, h) - 1)
    A, D = -torch.exp(r(h) * 0.5), r(h)
    init = r(b, h, p, n)
    return [v.requires_grad_() for v in (x, dt, A, B, C, D, init)]


def _ssd_loss_weights(y, state, seed=1):
    gen = _gen(seed)
    return torch.randn(y.shape, generator=gen), torch.randn(state.shape, generator=gen)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_function_equals_recurrence_values_and_grads(chunk, with_init, packed):
    x, dt, A, B, C, D, init = _ssd_inputs()
    s0 = init if with_init else None
    # boundaries on and off chunk edges, a one-token document, a row without boundaries
    seg = torch.tensor([[0] * 8 + [1] * 1 + [2] * 19 + [3] * 9, [0] * 37]) if packed else None
    ins = [x, dt, A, B, C, D] + ([init] if with_init else [])
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk, s0, seg_bt=seg)  # grad enabled: the Function
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D, s0, seg_bt=seg)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    wy, ws = _ssd_loss_weights(y, s)
    g = torch.autograd.grad((y * wy).sum() + (s * ws).sum(), ins)
    g_ref = torch.autograd.grad((y_ref * wy).sum() + (s_ref * ws).sum(), ins)
    _close_all(g, g_ref, 1e-3, 1e-3)
    with torch.no_grad():  # the inference path (the previous autograd code) gives the same values
        y_ng, s_ng = ssd_chunked(x, dt, A, B, C, D, chunk, s0, seg_bt=seg)
    torch.testing.assert_close(y, y_ng, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ng, atol=1e-5, rtol=1e-5)


def test_ssd_function_with_only_the_output_used():
    x, dt, A, B, C, D, _ = _ssd_inputs(t=20, seed=3)
    y, _ = ssd_chunked_train(x, dt, A, B, C, D, 8)
    y_ref, _ = ssd_naive(x, dt, A, B, C, D)
    wy = torch.randn(y.shape, generator=_gen(4))
    _close_all(_grads(y, [x, dt, A, B, C, D], wy), _grads(y_ref, [x, dt, A, B, C, D], wy), 1e-3, 1e-3)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_function_gradcheck_float64(packed, with_init):
    x, dt, A, B, C, D, init = _ssd_inputs(b=2, t=12, h=4, p=2, g=2, n=2, seed=5, dtype=torch.float64)
    seg = torch.tensor([[0] * 3 + [1] * 6 + [2] * 3, [0] * 4 + [1] * 8]) if packed else None

    def fn(x, dt, A, B, C, D, init):
        return _SSDChunked.apply(x, dt, A, B, C, D, init if with_init else None, seg, 4)

    assert torch.autograd.gradcheck(fn, (x, dt, A, B, C, D, init))


# ----------------------------------------------------------------------------- norms
def _gated_norm_naive(y, z, weight, group_size, eps):
    g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.float()).to(z.dtype)


def _check_rms_norm(gen, shape):
    """rms_norm equals the naive reference in values and gradients; returns (x, w, gy) for more checks."""
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(shape[-1], generator=gen, requires_grad=True)
    out, ref = rms_norm(x, w, 1e-5), rms_norm_naive(x, w, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(out.shape, generator=gen)
    _close_all(_grads(out, [x, w], gy), _grads(ref, [x, w], gy), 1e-5, 1e-5)
    return x, w, gy


def test_norm_functions_equal_naive_values_and_grads():
    gen = _gen(11)
    x, w, gy = _check_rms_norm(gen, (3, 7, 16))

    y = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    z = torch.randn(3, 7, 40, generator=gen)[..., 5:21].requires_grad_()  # a strided slice, as in the mixer
    out, ref = gated_group_rms_norm(y, z, w, 8, 1e-5), _gated_norm_naive(y, z, w, 8, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    _close_all(_grads(out, [y, z, w], gy), _grads(ref, [y, z, w], gy), 1e-5, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gated_group_rms_norm(y, z, w, 8, 1e-5), out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_naive(x, w, 1e-5), atol=1e-6, rtol=1e-6)


def test_norm_functions_gradcheck_float64():
    gen = _gen(12)
    y, z = (torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: _RMSNorm.apply(y, None, w, 12, 1e-5), (y, w))
    assert torch.autograd.gradcheck(lambda y, z, w: _RMSNorm.apply(y, z, w, 4, 1e-5), (y, z, w))


@pytest.mark.parametrize("chunk", [5, 16])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_decay_kernels_equal_pytorch_path(monkeypatch, chunk, packed):
    """The decay-block kernels (CPU fp32) against the PyTorch ops of the same Function."""
    from hybrid_rl.model import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    gen = _gen(chunk)
    b, t, h, p, g, n = 2, 40, 4, 3, 2, 5
    x = torch.randn(b, t, h, p, generator=gen, requires_grad=True)
    dt = (torch.rand(b, t, h, generator=gen) * 0.5).requires_grad_()
    A = (-torch.rand(h, generator=gen) * 2).requires_grad_()
    Bm, Cm = (torch.randn(b, t, g, n, generator=gen, requires_grad=True) for _ in range(2))
    D = torch.randn(h, generator=gen, requires_grad=True)
    seg = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [0] * 33 + [1] * 7]) if packed else None
    gy = torch.randn(b, t, h, p, generator=gen)
    gf = torch.randn(b, h, p, n, generator=gen)
    res = []
    for on in ("1", "0"):
        monkeypatch.setenv("HYBRID_RL_KERNELS", on)
        y, final = ssd_chunked_train(x, dt, A, Bm, Cm, D, chunk, seg_bt=seg)
        res.append((y, final, *torch.autograd.grad((y * gy).sum() + (final * gf).sum(), [x, dt, A, Bm, Cm, D])))
    _close_all(res[0], res[1], 1e-4, 1e-4)


# ----------------------------------------------------------------------------- the fused Mamba mixer
def _mixer_run(mixer, h, seg, kernels_on, monkeypatch, gen_seed):
    from hybrid_rl.model.hybrid import _Ctx

    monkeypatch.setenv("HYBRID_RL_KERNELS", "1" if kernels_on else "0")
    h = h.detach().requires_grad_()
    out = mixer(h, _Ctx("full", None, seg_bt=seg), 0)
    go = torch.randn(out.shape, generator=_gen(gen_seed))
    params = [h, *mixer.parameters()]
    return out, torch.autograd.grad((out * go).sum(), params)


@pytest.mark.parametrize("t,chunk", [(24, 8), (13, 64), (16, 16), (48, 16), (160, 32)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dims", [(6, 6, 3, 5), (4, 8, 2, 8)])  # heads, head dim, groups, state
def test_mamba_mixer_kernels_equal_pytorch_path(monkeypatch, t, chunk, packed, dims):
    """The CPU-kernel mixer Function (conv+SiLU, gated norm in C, one gradient buffer) against the
    unfused PyTorch training path, values and every gradient; odd channel counts exercise the tails,
    multiples of 8 the vector paths (the conv backward's row tiles among them)."""
    from hybrid_rl.model import HybridConfig, kernels
    from hybrid_rl.model.mamba import Mamba2Mixer
    from hybrid_rl.model.train_ops import _MambaMixer, mamba_mixer_train

    if kernels.library() is None:
        pytest.skip("no C compiler")
    heads, head_dim, groups, state = dims
    cfg = HybridConfig(hidden_size=24, mamba_num_heads=heads, mamba_head_dim=head_dim, n_groups=groups,
                       ssm_state_size=state, conv_kernel=4, chunk_size=chunk, layer_pattern="M")
    torch.manual_seed(t + chunk)
    mixer = Mamba2Mixer(cfg)
    with torch.no_grad():
        for prm in mixer.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=_gen(int(prm.numel()))))
    h = torch.randn(2, t, cfg.hidden_size, generator=_gen(t))
    seg = None
    if packed:
        seg = torch.zeros(2, t, dtype=torch.long)
        seg[0, 3:] = 1
        seg[0, t // 2:] = 2
        seg[1, t - 2:] = 1
    fused = mamba_mixer_train(mixer, mixer.in_proj(h), seg)
    assert type(fused.grad_fn).__name__ == _MambaMixer.__name__ + "Backward"
    out, grads = _mixer_run(mixer, h, seg, True, monkeypatch, 5)
    ref, ref_grads = _mixer_run(mixer, h, seg, False, monkeypatch, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for (name, _), a, b in zip([("h", None), *mixer.named_parameters()], grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.parametrize("kernels_on", ["1", "0"])
def test_block_norm_and_relu2_kernels_equal_references(monkeypatch, kernels_on):
    """rms_norm (plain) and the dense MLP's relu^2 with autograd, C kernels or PyTorch, against naive
    references; sizes not a multiple of the vector width."""
    from hybrid_rl.model.moe import relu2
    from hybrid_rl.model.train_ops import relu2_train

    monkeypatch.setenv("HYBRID_RL_KERNELS", kernels_on)
    gen = _gen(21)
    _check_rms_norm(gen, (5, 3, 37))
    h = torch.randn(7, 45, generator=gen, requires_grad=True)
    for fn in (relu2, relu2_train):
        a, b = fn(h), F.relu(h) ** 2
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        g = torch.randn(a.shape, generator=gen)
        _close_all(_grads(a, [h], g), _grads(b, [h], g), 1e-6, 1e-6)


# ----------------------------------------------------------------------------- the whole model
@pytest.mark.parametrize("packed", [False, True])
def test_training_forward_equals_inference_forward(make_model, packed):
    model = make_model(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=_gen(13))
    doc_ids = torch.tensor([[0] * 9 + [1] * 12, [0] * 4 + [1] * 3 + [2] * 14]) if packed else None
    with torch.no_grad():
        ref = model(ids, doc_ids=doc_ids).logits
    logits = model(ids, doc_ids=doc_ids).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
               and p.grad is not None)


def test_kernels_switched_off_between_forward_and_backward(make_model, monkeypatch):
    """A backward runs the kernels its forward chose, even if HYBRID_RL_KERNELS changes in between."""
    model = make_model(seed=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=_gen(31))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for switch in (False, True):
        monkeypatch.setenv("HYBRID_RL_KERNELS", "1")
        loss = model(ids).logits.logsumexp(-1).sum()
        if switch:
            monkeypatch.setenv("HYBRID_RL_KERNELS", "0")
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)
