"""model/fast/train_ops: every autograd Function against its reference, values and gradients, with
the CPU kernels and in PyTorch ops (``use_kernels``).

References: ``causal_conv_naive`` (torch's grouped conv1d), ``ssd_naive`` (the sequential recurrence),
``dispatch_naive`` (every pair on its own), ``rms_norm_naive`` and a plain gated norm, all through
torch's own autograd; the reference mixer (model/mamba.py) for the fused one; plus gradcheck of each
Function in float64 on small inputs.  tests/model/test_model_impls.py compares whole models.
"""

import sys

import pytest
import torch
import torch.nn.functional as F

from hybrid_rl.model import HybridConfig
from hybrid_rl.model.fast import kernels
from hybrid_rl.model.fast.layers import FastAttention, FastMamba2Mixer, attend_documents
from hybrid_rl.model.shared import _length_batches
from hybrid_rl.model.fast.train_ops import (
    _CausalConv,
    _GroupedExperts,
    _MambaMixer,
    _RMSNorm,
    _SSDChunked,
    causal_conv_train,
    gated_group_rms_norm_train,
    grouped_experts,
    linear_train,
    mamba_mixer_train,
    relu2_train,
    rms_norm_train,
    ssd_chunked_train,
)
from hybrid_rl.model.attention import packed_causal_mask
from hybrid_rl.model.hybrid import _Ctx
from hybrid_rl.model.mamba import Mamba2Mixer, causal_conv, causal_conv_naive, ssd_chunked, ssd_naive
from hybrid_rl.model.moe import dispatch_naive, route
from hybrid_rl.model.norms import rms_norm_naive

needs_kernels = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernels are not built")
needs_mm = pytest.mark.skipif(not kernels.mm_usable(), reason="gemm.c's GEMM needs AVX-512 and a C compiler")


