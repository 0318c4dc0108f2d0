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
