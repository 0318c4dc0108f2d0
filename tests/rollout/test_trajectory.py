import pytest

from hybrid_rl.rollout.trajectory import Trajectory, read_jsonl, write_jsonl


def make_traj(**kw):
    base = dict(env_id="hybrid_rl/GuessNumber-v0", seed=3, group_id=1, status="terminated",
                messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "7"}],
                token_ids=[1, 4, 2, 7], is_action=[0, 0, 1, 1], logprobs=[0, 0, -0.5, -0.25],
                sample_logprobs=[0, 0, -0.4, -0.2], policy_version=[2, 2, 2, 2], step_rewards=[1.0],
                episode_return=1.0, success=True, num_turns=1)
    base.update(kw)
    return Trajectory(**base)


def test_jsonl_round_trip(tmp_path):
    trajs = [make_traj(), make_traj(seed=4, status="env_error", error="boom", routed_experts=[[[0, 1]]] * 4)]
    path = write_jsonl(trajs, tmp_path / "t.jsonl")
    back = read_jsonl(path)
    assert back == trajs
    assert back[1].failed and not back[0].failed
    assert Trajectory.from_json(trajs[0].to_json()) == trajs[0]


def test_bad_status_and_bad_lengths_are_named():
    with pytest.raises(ValueError, match="status 'done'"):
        make_traj(status="done")
    with pytest.raises(ValueError, match="logprobs"):
        make_traj(logprobs=[0.0]).check()
    with pytest.raises(ValueError, match="unknown Trajectory field"):
        Trajectory.from_dict({**make_traj().to_dict(), "extra": 1})


def test_the_two_part_eval_names_are_the_mean_over_environments():
    """docs/METRICS.md: ``eval/success`` is the mean over environments. It was the mean over their pooled valid
    episodes, so an env with fewer failed episodes weighed more (A 10/10, B 2 scored of 10: 0.83, not 0.5)."""
    from hybrid_rl.rollout.evaluate import metrics_from_summary, summarize
    from hybrid_rl.rollout.trajectory import Trajectory

    trajs = [Trajectory(env_id="a/A-v0", seed=i, status="terminated", success=True) for i in range(10)]
    trajs += [Trajectory(env_id="b/B-v0", seed=i, status="env_error" if i < 8 else "terminated") for i in range(10)]
    metrics = metrics_from_summary(summarize(trajs))
    assert metrics["eval/success/a.A-v0"] == 1.0 and metrics["eval/success/b.B-v0"] == 0.0
    assert metrics["eval/success"] == 0.5 and metrics["eval/env_errors"] == 0.4
    summary = summarize(trajs)["all"]
    assert summary["episodes"] == 20 and summary["failed"] == 8
    # an env none of whose episodes could be scored is left out of the mean
    trajs += [Trajectory(env_id="c/C-v0", seed=i, status="timeout") for i in range(4)]
    assert metrics_from_summary(summarize(trajs))["eval/success"] == 0.5

    # a training step's rollout/* figures stay over its pooled episodes (their env shares follow env_weights)
    from hybrid_rl.rollout.evaluate import rollout_metrics

    batch = [Trajectory(env_id="a/A-v0", seed=i, status="terminated", success=True) for i in range(6)]
    batch += [Trajectory(env_id="b/B-v0", seed=i, status="terminated") for i in range(2)]
    assert rollout_metrics(batch)["rollout/success"] == 0.75
