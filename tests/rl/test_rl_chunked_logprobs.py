"""chunked_policy_logprobs: the same log-probs, entropies and gradients as policy_logprobs on full logits,
with no [B*T, V] tensor alive (peak memory measured in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.rl.losses import LOGP_FLOOR, ScoringDist, chunked_policy_logprobs, policy_logprobs

B, T, D, V = 3, 8, 16, 40  # 24 tokens


def _banned():
    banned_v = torch.zeros(V, dtype=torch.bool)
    banned_v[[3, 17]] = True
    return banned_v


DISTS = {
    "plain": lambda: None,
    "truncated": lambda: ScoringDist(temperature=0.7, top_k=12, top_p=0.9, banned_v=_banned()),
}


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden_btd = torch.randn(B, T, D, generator=g).to(dtype)
    weight_vd = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    targets_bt = torch.randint(0, V, (B, T), generator=g)
    targets_bt[0, 1] = 3  # a banned id on the mask: LOGP_FLOOR under the truncated dist, no gradient
    mask_bt = (torch.rand(B, T, generator=g) > 0.3).float()
    mask_bt[0, 1] = 1.0
    mask_bt[2] = 0.0  # a row with no action token: every target replaced by the most likely kept token
    return hidden_btd, weight_vd, targets_bt, mask_bt


def _both(hidden_btd, weight_vd, targets_bt, mask_bt, dist, with_entropy, chunk_tokens, seed=1):
    """(log-prob, entropy, grad hidden, grad weight) of the full path and of the chunked one, under the
    same random loss on both outputs."""
    g = torch.Generator().manual_seed(seed)
    c_logp, c_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    results = []
    for chunked in (False, True):
        h = hidden_btd.clone().requires_grad_(True)
        w = weight_vd.clone().requires_grad_(True)
        if chunked:
            logp, ent = chunked_policy_logprobs(h, w, targets_bt, mask_bt, dist, with_entropy, chunk_tokens)
        else:
            logp, ent = policy_logprobs(F.linear(h, w).float(), targets_bt, mask_bt, dist, with_entropy)
        loss = (c_logp * logp).sum() + ((c_ent * ent).sum() if with_entropy else 0.0)
        loss.backward()
        results.append((logp, ent, h.grad, w.grad))
    return results


@pytest.mark.parametrize("dist_name", DISTS)
@pytest.mark.parametrize("chunk_tokens", [1, 5, 8, 24, 1024])  # 5 does not divide B*T = 24
@pytest.mark.parametrize("with_entropy", [True, False])
def test_chunked_matches_full_values_and_gradients(dist_name, chunk_tokens, with_entropy):
    hidden, weight, targets, mask = _inputs()
    dist = DISTS[dist_name]()
    (logp, ent, gh, gw), (c_logp, c_ent, c_gh, c_gw) = _both(hidden, weight, targets, mask, dist, with_entropy,
                                                             chunk_tokens)
    torch.testing.assert_close(c_logp, logp, rtol=1e-5, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(c_ent, ent, rtol=1e-5, atol=1e-5)
    else:
        assert c_ent is None and ent is None
    torch.testing.assert_close(c_gh, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_gw, gw, rtol=1e-4, atol=1e-5)
    assert c_logp.dtype == torch.float32 and torch.isfinite(c_logp).all()
    if dist_name == "truncated":
        assert float(c_logp[0, 1].detach()) == LOGP_FLOOR  # the banned target on the mask is held at the floor


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_of_one_output_alone(which):
    # the other output unused: its gradient is None in the backward, and must count as zero
    hidden, weight, targets, mask = _inputs(seed=2)
    dist = DISTS["truncated"]()
    grads = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        if chunked:
            logp, ent = chunked_policy_logprobs(h, w, targets, mask, dist, with_entropy=True, chunk_tokens=7)
        else:
            logp, ent = policy_logprobs(F.linear(h, w).float(), targets, mask, dist, with_entropy=True)
        (logp if which == "logp" else ent).sum().backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_bf16_inputs_score_in_bf16_then_fp32_like_lm_head():
    # the logits are rounded to bf16 as lm_head's would be, then scored in fp32; grads come back in bf16
    hidden, weight, targets, mask = _inputs(seed=3, dtype=torch.bfloat16)
    (logp, ent, gh, gw), (c_logp, c_ent, c_gh, c_gw) = _both(hidden, weight, targets, mask, DISTS["truncated"](),
                                                             True, 5)
    assert c_logp.dtype == c_ent.dtype == torch.float32
    assert c_gh.dtype == c_gw.dtype == torch.bfloat16
    torch.testing.assert_close(c_logp, logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_ent, ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_gh.float(), gh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(c_gw.float(), gw.float(), rtol=2e-2, atol=2e-2)


def test_model_hidden_states_through_chunks_match_the_logits_path():
    # HybridLM(compute_logits=False) + the chunked scorer = the trainer's current path, down to the parameters
    cfg = HybridConfig.from_preset("micro")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    targets, mask = ids.roll(-1, 1), torch.ones(2, 12)
    grads = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = HybridLM(cfg)
        out = model(ids, compute_logits=not chunked)
        if chunked:
            assert out.logits is None and out.hidden_states.shape == (2, 12, cfg.hidden_size)
            logp, ent = chunked_policy_logprobs(out.hidden_states, model.lm_head.weight, targets, mask,
                                                with_entropy=True, chunk_tokens=10)
        else:
            logp, ent = policy_logprobs(out.logits, targets, mask, with_entropy=True)
        (logp.sum() + 0.1 * ent.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_shapes_and_chunk_size_are_explained():
    hidden, weight, targets, mask = _inputs()
    with pytest.raises(ValueError, match=r"lm_head weight \[V, D\]"):
        chunked_policy_logprobs(hidden, weight[:, :-1], targets, mask)
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        chunked_policy_logprobs(hidden, weight, targets[:, :-1], mask)
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        chunked_policy_logprobs(hidden, weight, targets, mask, chunk_tokens=0)


# ------------------------------------------------------------------------------ peak memory

_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from hybrid_rl.rl.losses import ScoringDist, chunked_policy_logprobs, policy_logprobs

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def step(h, w, tokens, chunk_tokens):
        targets, mask = torch.arange(tokens)[None] % w.shape[0], torch.ones(1, tokens)
        if chunk_tokens:
            logp, ent = chunked_policy_logprobs(h, w, targets, mask, with_entropy=True, chunk_tokens=chunk_tokens)
        else:
            logp, ent = policy_logprobs(F.linear(h, w), targets, mask, with_entropy=True)
        (logp.sum() + 0.01 * ent.sum()).backward()

    torch.set_num_threads(1)  # the peak is about memory; one thread is also steadier on a busy machine
    vocab, dim = int(sys.argv[1]), int(sys.argv[2])
    w = (torch.randn(vocab, dim) * 0.1).requires_grad_(True)
    step(torch.randn(1, 8, dim, requires_grad=True), w, 8, 4)  # load the libraries before measuring
    for tokens, chunk_tokens in json.loads(sys.argv[3]):
        h = torch.randn(1, tokens, dim, requires_grad=True)
        w.grad = None
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (peak RSS) to the current RSS
        before = rss("VmRSS")
        step(h, w, tokens, chunk_tokens)
        print(json.dumps(dict(tokens=tokens, chunk_tokens=chunk_tokens, peak=rss("VmHWM") - before)), flush=True)
        del h
""")


