"""The reference model's math (model/mamba.py, moe.py, norms.py, attention.py) against its naive twins,
values and gradients: the chunked scan against the recurrence (autograd through the readable scan),
grouped dispatch against every pair on its own.  model/fast is held to these references in
test_model_train_ops.py, test_model_fused_decode.py and test_model_impls.py."""

import pytest
import torch

from hybrid_rl.model.attention import attention_naive, packed_causal_mask
from hybrid_rl.model.mamba import causal_conv, causal_conv_naive, ssd_chunked, ssd_naive, ssd_step
from hybrid_rl.model.moe import dispatch_grouped, dispatch_naive, route
from hybrid_rl.model.norms import rms_norm, rms_norm_naive

torch.set_default_dtype(torch.float32)


def ssd_inputs(b=2, t=37, h=4, p=3, g=2, n=5, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, B, C = r(b, t, h, p), r(b, t, g, n), r(b, t, g, n)
    dt = torch.nn.functional.softplus(r(b, t, h) - 1)
    A, D = -torch.exp(r(h) * 0.5), r(h)
    init = r(b, h, p, n)
    tensors = [x, dt, A, B, C, D, init]
    for tensor in tensors:
        tensor.requires_grad_(grad)
    return tensors


def grads_of(fn, tensors):
    y, state = fn()
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (state ** 2).sum()
    return [g for g in torch.autograd.grad(loss, tensors)], y, state


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("with_init", [False, True])
def test_chunked_ssd_equals_recurrence_values_and_grads(chunk, with_init):
    x, dt, A, B, C, D, init = ssd_inputs()
    s0 = init if with_init else None
    ins = [x, dt, A, B, C, D] + ([init] if with_init else [])
    g_fast, y_fast, s_fast = grads_of(lambda: ssd_chunked(x, dt, A, B, C, D, chunk, s0), ins)
    g_ref, y_ref, s_ref = grads_of(lambda: ssd_naive(x, dt, A, B, C, D, s0), ins)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_fast, s_ref, atol=1e-4, rtol=1e-4)
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, atol=1e-3, rtol=1e-3)


def test_chunked_ssd_with_document_resets_equals_recurrence():
    x, dt, A, B, C, D, _ = ssd_inputs(t=45)
    seg = torch.tensor([[0] * 7 + [1] * 20 + [2] * 18, [0] * 16 + [1] * 16 + [2] * 13])  # boundaries on/off chunk edges
    ins = [x, dt, A, B, C, D]
    g_fast, y_fast, s_fast = grads_of(lambda: ssd_chunked(x, dt, A, B, C, D, 8, seg_bt=seg), ins)
    g_ref, y_ref, s_ref = grads_of(lambda: ssd_naive(x, dt, A, B, C, D, seg_bt=seg), ins)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_fast, s_ref, atol=1e-4, rtol=1e-4)
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, atol=1e-3, rtol=1e-3)


def test_resets_equal_running_documents_separately():
    x, dt, A, B, C, D, _ = ssd_inputs(t=30, grad=False)
    seg = torch.tensor([[0] * 11 + [1] * 19] * 2)
    y, _ = ssd_chunked(x, dt, A, B, C, D, 8, seg_bt=seg)
    y1, _ = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], D, 8)
    y2, _ = ssd_chunked(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], D, 8)
    torch.testing.assert_close(y, torch.cat([y1, y2], 1), atol=1e-5, rtol=1e-5)


def test_one_step_recurrence_equals_scan():
    x, dt, A, B, C, D, init = ssd_inputs(t=9, grad=False)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D, init)
    state = init.clone()
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_causal_conv_equals_conv1d_and_resets_per_document():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 13, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)
    torch.testing.assert_close(causal_conv(x, w, b), causal_conv_naive(x, w, b), atol=1e-5, rtol=1e-5)
    seg = torch.tensor([[0] * 5 + [1] * 8] * 2)
    y = causal_conv(x, w, b, seg_bt=seg)
    ref = torch.cat([causal_conv_naive(x[:, :5], w, b), causal_conv_naive(x[:, 5:], w, b)], 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_grouped_dispatch_equals_naive_values_and_grads():
    gen = torch.Generator().manual_seed(0)
    n, d, i, e, k = 23, 8, 12, 5, 2
    x = torch.randn(n, d, generator=gen, requires_grad=True)
    up = (torch.randn(e, i, d, generator=gen) * 0.3).requires_grad_()
    down = (torch.randn(e, d, i, generator=gen) * 0.3).requires_grad_()
    gate = torch.randn(e, d, generator=gen)
    idx, w = route(x.detach(), gate, torch.zeros(e), k, 2.5, True)
    w = w.clone().requires_grad_()
    fast = dispatch_grouped(x, idx, w, up, down)
    ref = dispatch_naive(x, idx, w, up, down)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    gf = torch.autograd.grad(fast.pow(2).sum(), [x, up, down, w])
    gr = torch.autograd.grad(ref.pow(2).sum(), [x, up, down, w])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the no-autograd path (one grouped matmul on CPU)
        torch.testing.assert_close(dispatch_grouped(x, idx, w, up, down), ref, atol=1e-5, rtol=1e-5)


def test_router_replay_recomputes_weights_from_current_scores():
    gen = torch.Generator().manual_seed(0)
    h, gate = torch.randn(7, 8, generator=gen), torch.randn(6, 8, generator=gen)
    idx, w = route(h, gate, torch.zeros(6), 2, 1.0, True)
    idx2, w2 = route(h, gate, torch.full((6,), 5.0) * (torch.arange(6) == 0), 2, 1.0, True, replay_nk=idx)
    assert torch.equal(idx2, idx) and torch.allclose(w2, w)
    assert torch.allclose(w.sum(-1), torch.ones(7))


def test_packed_attention_mask_and_norms():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    y = attention_naive(q, k, v, packed_causal_mask(seg))
    first = attention_naive(q[..., :3, :], k[..., :3, :], v[..., :3, :], packed_causal_mask(seg[:, :3]))
    torch.testing.assert_close(y[..., :3, :], first)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packed_causal_mask(seg)[:, None], enable_gqa=True)
    torch.testing.assert_close(sdpa, y, atol=1e-5, rtol=1e-5)
    x, wt = torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen)
    torch.testing.assert_close(rms_norm(x, wt, 1e-5), rms_norm_naive(x, wt, 1e-5), atol=1e-6, rtol=1e-5)
