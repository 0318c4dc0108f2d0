"""The Ray pool on this machine: 2 workers, weight versions, a killed worker, raising envs, a stall.

One pool for the module (worker start-up imports torch in two processes); the stall test, which
restarts a worker, runs last.
"""

import pytest

from helpers import TOK
from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig
from hybrid_rl.rollout.engine import GroupRequest
from hybrid_rl.rollout.logprobs import logprob_mismatch
from rollout_fixtures import FAULTY_ID, ToyLM, ToyModel

HANG_GUARD = pytest.mark.timeout(240) if hasattr(pytest.mark, "timeout") else (lambda f: f)


def toy(seed):
    return ToyLM(vocab_size=TOK.vocab_size, seed=seed)


@pytest.fixture(scope="module")
def pool(ray_session):
    from hybrid_rl.rollout.pool import RolloutPool

    cfg = PoolConfig(num_workers=2, num_cpus_per_worker=0.5, torch_threads=1, task_timeout_s=120)
    p = RolloutPool(ToyModel(TOK.vocab_size, seed=0), cfg, SamplingConfig(seed=0, ascii_only=True),
                    EpisodeConfig(max_turn_tokens=4, max_batch_episodes=8, env_timeout_s=30))
    yield p
    p.close()


def groups(n, samples=2, env_id=FIXED_TURNS_ID, **env_kwargs):
    return [GroupRequest(env_id, seed=s, group_id=s, num_samples=samples, env_kwargs=env_kwargs) for s in range(n)]


def test_two_workers_share_the_groups(pool, tmp_path):
    trajs = pool.run_groups(groups(6, turns=2), jsonl_path=tmp_path / "t.jsonl")
    from hybrid_rl.rollout.trajectory import read_jsonl

    assert read_jsonl(tmp_path / "t.jsonl") == trajs
    assert [(t.group_id, t.sample_index) for t in trajs] == [(g, k) for g in range(6) for k in range(2)]
    assert len({t.worker for t in trajs}) == 2
    assert all(t.status == "terminated" for t in trajs)


def test_weights_pushed_as_version_k_are_used_by_trajectories_marked_k(pool):
    model_a, model_b = toy(11), toy(12)
    for version, model, other in ((1, model_a, model_b), (2, model_b, model_a)):
        pool.push_weights(model.state_dict(), version)
        trajs = pool.run_groups(groups(4, turns=2))
        assert {v for t in trajs for v in t.policy_version} == {version}
        assert logprob_mismatch(model, trajs)["rollout/logprob_mismatch_max"] <= 1e-4
        assert logprob_mismatch(other, trajs)["rollout/logprob_mismatch_max"] > 1e-2  # the check can fail


@HANG_GUARD
def test_a_worker_killed_mid_rollout_loses_no_group(pool, tmp_path):
    model = toy(21)
    pool.push_weights(model.state_dict(), 3)
    marker = tmp_path / "killed"  # the first env step that finds no marker SIGKILLs its worker process
    restarts = pool.restarts
    trajs = pool.run_groups(groups(8, env_id=FAULTY_ID, turns=3, kill_once_file=str(marker)))
    assert marker.exists()
    assert pool.restarts == restarts + 1
    assert [(t.group_id, t.sample_index) for t in trajs] == [(g, k) for g in range(8) for k in range(2)]
    assert all(t.status == "terminated" for t in trajs)
    # the restarted worker got the current weights back before re-running its groups
    assert {v for t in trajs for v in t.policy_version} == {3}
    assert logprob_mismatch(model, trajs)["rollout/logprob_mismatch_max"] <= 1e-4


