"""Weight sync in buckets: the plan, the worker's staging and version checks (in process), one Ray pool
end to end (fp32 bit-identical, bf16 within bf16, a restarted worker), the object-store check and an
unreachable cluster address."""

import logging
import random
import socket
import time

import pytest
import torch

from helpers import TOK
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.pool import (ObjectStoreTooSmallError, RayClusterUnreachableError, bucket_pieces,
                                    check_object_store, check_reachable, plan_buckets)
from hybrid_rl.rollout.worker import RolloutWorker, StaleWeightsError, to_wire, transfer_bytes, wire_dtype
from rollout_fixtures import ToyLM, ToyModel

MiB = 1024 ** 2


def toy_state(seed: int) -> dict[str, torch.Tensor]:
    return ToyLM(TOK.vocab_size, seed=seed).state_dict()


def mixed_state() -> dict[str, torch.Tensor]:
    """Small and large tensors, an empty one and an integer buffer."""
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "big": torch.randn(1000, 7, generator=g), "empty": torch.zeros(0, 4),
            "steps": torch.arange(10, dtype=torch.int64), "b": torch.randn(17, generator=g)}


def wire(state: dict, bucket_bytes: int, dtype: torch.dtype) -> list[list[tuple]]:
    return [to_wire(bucket_pieces(state, plan, dtype)) for plan in plan_buckets(state, bucket_bytes, dtype)]


def plain_worker(seed: int = 0) -> RolloutWorker:
    return RolloutWorker(0, ToyModel(TOK.vocab_size, seed=seed), None, SamplingConfig(seed=0), EpisodeConfig())


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buckets_hold_every_element_once_and_never_exceed_the_bound(dtype):
    state, bound = mixed_state(), 1000  # "big" (28,000 bytes in fp32) spans many buckets
    plan = plan_buckets(state, bound, dtype)
    size = {name: wire_dtype(t, dtype).itemsize for name, t in state.items()}
    bucket_bytes = [sum((stop - start) * size[name] for name, start, stop in bucket) for bucket in plan]
    assert max(bucket_bytes) <= bound
    assert all(b > bound - 8 for b in bucket_bytes[:-1])  # full up to the last whole element
    assert sum(bucket_bytes) == transfer_bytes(state, dtype)
    for name, tensor in state.items():
        ranges = sorted((start, stop) for bucket in plan for n, start, stop in bucket if n == name)
        covered = [i for start, stop in ranges for i in range(start, stop)]
        assert covered == list(range(tensor.numel())), name  # every element exactly once
    assert sum(1 for bucket in plan for n, *_ in bucket if n == "big") > 10


def test_fp32_pieces_are_the_callers_memory_and_bf16_pieces_half_the_bytes():
    state = mixed_state()
    (plan,) = plan_buckets(state, 1 * MiB, torch.float32)
    for piece in bucket_pieces(state, plan, torch.float32):
        source = state[piece.name]
        if source.numel():
            assert piece.data.data_ptr() == source.data_ptr() + piece.start * source.element_size()  # no copy
    bf16 = bucket_pieces(state, plan_buckets(state, 1 * MiB, torch.bfloat16)[0], torch.bfloat16)
    assert {p.name: p.data.dtype for p in bf16} == {"a": torch.bfloat16, "big": torch.bfloat16, "empty": torch.bfloat16,
                                                    "steps": torch.int64, "b": torch.bfloat16}
    assert transfer_bytes(state, torch.bfloat16) == transfer_bytes({k: v for k, v in state.items() if k != "steps"},
                                                                   torch.float32) // 2 + 80


# ----------------------------------------------------------------------------- the worker, in process