def _peak_bytes(vocab, dim, runs):
    """Peak RSS growth of a log-prob + entropy forward and backward, per (tokens, chunk_tokens; 0 = full
    logits), measured in a fresh process. glibc is told to mmap every allocation of 1 MiB or more, so freed
    chunks go back to the system and the peak RSS follows the live tensors."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(vocab), str(dim), json.dumps(runs)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {(r["tokens"], r["chunk_tokens"]): r["peak"] for r in map(json.loads, proc.stdout.splitlines())}


def _check_peaks(vocab, dim, tokens, chunk_tokens):
    peaks = _peak_bytes(vocab, dim, [[tokens // 2, chunk_tokens], [tokens, chunk_tokens], [tokens, 0]])
    chunk_bytes, logits_bytes = chunk_tokens * vocab * 4, tokens * vocab * 4
    # inputs and gradients: hidden and its grad, the weight's fp32 gradient accumulator and the grad itself
    io_bytes = 2 * tokens * dim * 4 + 2 * vocab * dim * 4
    chunked, half, full = peaks[(tokens, chunk_tokens)], peaks[(tokens // 2, chunk_tokens)], peaks[(tokens, 0)]
    mib = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    assert chunked < 6 * chunk_bytes + io_bytes + (16 << 20), mib
    assert chunked < half + chunk_bytes, mib  # twice the tokens: not one chunk more
    assert full > 3 * logits_bytes and chunked * 10 < full, mib
    return mib


needs_proc_peak = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                     reason="peak RSS is read from Linux's /proc/self/status, reset via clear_refs")


@needs_proc_peak
def test_peak_memory_is_one_chunk_not_tokens_times_vocab():
    # 2048 tokens x 16384 vocab: full fp32 logits alone are 128 MiB; a chunk of 128 tokens is 8 MiB
    _check_peaks(vocab=16384, dim=64, tokens=2048, chunk_tokens=128)


@needs_proc_peak
@pytest.mark.slow
def test_peak_memory_is_one_chunk_not_tokens_times_vocab_slow_large():
    # 4096 tokens x 32768 vocab: full fp32 logits are 512 MiB (the full path holds several), a chunk 64 MiB
    _check_peaks(vocab=32768, dim=256, tokens=4096, chunk_tokens=512)