@HANG_GUARD
def test_weights_pushed_during_a_rollout_land_between_decode_steps(pool, tmp_path):
    import threading
    import time

    model_a, model_b = toy(31), toy(32)
    pool.push_weights(model_a.state_dict(), 5)
    box = {}
    reqs = groups(2, env_id=FAULTY_ID, turns=4, pause_dir=str(tmp_path), pause_at_turn=2)
    thread = threading.Thread(target=lambda: box.update(trajs=pool.run_groups(reqs)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # hang guard only
    while not list(tmp_path.glob("reached-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("reached-*")), "no episode reached turn 2"
    pool.push_weights(model_b.state_dict(), 6)  # while the episodes wait in env.step
    (tmp_path / "go").touch()
    thread.join(120)
    trajs = box["trajs"]
    assert len(trajs) == 4
    for t in trajs:
        assert t.policy_version == sorted(t.policy_version)
        assert set(t.policy_version) == {5, 6}, "every episode was paused at turn 2 when version 6 arrived"
        first_v6 = t.policy_version.index(6)
        assert t.num_turns == 4 and sum(t.is_action[first_v6:]) > 0
    # tokens sampled before the push are model A's
    from hybrid_rl.rollout.logprobs import training_logprobs

    for t, recomputed in zip(trajs, training_logprobs(model_a, trajs)):
        cut = t.policy_version.index(6)
        assert max(abs(a - b) for a, b, m in zip(t.logprobs[:cut], recomputed[:cut], t.is_action[:cut]) if m) <= 1e-4


def test_a_ray_pool_plays_the_episodes_the_in_process_pool_plays(pool):
    """Sampled tokens are keyed by episode and position, and every worker samples the stream of (seed, version):
    two workers sharing the groups play, token for token, what one engine in this process plays (the groups
    split otherwise over the workers, and their rows meet other rows in the batches)."""
    from hybrid_rl.rollout.pool import LocalPool

    model = toy(41)
    local = LocalPool(model, TOK, SamplingConfig(seed=0, ascii_only=True), EpisodeConfig(max_turn_tokens=4, max_batch_episodes=3))
    reqs = groups(6, samples=3, turns=3)
    for version in (17, 18):
        pool.push_weights(model.state_dict(), version)
        local.push_weights(model.state_dict(), version)
        on_ray, here = pool.run_groups(reqs), local.run_groups(reqs)
        assert len({t.worker for t in on_ray}) == 2 and {t.worker for t in here} == {"local"}
        assert [t.token_ids for t in on_ray] == [t.token_ids for t in here]
        flat = lambda trajs: [x for t in trajs for x in t.logprobs]  # noqa: E731
        assert flat(on_ray) == pytest.approx(flat(here), abs=1e-5)
        assert len({tuple(t.token_ids) for t in here}) > len(reqs), "the samples of a group differ"
    assert [t.token_ids for t in pool.run_groups(reqs)] == [t.token_ids for t in on_ray], "same version, same stream"
    local.push_weights(model.state_dict(), 19)
    assert [t.token_ids for t in local.run_groups(reqs)] != [t.token_ids for t in here], "a new version samples anew"
    local.close()


def test_an_env_raising_in_10_percent_of_steps_does_not_stop_the_run(pool):
    trajs = pool.run_groups(groups(20, env_id=FAULTY_ID, turns=3, raise_prob=0.1))
    assert len(trajs) == 40
    failed = [t for t in trajs if t.status == "env_error"]
    assert 1 <= len(failed) < 40
    assert all("injected" in t.error for t in failed)
    assert all(t.status == "terminated" for t in trajs if not t.failed)


def test_pool_evaluate_summarises(pool):
    result = pool.evaluate([FIXED_TURNS_ID], seeds=[0, 1, 2, 3, 4])
    assert result.summary[FIXED_TURNS_ID]["episodes"] == 5
    assert result.summary[FIXED_TURNS_ID]["turns_mean"] == 4


@HANG_GUARD
def test_a_stalled_worker_raises_a_clear_timeout_then_the_pool_recovers(pool):
    from hybrid_rl.rollout.pool import RolloutTimeoutError

    old = pool.cfg.task_timeout_s
    pool.cfg.task_timeout_s = 4.0
    try:
        # env_timeout_s=30 > task timeout: the env hang (60 s) stalls the whole task
        with pytest.raises(RolloutTimeoutError, match="did not return groups"):
            pool.run_groups(groups(2, samples=1, env_id=FAULTY_ID, turns=2, hang_s=60.0, hang_on_seed=0))
    finally:
        pool.cfg.task_timeout_s = old
    trajs = pool.run_groups(groups(2, samples=1, turns=1))
    assert len(trajs) == 2


def test_unplaceable_workers_fail_at_once_with_the_fix():
    from hybrid_rl.rollout.pool import check_resources

    with pytest.raises(ValueError, match="num_cpus_per_worker"):
        check_resources(PoolConfig(num_workers=4, num_cpus_per_worker=1), {"CPU": 2.0})
    with pytest.raises(ValueError, match="num_gpus_per_worker"):
        check_resources(PoolConfig(num_workers=1, num_gpus_per_worker=1), {"CPU": 2.0})
    check_resources(PoolConfig(num_workers=4, num_cpus_per_worker=0.5), {"CPU": 2.0})


def test_the_in_process_pool_samples_the_stream_of_the_sampling_seed_as_the_workers_do():
    """``rollout.sampling.seed`` names the stream for Ray workers and ``LocalPool`` alike; the run's seed only
    stands in when it is unset."""
    from hybrid_rl.rollout.pool import LocalPool

    model, episode = toy(51), EpisodeConfig(max_turn_tokens=4, max_batch_episodes=4)

    def play(sampling_seed, run_seed):
        local = LocalPool(model, TOK, SamplingConfig(seed=sampling_seed, ascii_only=True), episode, seed=run_seed)
        local.push_weights(model.state_dict(), 1)
        try:
            return [t.token_ids for t in local.run_groups(groups(3, samples=2, turns=2))]
        finally:
            local.close()

    assert play(5, 9) == play(None, 5) == play(5, 0)
    assert play(5, 9) != play(None, 9)


OWNERSHIP_SCRIPT = """
import ray
from helpers import TOK
from rollout_fixtures import ToyModel
from hybrid_rl.rollout.config import PoolConfig
from hybrid_rl.rollout.pool import RolloutPool

cfg = PoolConfig(num_workers=1, num_cpus_per_worker=1, ray_num_cpus=1, object_store_mb=100, task_timeout_s=120)
pool = RolloutPool(ToyModel(TOK.vocab_size, seed=0), cfg)
pool.close()
print("own", ray.is_initialized())
try:  # a worker that cannot be placed: the pool fails to start
    RolloutPool(ToyModel(TOK.vocab_size, seed=0), PoolConfig(num_workers=1, num_cpus_per_worker=2, ray_num_cpus=1,
                                                             object_store_mb=100))
except ValueError:
    print("failed", ray.is_initialized())
ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 2 ** 20, log_to_driver=False)
pool = RolloutPool(ToyModel(TOK.vocab_size, seed=0), cfg)
pool.close()
print("given", ray.is_initialized())
ray.shutdown()
"""


def test_a_pool_stops_the_ray_it_started_and_leaves_one_it_was_given():
    """The Ray a pool started goes with its close() (also when the pool fails to start), so a second run in the
    process starts its own with its own pool settings; a Ray the process had before the pool stays up."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-c", OWNERSHIP_SCRIPT], capture_output=True, text=True, env=env, cwd=here,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == ["own False", "failed False", "given True"], out.stdout + out.stderr[-2000:]
