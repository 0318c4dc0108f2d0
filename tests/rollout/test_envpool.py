"""Env calls on reused worker threads (rollout/envpool.py), and the trimmed row copy the engine extends
boundary rows in (``HybridCache.select(rows, room=...)``)."""

import threading
import time

import pytest
import torch

from helpers import make_model
from hybrid_rl.rollout.envpool import EnvCalls, EnvFailure, EnvTimeout


def test_env_calls_reuse_their_threads():
    EnvCalls([lambda: 0] * 4).results(10)  # at least 4 idle workers from here on
    before = set(threading.enumerate())
    for _ in range(5):
        ran_on = EnvCalls([threading.current_thread] * 4).results(10)
        assert set(ran_on) <= before and all(t.name == "env-call" for t in ran_on)


def test_every_call_gets_its_own_worker_at_once():
    """n calls that wait for each other finish: none is queued behind another."""
    barrier = threading.Barrier(6)
    out = EnvCalls([lambda: barrier.wait(timeout=10) * 0 + 1 for _ in range(6)]).results(20)
    assert out == [1] * 6


def test_errors_and_timeouts_are_results_and_a_hung_call_keeps_only_its_worker():
    release = threading.Event()

    def boom():
        raise ValueError("bad action")

    t0 = time.monotonic()
    out = EnvCalls([lambda: 7, boom, lambda: release.wait(30)]).results(0.3)
    assert out[0] == 7
    assert isinstance(out[1], EnvFailure) and "ValueError: bad action" in str(out[1])
    assert isinstance(out[1].__cause__, ValueError) and "bad action" in out[1].trace
    assert isinstance(out[2], EnvTimeout)
    assert time.monotonic() - t0 < 5
    # the hung call still holds its worker; new calls run at once on others
    barrier = threading.Barrier(3)
    assert EnvCalls([lambda: barrier.wait(timeout=10) * 0 for _ in range(3)]).results(20) == [0, 0, 0]
    release.set()


def test_select_with_room_extends_like_a_full_copy():
    pytest.importorskip("hybrid_rl.model.hybrid")
    model = make_model("micro")
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(4)
    with torch.inference_mode():
        model.extend(cache, [torch.randint(10, 200, (n,), generator=g).tolist() for n in (5, 40, 9, 70)])
        assert cache.capacity == 128
        rows, feeds = [3, 0, 2], [torch.randint(10, 200, (n,), generator=g).tolist() for n in (4, 11, 7)]
        full, trimmed = cache.select(rows), cache.select(rows, room=11)
        assert trimmed.capacity == 70 + 11 and torch.equal(trimmed.lengths, full.lengths)
        for a, b in zip(full.tensors(), trimmed.tensors()):  # KV buffers: the same used positions
            assert torch.equal(a, b) if a.shape == b.shape else torch.equal(a[:, :, :70], b[:, :, :70])
        assert torch.equal(model.extend(full, feeds), model.extend(trimmed, feeds))
        assert torch.equal(full.lengths, trimmed.lengths)
        step = torch.tensor([11, 12, 13])
        assert torch.equal(model.decode_step(full, step), model.decode_step(trimmed, step))