def test_worker_applies_a_version_only_once_all_its_buckets_arrived_bit_identical():
    worker, state = plain_worker(seed=0), toy_state(seed=1)
    before = worker.weights()
    buckets = wire(state, 4096, torch.float32)
    order = list(range(len(buckets)))
    random.Random(0).shuffle(order)  # arrival order is not guaranteed
    assert len(buckets) > 5
    for i in order[:-1]:
        assert worker.receive_bucket(7, i, len(buckets), buckets[i]) == "staged"
        assert worker.ping()["version"] is None
    assert all(torch.equal(v, before[k]) for k, v in worker.weights().items())  # nothing applied yet
    assert worker.receive_bucket(7, order[-1], len(buckets), buckets[order[-1]]) == "complete"
    after = worker.weights()
    assert all(torch.equal(after[k], state[k]) and after[k].dtype == torch.float32 for k in state)
    assert worker.ping()["version"] == 7 and worker.stats()["weights_version"] == 7
    assert worker.engine.policy_version == 7


def test_worker_bf16_push_round_trips_within_bf16_and_its_model_stays_fp32():
    worker, state = plain_worker(), toy_state(seed=2)
    buckets = wire(state, 4096, torch.bfloat16)
    for i, bucket in enumerate(buckets):
        worker.receive_bucket(1, i, len(buckets), bucket)
    after = worker.weights()
    for k, v in state.items():
        assert after[k].dtype == torch.float32
        assert torch.equal(after[k], v.to(torch.bfloat16).float())  # exactly the bf16 rounding
        assert torch.allclose(after[k], v, rtol=2 ** -8, atol=0)
    assert not torch.equal(after["embed"], state["embed"])  # it did go through bf16


def test_worker_refuses_an_older_version_and_ignores_the_same_one(caplog):
    worker = plain_worker()
    worker.set_weights(toy_state(seed=3), 5)
    held = worker.weights()
    with pytest.raises(StaleWeightsError, match="holds weights version 5; refusing the older version 4"):
        worker.receive_bucket(4, 0, 1, wire(toy_state(seed=4), 1 * MiB, torch.float32)[0])
    with caplog.at_level(logging.WARNING, logger="hybrid_rl.rollout"):
        assert worker.receive_bucket(5, 0, 1, wire(toy_state(seed=4), 1 * MiB, torch.float32)[0]) == "ignored"
    assert "already holds weights version 5" in caplog.text
    assert all(torch.equal(v, held[k]) for k, v in worker.weights().items())
    assert worker.ping()["version"] == 5


# ----------------------------------------------------------------------------- a Ray pool end to end


@pytest.fixture(scope="module")
def pool(ray_session):
    from hybrid_rl.rollout.pool import RolloutPool

    cfg = PoolConfig(num_workers=1, num_cpus_per_worker=0.5, torch_threads=1, task_timeout_s=120,
                     sync_bucket_mb=8 / 1024)  # 8 KiB buckets: the toy's 70 KB go in 9
    p = RolloutPool(ToyModel(TOK.vocab_size, seed=0), cfg, SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=4))
    yield p
    p.close()