@needs_mm
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 3), (13, 17, 33), (25, 40, 64), (200, 96, 200), (37, 450, 31)])
def test_kernel_mm_equals_torch_mm_through_any_strides(m, k, n):
    """Row-major, transposed and sliced operands (read through their strides, no copy), sizes off the
    12-row blocks, the 16-column panels and the 192-row tiles, and a product written into a strided slice."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    wide = torch.randn(m, 2 * k + 3, generator=g)
    for A in (a, a.t().contiguous().t(), wide[:, 3:3 + 2 * k:2]):
        for B in (b, b.t().contiguous().t()):
            torch.testing.assert_close(kernels.mm(A, B), A @ B, rtol=1e-5, atol=1e-5 * k ** 0.5)
    out = torch.zeros(m, n + 5)
    kernels.mm(a, b, out=out[:, 2:2 + n])
    torch.testing.assert_close(out[:, 2:2 + n], a @ b, rtol=1e-5, atol=1e-5 * k ** 0.5)
    assert not out[:, :2].any() and not out[:, 2 + n:].any()  # nothing written outside the slice
    big = torch.randn(450, k, generator=g)  # more rows than a tile: the result does not depend on the tiling
    assert torch.equal(kernels.mm(big, b)[:m], kernels.mm(big[:m], b))


@needs_mm
def test_kernel_mm_rejects_what_it_cannot_multiply():
    a, b = torch.randn(4, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"\[M, K\] by \[K, N\]"):
        kernels.mm(a, b)
    with pytest.raises(ValueError, match="out must be"):
        kernels.mm(a, torch.randn(3, 2), out=torch.empty(2, 4).t())
    with pytest.raises(ValueError, match="CPU float32"):
        kernels.mm(a.double(), torch.randn(3, 2).double())


@needs_mm
@pytest.mark.parametrize("bias", [False, True])
def test_linear_train_equals_f_linear_values_and_grads(bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 48, generator=g, requires_grad=True)
    w = torch.randn(80, 48, generator=g, requires_grad=True)
    b = torch.randn(80, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(3, 40, 80, generator=g)
    y = linear_train(x, w, b)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert through_kernel(y)  # the kernel path, not F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.linear in bf16, as without the kernels
        assert linear_train(x, w, b).dtype == torch.bfloat16
    assert not through_kernel(linear_train(x.double(), w.double()))


def through_kernel(y) -> bool:
    """Whether ``y``'s graph (its grad_fn, or the one under its reshape) is ``_KernelLinear``'s."""
    fns = [y.grad_fn] + [f for f, _ in y.grad_fn.next_functions if f is not None]
    return any("KernelLinear" in type(f).__name__ for f in fns)


def test_a_fast_model_trains_its_linears_through_the_kernels_with_the_reference_names():
    from torch import nn

    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.fast import FastLinear

    cfg = HybridConfig.from_preset("micro")
    fast, ref = HybridLM(cfg, impl="fast"), HybridLM(cfg, impl="reference")
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert linears and (fast.impl != "fast" or all(type(m) is FastLinear for m in linears))
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert all(type(m) is nn.Linear for m in ref.modules() if isinstance(m, nn.Linear))
USE_KERNELS = [pytest.param(True, marks=needs_kernels, id="kernels"), pytest.param(False, id="pytorch")]


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
    y = causal_conv_train(x, w, b)
    ref = causal_conv_naive(x, w, b)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=gen)
    _close_all(_grads(y, [x, w, b], gy), _grads(ref, [x, w, b], gy), 1e-5, 1e-5)
    with torch.no_grad():  # the Function's forward is the reference's, operation for operation
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
@pytest.mark.parametrize("use_kernels", USE_KERNELS)  # CPU fp32: the C gathers and relu^2, or PyTorch's
def test_grouped_experts_equal_naive_values_and_grads(k, use_kernels):
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
    fast = grouped_experts(x, idx, w, up, down, use_kernels=use_kernels)
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
        return _GroupedExperts.apply(x, w, up, down, order, counts, k, None)

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
        low = grouped_experts(x.to(torch.bfloat16), idx, w, up, down)  # a bf16 input, as a bf16 projection gives
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    g = torch.autograd.grad(low.sum(), [x, up, down])
    assert [t.dtype for t in g] == [torch.float32] * 3 and all(torch.isfinite(t).all() for t in g)
    # the fast model on the CPU keeps the expert matmuls in fp32 under autocast: the fp32 result exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = grouped_experts(x.to(torch.bfloat16), idx, w, up, down, use_kernels=True)
    torch.testing.assert_close(same, grouped_experts(x.to(torch.bfloat16).float(), idx, w, up, down, use_kernels=True),
                               atol=0, rtol=0)


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
@pytest.mark.parametrize("use_kernels", USE_KERNELS)
def test_ssd_function_equals_recurrence_values_and_grads(chunk, with_init, packed, use_kernels):
    x, dt, A, B, C, D, init = _ssd_inputs()
    s0 = init if with_init else None
    # boundaries on and off chunk edges, a one-token document, a row without boundaries
    seg = torch.tensor([[0] * 8 + [1] * 1 + [2] * 19 + [3] * 9, [0] * 37]) if packed else None
    ins = [x, dt, A, B, C, D] + ([init] if with_init else [])
    y, s = ssd_chunked_train(x, dt, A, B, C, D, chunk, s0, seg_bt=seg, use_kernels=use_kernels)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D, s0, seg_bt=seg)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    wy, ws = _ssd_loss_weights(y, s)
    g = torch.autograd.grad((y * wy).sum() + (s * ws).sum(), ins)
    g_ref = torch.autograd.grad((y_ref * wy).sum() + (s_ref * ws).sum(), ins)
    _close_all(g, g_ref, 1e-3, 1e-3)
    with torch.no_grad():  # the reference scan gives the same values
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
        return _SSDChunked.apply(x, dt, A, B, C, D, init if with_init else None, seg, 4, None)

    assert torch.autograd.gradcheck(fn, (x, dt, A, B, C, D, init))


@pytest.mark.parametrize("packed", [False, True])
def test_ssd_function_one_chunk_without_final_state(packed):
    """One chunk from a zero state whose end state is not asked for (the mixer's case on short sequences):
    the diagonal block alone, no final state, the same output as the full scan; gradcheck in float64."""
    x, dt, A, B, C, D, _ = _ssd_inputs(b=2, t=12, h=4, p=2, g=2, n=2, seed=6, dtype=torch.float64)
    seg = torch.tensor([[0] * 3 + [1] * 6 + [2] * 3, [0] * 4 + [1] * 8]) if packed else None
    y, final = _SSDChunked.apply(x, dt, A, B, C, D, None, seg, 12, None, False)
    assert final is None
    torch.testing.assert_close(y, _SSDChunked.apply(x, dt, A, B, C, D, None, seg, 12, None, True)[0], atol=1e-12,
                               rtol=1e-12)
    torch.testing.assert_close(y.float(), ssd_naive(x, dt, A, B, C, D, seg_bt=seg)[0].float(), atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda *ins: _SSDChunked.apply(*ins, None, seg, 12, None, False)[0],
                                    (x, dt, A, B, C, D))


# ----------------------------------------------------------------------------- norms
def _gated_norm_naive(y, z, weight, group_size, eps):
    g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.float()).to(z.dtype)


def _check_rms_norm(gen, shape, use_kernels=False):
    """rms_norm_train equals the naive reference in values and gradients; returns (x, w, gy) for more checks."""
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(shape[-1], generator=gen, requires_grad=True)
    out, ref = rms_norm_train(x, w, 1e-5, use_kernels), rms_norm_naive(x, w, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(out.shape, generator=gen)
    _close_all(_grads(out, [x, w], gy), _grads(ref, [x, w], gy), 1e-5, 1e-5)
    return x, w, gy


def test_norm_functions_equal_naive_values_and_grads():
    gen = _gen(11)
    x, w, gy = _check_rms_norm(gen, (3, 7, 16))

    y = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    z = torch.randn(3, 7, 40, generator=gen)[..., 5:21].requires_grad_()  # a strided slice, as in the mixer
    out, ref = gated_group_rms_norm_train(y, z, w, 8, 1e-5), _gated_norm_naive(y, z, w, 8, 1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    _close_all(_grads(out, [y, z, w], gy), _grads(ref, [y, z, w], gy), 1e-5, 1e-5)


def test_norm_functions_gradcheck_float64():
    gen = _gen(12)
    y, z = (torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: _RMSNorm.apply(y, None, w, 12, 1e-5, None), (y, w))
    assert torch.autograd.gradcheck(lambda y, z, w: _RMSNorm.apply(y, z, w, 4, 1e-5, None), (y, z, w))


@needs_kernels
@pytest.mark.parametrize("chunk", [5, 16])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_decay_kernels_equal_pytorch_path(chunk, packed):
    """The decay-block kernels (CPU fp32) against the PyTorch ops of the same Function."""
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
    for use_kernels in (True, False):
        y, final = ssd_chunked_train(x, dt, A, Bm, Cm, D, chunk, seg_bt=seg, use_kernels=use_kernels)
        res.append((y, final, *torch.autograd.grad((y * gy).sum() + (final * gf).sum(), [x, dt, A, Bm, Cm, D])))
    _close_all(res[0], res[1], 1e-4, 1e-4)


# ----------------------------------------------------------------------------- the fused Mamba mixer
def _mixer_run(mixer, h, seg, gen_seed):
    h = h.detach().requires_grad_()
    out = mixer(h, _Ctx("full", None, seg_bt=seg), 0)
    go = torch.randn(out.shape, generator=_gen(gen_seed))
    params = [h, *mixer.parameters()]
    return out, torch.autograd.grad((out * go).sum(), params)


@needs_kernels
@pytest.mark.parametrize("t,chunk", [(24, 8), (13, 64), (16, 16), (48, 16), (160, 32)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dims", [(6, 6, 3, 5), (4, 8, 2, 8)])  # heads, head dim, groups, state
def test_mamba_mixer_kernels_equal_reference_and_pytorch_path(t, chunk, packed, dims):
    """The CPU-kernel mixer Function (conv+SiLU, gated norm in C, one gradient buffer) against the
    unfused PyTorch training path and the reference mixer, values and every gradient; odd channel
    counts exercise the tails, multiples of 8 the vector paths (the conv backward's row tiles among them)."""
    heads, head_dim, groups, state = dims
    cfg = HybridConfig(hidden_size=24, mamba_num_heads=heads, mamba_head_dim=head_dim, n_groups=groups,
                       ssm_state_size=state, conv_kernel=4, chunk_size=chunk, layer_pattern="M")
    torch.manual_seed(t + chunk)
    mixers = [FastMamba2Mixer(cfg, use_kernels=True), FastMamba2Mixer(cfg, use_kernels=False), Mamba2Mixer(cfg)]
    with torch.no_grad():
        for prm in mixers[0].parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=_gen(int(prm.numel()))))
    for other in mixers[1:]:
        other.load_state_dict(mixers[0].state_dict())
    h = torch.randn(2, t, cfg.hidden_size, generator=_gen(t))
    seg = None
    if packed:
        seg = torch.zeros(2, t, dtype=torch.long)
        seg[0, 3:] = 1
        seg[0, t // 2:] = 2
        seg[1, t - 2:] = 1
    fused = mamba_mixer_train(mixers[0], mixers[0].in_proj(h), seg)
    assert type(fused.grad_fn).__name__ == _MambaMixer.__name__ + "Backward"
    out, grads = _mixer_run(mixers[0], h, seg, 5)
    for ref_mixer in mixers[1:]:
        ref, ref_grads = _mixer_run(ref_mixer, h, seg, 5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        for (name, _), a, b in zip([("h", None), *mixers[0].named_parameters()], grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4, msg=name)


@needs_kernels
def test_mamba_mixer_under_cpu_autocast_runs_its_fp32_kernels(monkeypatch):
    """``train.dtype: bf16`` on the CPU: in_proj and out_proj run in bf16, the mixer body in the fp32 kernel
    Function (not its PyTorch ops in bf16); values and gradients stay near the fp32 run."""
    fast_layers = sys.modules[FastMamba2Mixer.__module__]  # (the package's ``layers`` name is a function)

    cfg = HybridConfig(hidden_size=32, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
                       conv_kernel=4, chunk_size=16, layer_pattern="M")
    torch.manual_seed(3)
    mixer = FastMamba2Mixer(cfg, use_kernels=True)
    h = torch.randn(2, 32, cfg.hidden_size, generator=_gen(3))
    ref, ref_grads = _mixer_run(mixer, h, None, 5)
    calls = []

    def counted(*args, **kwargs):
        out = mamba_mixer_train(*args, **kwargs)
        calls.append((args[1].dtype, torch.is_autocast_enabled("cpu"), type(out.grad_fn).__name__))
        return out

    monkeypatch.setattr(fast_layers, "mamba_mixer_train", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _mixer_run(mixer, h, None, 5)
    assert calls == [(torch.float32, False, _MambaMixer.__name__ + "Backward")]
    assert out.dtype == torch.bfloat16  # out_proj under autocast
    torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    for (name, _), a, b in zip([("h", None), *mixer.named_parameters()], grads, ref_grads):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=5e-2 * max(1.0, b.abs().max().item()), rtol=0, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_attention_under_cpu_autocast_attends_in_fp32_in_the_fast_model(packed):
    """``train.dtype: bf16`` on the CPU: the fast model's attention takes autocast's bf16 projections and
    attends them in fp32 (exactly the fp32 SDPA of those values); the ``torch`` implementation keeps bf16
    (what the training-memory formula counts).  Both stay near the fp32 layer, gradients included."""
    cfg = HybridConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, layer_pattern="*")
    torch.manual_seed(5)
    fast, plain = FastAttention(cfg, use_kernels=True), FastAttention(cfg, use_kernels=False)
    plain.load_state_dict(fast.state_dict())
    h = torch.randn(3, 13, cfg.hidden_size, generator=_gen(5), requires_grad=True)
    seg = torch.tensor([[0] * 6 + [1] * 7] * 3) if packed else None
    mask = None if seg is None else packed_causal_mask(seg)[:, None]
    ctx = _Ctx("full", None, seg_bt=seg)
    ref = fast(h, ctx, 0)
    ref_grads = torch.autograd.grad(ref.square().sum(), [h, *fast.parameters()])
    seen = []  # (q, k, v, output) of each layer's attention core

    def recorded(attend):
        def run(q, k, v, seg_bt):
            seen.append((q, k, v, attend(q, k, v, seg_bt)))
            return seen[-1][-1]
        return run

    for layer in (fast, plain):
        layer.attend_sequences = recorded(layer.attend_sequences)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(h, ctx, 0)
        grads = torch.autograd.grad(out.float().square().sum(), [h, *layer.parameters()])
        torch.testing.assert_close(out.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
        for a, b in zip(grads, ref_grads):
            assert a.dtype == torch.float32 and torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=5e-2 * max(1.0, b.abs().max().item()), rtol=0)
    (q, k, v, o_fast), (_, _, _, o_plain) = seen
    assert q.dtype == torch.bfloat16 and o_fast.dtype == torch.float32 and o_plain.dtype == torch.bfloat16
    qf, kf, vf = q.float(), k.float(), v.float()
    exact = (F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True) if mask is None else
             attend_documents(qf, kf, vf, seg))
    torch.testing.assert_close(o_fast, exact, atol=0, rtol=0)
    assert (o_plain.float() - exact).abs().max() > 0  # bf16 attention rounds: the two paths are not the same


def _packed_segments(rows, width):
    """[B, width] segment ids of rows of documents with the given lengths, the rest one padding document."""
    out = []
    for lengths in rows:
        seg = [d for d, n in enumerate(lengths) for _ in range(n)]
        out.append(seg + [len(lengths)] * (width - len(seg)))
    return torch.tensor(out)


@pytest.mark.parametrize("min_fill", [0.0, 0.75, 1.0], ids=["one-batch", "default", "one-length-per-batch"])
@pytest.mark.parametrize("rows", [
    [[5, 3, 9], [17], [1, 1, 1, 2, 10]],  # short documents, a whole row, a padding document (2) at the end
    [[1] * 6, [6], [2, 4]],  # every position its own document; no padding
], ids=["mixed", "ones"])
def test_attention_by_document_equals_the_masked_attention(rows, min_fill):
    """Packed rows in the fast model attend document by document (documents batched by length, padded at
    their ends): the same values and gradients as SDPA under the causal same-document mask, GQA included."""
    width = max(sum(r) for r in rows)
    seg = _packed_segments(rows, width)
    g = _gen(11)
    q = torch.randn(len(rows), 4, width, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(len(rows), 2, width, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=packed_causal_mask(seg)[:, None], enable_gqa=True)
    out = attend_documents(q, k, v, seg, min_fill=min_fill, dense_above=float("inf"))
    weight = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    _close_all(_grads(out, [q, k, v], weight), _grads(ref, [q, k, v], weight), atol=1e-12, rtol=0)
    # rows whose documents would save little attend under the mask as they are: the reference, exactly
    torch.testing.assert_close(attend_documents(q, k, v, seg, min_fill=min_fill, dense_above=0.0), ref, atol=0, rtol=0)


def test_length_batches_keep_documents_within_min_fill_of_the_longest():
    lengths = [10, 3, 8, 7, 1, 10, 4]
    batches = _length_batches(lengths, 0.75)
    assert batches == [([0, 5, 2], 10), ([3], 7), ([6, 1], 4), ([4], 1)]
    assert sorted(i for docs, _ in batches for i in docs) == list(range(len(lengths)))
    assert all(lengths[docs[0]] == width and all(lengths[i] >= 0.75 * width for i in docs) for docs, width in batches)
    assert _length_batches(lengths, 0.0) == [([0, 5, 2, 3, 6, 1, 4], 10)]


@pytest.mark.parametrize("use_kernels", USE_KERNELS)
def test_block_norm_and_relu2_equal_references(use_kernels):
    """rms_norm (plain) and the dense MLP's relu^2 with autograd, C kernels or PyTorch, against naive
    references; sizes not a multiple of the vector width."""
    gen = _gen(21)
    _check_rms_norm(gen, (5, 3, 37), use_kernels)
    h = torch.randn(7, 45, generator=gen, requires_grad=True)
    a, b = relu2_train(h, use_kernels), F.relu(h) ** 2
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    g = torch.randn(a.shape, generator=gen)
    _close_all(_grads(a, [h], g), _grads(b, [h], g), 1e-6, 1e-6)