def wait_for_restart(pool, w: int, old_pid: int, timeout_s: float = 60.0) -> None:
    """Until worker ``w`` answers from a new process (calls fail while Ray restarts it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pool._ray.get(pool.workers[w].ping.remote(), timeout=5)["pid"] != old_pid:
                return
        except Exception:  # the actor is dying or restarting
            pass
        time.sleep(0.2)
    raise AssertionError(f"rollout worker {w} did not restart within {timeout_s} s")


def worker_weights(pool):
    return pool._ray.get(pool.workers[0].weights.remote())


def test_pool_pushes_buckets_fp32_bit_identical_then_bf16_then_a_restarted_worker_gets_them_again(pool):
    state = toy_state(seed=5)
    pool.push_weights(state, 1)
    assert pool.last_push["buckets"] == 9 and pool.last_push["bytes"] == transfer_bytes(state, torch.float32)
    assert all(torch.equal(v, state[k]) for k, v in worker_weights(pool).items())
    assert pool._ray.get(pool.workers[0].ping.remote())["version"] == 1

    pool.cfg.sync_dtype = "bf16"
    try:
        state = toy_state(seed=6)
        pool.push_weights(state, 2)
        assert pool.last_push["bytes"] * 2 == transfer_bytes(state, torch.float32)
        got = worker_weights(pool)
        assert all(v.dtype == torch.float32 and torch.equal(v, state[k].to(torch.bfloat16).float()) for k, v in got.items())
    finally:
        pool.cfg.sync_dtype = "fp32"

    old_pid = pool._ray.get(pool.workers[0].ping.remote())["pid"]
    pool._ray.kill(pool.workers[0], no_restart=False)  # Ray restarts it with its initial weights
    wait_for_restart(pool, 0, old_pid)  # the kill is asynchronous: a ping right after it may reach the old process
    pool._revive(0)
    assert pool.info[0]["version"] is None and pool.info[0]["pid"] != old_pid  # pinged after the restart, before the re-push
    assert pool._ray.get(pool.workers[0].ping.remote())["version"] == 2
    assert all(torch.equal(v, state[k]) for k, v in worker_weights(pool).items())  # re-sent as fp32 is set now


def test_pool_refuses_an_older_version_and_skips_the_same_one(pool, caplog):
    version, last = pool.version, dict(pool.last_push)
    with pytest.raises(StaleWeightsError, match=f"version {version - 1} is older than version {version}"):
        pool.push_weights(toy_state(seed=7), version - 1)
    with caplog.at_level(logging.WARNING, logger="hybrid_rl.rollout"):
        pool.push_weights(toy_state(seed=7), version)
    assert "pushed already" in caplog.text and pool.last_push == last
    assert pool._ray.get(pool.workers[0].ping.remote())["version"] == version


def test_an_object_store_too_small_for_the_buckets_fails_before_any_work(ray_session):
    from hybrid_rl.rollout.pool import RolloutPool

    with pytest.raises(ObjectStoreTooSmallError) as err:
        check_object_store(PoolConfig(sync_bucket_mb=64), 200 * MiB, {"node-a": 512 * MiB, "node-b": 100 * MiB})
    assert "node-b" in str(err.value) and "pool.sync_bucket_mb" in str(err.value)
    assert "--object-store-memory" in str(err.value)
    check_object_store(PoolConfig(sync_bucket_mb=64), 200 * MiB, {"node-a": 512 * MiB})
    check_object_store(PoolConfig(sync_bucket_mb=64), 1 * MiB, {"node-b": 100 * MiB})  # a small model fits

    cpus = ray_session.available_resources().get("CPU")
    big = ToyModel(TOK.vocab_size, dim=4096)  # 76 MB: 2 x 64 MiB buckets x 2 > the session's 150 MB store
    with pytest.raises(ObjectStoreTooSmallError, match=r"Lower pool.sync_bucket_mb to [\d.]+ or less"):
        RolloutPool(big, PoolConfig(num_workers=1, num_cpus_per_worker=0.5, task_timeout_s=120))
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU") != cpus and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU") == cpus  # its worker was let go


# ----------------------------------------------------------------------------- joining a cluster


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_at_once_with_the_command_that_starts_a_head_node(monkeypatch):
    import ray

    from hybrid_rl.rollout.pool import RolloutPool

    address = f"127.0.0.1:{closed_loopback_port()}"
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    t0 = time.monotonic()
    with pytest.raises(RayClusterUnreachableError) as err:
        RolloutPool(ToyModel(TOK.vocab_size), PoolConfig(num_workers=1, address=address))
    assert time.monotonic() - t0 < 5
    message = str(err.value)
    assert address in message and "nothing listens there" in message
    assert "ray start --head --port=6379" in message and "rollout.pool.address=HEAD_IP:6379" in message
    with pytest.raises(RayClusterUnreachableError, match="is not HOST:PORT"):
        check_reachable("my-head-node")
