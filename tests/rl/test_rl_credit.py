"""Advantages as the loop builds them: shaping noise stays small, per-turn credit, step-size normalisers,
dynamic sampling with refill, overlong penalty, env weights, and the config checks around them."""

from __future__ import annotations

import pytest

from hybrid_rl.config import load_config
from hybrid_rl.rl.advantages import ADVANTAGES, anchor_state_advantages, anchor_state_advantages_naive, turn_observations
from hybrid_rl.rl.config import RLStageConfig
from hybrid_rl.rl.train import make_batch, play_step, token_advantages, turn_rewards
from hybrid_rl.rollout.trajectory import Trajectory


def _cfg(*overrides):
    return load_config(RLStageConfig, None, ["rollout.max_episode_tokens=64", "train.micro_batch_tokens=256", *overrides])


def _episode(group, rewards, success=None, tokens_per_turn=2, sample=0, env="hybrid_rl/FrozenLake-v1", overlong=()):
    """A trajectory of len(rewards) turns: a 3-token prompt, then per turn its action tokens and a 2-token observation."""
    ids, action = [1, 2, 3], [0, 0, 0]
    for _ in rewards:
        ids += [7] * tokens_per_turn + [4, 5]
        action += [1] * tokens_per_turn + [0, 0]
    n = len(ids)
    return Trajectory(env_id=env, seed=group, group_id=group, sample_index=sample, status="terminated", token_ids=ids,
                      is_action=action, logprobs=[0.0] * n, sample_logprobs=[0.0] * n, policy_version=[0] * n,
                      step_rewards=list(rewards), episode_return=float(sum(rewards)),
                      success=bool(success if success is not None else sum(rewards) > 0.5), num_turns=len(rewards),
                      overlong_turns=list(overlong))


def _fail(group, turns, sample):  # FrozenLake's per-turn cost, then a hole (or the turn limit)
    return _episode(group, [-0.01] * turns, success=False, sample=sample)


def _win(group, turns, sample):
    return _episode(group, [-0.01] * (turns - 1) + [0.99], success=True, sample=sample)


def _adv_by_episode(trajs, cfg):
    adv, _ = token_advantages(trajs, cfg.algo)
    return [max(a, key=abs) if any(a) else 0.0 for a in adv]


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_an_all_fail_group_of_different_lengths_gets_no_unit_sized_advantage(name):
    # group 0: every episode fails, after 2..20 turns (returns -0.02..-0.20); group 1: half succeed
    lengths = [2, 5, 9, 14, 20, 3, 11, 17]
    trajs = [_fail(0, n, i) for i, n in enumerate(lengths)]
    trajs += [_win(1, 6, i) if i % 2 else _fail(1, 6, i) for i in range(8)]
    adv = _adv_by_episode(trajs, _cfg(f"algo.advantage={name}"))
    assert max(abs(a) for a in adv[:8]) < 0.35, adv[:8]  # the shaping term keeps its small scale
    assert min(abs(a) for a in adv[8:]) > 0.45, adv[8:]  # success against failure is what moves the policy
    # alone in its batch too: rloo and drgrpo never rescale; grpo's divisor stops at algo.grpo_std_floor (0.25)
    alone = _adv_by_episode(trajs[:8], _cfg(f"algo.advantage={name}"))
    assert max(abs(a) for a in alone) < (0.45 if name == "grpo" else 0.2), alone
    if name == "grpo":  # alone in its batch with floor 0, the divisor is that group's std (the paper's): unit size
        paper = _adv_by_episode(trajs[:8], _cfg("algo.advantage=grpo", "algo.grpo_std_floor=0"))
        assert max(abs(a) for a in paper) > 1.0, paper


def test_turn_credit_separates_a_good_turn_from_a_fatal_one():
    # 2-turn env: sample 0 earns +0.8 at turn 1 then falls (-1) at turn 2; the others earn nothing and survive
    trajs = [_episode(0, [0.8, -1.0], sample=0), _episode(0, [0.0, 0.0], sample=1), _episode(0, [0.0, 0.0], sample=2)]
    cfg = _cfg("algo.credit=turn", "algo.gamma=0.5")
    adv, valid = token_advantages(trajs, cfg.algo)
    turn_of = trajs[0].action_turn_index()
    turn1 = {a for a, k in zip(adv[0], turn_of) if k == 0}
    turn2 = {a for a, k in zip(adv[0], turn_of) if k == 1}
    assert len(turn1) == len(turn2) == 1 and all(valid)
    assert turn1.pop() > 0 > turn2.pop()  # G_1 = 0.8 - 0.5 * 1 = 0.3 > 0 = the others'; G_2 = -1 < 0
    # episode credit gives every token of sample 0 the same (negative) advantage
    ep_adv, _ = token_advantages(trajs, _cfg().algo)
    assert len({a for a, k in zip(ep_adv[0], turn_of) if k >= 0}) == 1 and ep_adv[0][3] < 0


def test_turn_credit_baseline_comes_from_the_other_samples_at_that_turn():
    # reward-to-go (gamma 1): sample 0 turns (1, 1); sample 1 (0.5, 0.5, 0.5); sample 2 (1,)
    trajs = [_episode(0, [0.0, 1.0], sample=0), _episode(0, [0.0, 0.0, 0.5], sample=1), _episode(0, [1.0], sample=2)]
    adv, _ = token_advantages(trajs, _cfg("algo.credit=turn", "algo.advantage=rloo").algo)
    by_turn = [{k: a for a, k in zip(adv[i], t.action_turn_index()) if k >= 0} for i, t in enumerate(trajs)]
    assert by_turn[0] == {0: 1 - (0.5 + 1) / 2, 1: 1 - 0.5}  # turn 1: only sample 1 is the baseline
    assert by_turn[1] == {0: 0.5 - 1, 1: 0.5 - 1, 2: 0.0}  # turn 2: no other sample reached it -> no baseline, 0
    assert by_turn[2] == {0: 1 - (1 + 0.5) / 2}


def _walk(group, sample, observations, rewards):
    """An episode whose turn k answered observations[k] (the messages as the engine records them)."""
    t = _episode(group, rewards, sample=sample)
    t.messages = [m for obs, act in zip(observations, range(len(rewards))) for m in
                  ({"role": "user", "content": obs}, {"role": "assistant", "content": f"a{act}"})]
    return t


def test_state_credit_separates_the_fatal_move_from_the_same_square():
    # one map, three samples. All start on A. Sample 0: A -> B, then from B steps into a hole.
    # Sample 1: A -> B, then from B steps round it and reaches the goal. Sample 2: A -> C, then falls.
    trajs = [_walk(0, 0, ["A", "B"], [-0.01, -0.01]),
             _walk(0, 1, ["A", "B", "D"], [-0.01, -0.01, 0.99]),
             _walk(0, 2, ["A", "C"], [-0.01, -0.01])]
    cfg = _cfg("algo.credit=state")
    stats: dict = {}
    adv, _ = token_advantages(trajs, cfg.algo, stats)
    by_turn = [{k: a for a, k in zip(adv[i], t.action_turn_index()) if k >= 0} for i, t in enumerate(trajs)]
    episode = _adv_by_episode(trajs, _cfg())  # rloo over returns -0.02, 0.97, -0.02
    # turn 0 (all on A): the step baseline is the others' reward-to-go = the episode's rloo baseline
    assert by_turn[0][0] == pytest.approx(2 * episode[0]) and by_turn[1][0] == pytest.approx(2 * episode[1])
    # turn 1 from B: sample 0 (hole, rtg -0.01) against sample 1 (rtg 0.98), and the other way round
    assert by_turn[0][1] == pytest.approx(episode[0] + (-0.01 - 0.98))
    assert by_turn[1][1] == pytest.approx(episode[1] + (0.98 + 0.01))
    # C and D were seen by one sample only: no step baseline, the episode's advantage alone
    assert by_turn[2][1] == pytest.approx(episode[2]) and by_turn[1][2] == pytest.approx(episode[1])
    # episode credit gives sample 0's two moves one advantage; state credit makes the fatal one the worse
    assert by_turn[0][1] < by_turn[0][0] < 0 < by_turn[1][0]
    assert stats["train/anchored_turns_frac"] == pytest.approx(5 / 7)


def test_state_credit_never_uses_an_episodes_own_revisits_as_its_baseline():
    # sample 0 loops A -> B -> A -> B: its second visit to A must not be compared with its first
    trajs = [_walk(0, 0, ["A", "B", "A", "B"], [-0.01] * 4), _walk(0, 1, ["A", "E"], [-0.01, 0.99])]
    returns = [[-0.04, -0.03, -0.02, -0.01], [0.98, 0.99]]
    adv, anchored = anchor_state_advantages(returns, [0, 0], [["A", "B", "A", "B"], ["A", "E"]], [True, True])
    assert adv[0] == pytest.approx([-0.04 - 0.98, 0.0, -0.02 - 0.98, 0.0])  # B: no other episode saw it
    assert adv[1] == pytest.approx([0.98 - (-0.04 - 0.02) / 2, 0.0]) and anchored == 3
    naive, n_naive = anchor_state_advantages_naive(returns, [0, 0], [["A", "B", "A", "B"], ["A", "E"]], [True, True])
    assert naive == adv and n_naive == anchored
    # a failed episode (env_error) is neither a baseline nor trained
    adv_f, _ = anchor_state_advantages(returns, [0, 0], [["A", "B", "A", "B"], ["A", "E"]], [True, False])
    assert adv_f == [[0.0] * 4, [0.0, 0.0]]


def test_state_credit_fast_and_naive_agree_on_random_groups():
    import random
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 12)
        groups = [rng.randint(0, 2) for _ in range(n)]
        anchors = [[rng.choice("ABCD") for _ in range(rng.randint(1, 6))] for _ in range(n)]
        returns = [[rng.uniform(-1, 1) for _ in a] for a in anchors]
        valid = [rng.random() > 0.2 for _ in range(n)]
        fast, k = anchor_state_advantages(returns, groups, anchors, valid)
        naive, k_naive = anchor_state_advantages_naive(returns, groups, anchors, valid)
        assert k == k_naive
        for f, g in zip(fast, naive):
            assert f == pytest.approx(g)


def test_turn_observations_are_the_messages_each_action_answered():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "o0"}, {"role": "assistant", "content": "a"},
                {"role": "tool", "content": "o1"}, {"role": "assistant", "content": "b"}]
    assert turn_observations(messages, 2) == ["o0", "o1"]
    assert turn_observations(messages, 3) == ["o0", "o1", "o1"]  # a turn the messages do not show: the last observation
    history = turn_observations(messages, 2, "history")
    assert history[0] != history[1] and all("o0" in h for h in history) and "o1" in history[1] and "b" not in history[1]


def test_state_credit_keyed_by_history_does_not_pool_the_same_observation_from_different_states():
    # GuessNumber-like: both samples see "higher" at turn 1, after different guesses; all fail at the limit
    a = _walk(0, 0, ["start", "higher", "higher"], [-0.02] * 3)
    b = _walk(0, 1, ["start", "higher", "lower"], [-0.02] * 3)
    a.messages[1]["content"], b.messages[1]["content"] = "50", "30"  # different first guesses
    by_obs, _ = token_advantages([a, b], _cfg("algo.credit=state", "algo.state_key=observation").algo)
    by_history, _ = token_advantages([a, b], _cfg("algo.credit=state", "algo.state_key=history").algo)
    assert any(x != 0 for x in by_obs[0])  # turn 1's "higher" pooled with turn 2's: turn-count noise
    assert all(x == 0 for x in by_history[0] + by_history[1])  # only the shared start, and equal returns
    # the env names its states (GuessNumber: the interval left): the default key uses them
    a.states, b.states = ["1-100", "51-100", "76-100"], ["1-100", "31-100", "31-40"]
    by_env, _ = token_advantages([a, b], _cfg("algo.credit=state").algo)
    assert by_env == by_history
    # two paths to one interval: 50 "higher", 75 "lower" and 75 "lower", 50 "higher" both leave 51-74 at turn 2,
    # where sample 1 then wins. The env's keys pool the two turn-2 states, the histories never do
    a = _walk(0, 0, ["start", "higher", "lower"], [-0.02] * 3)
    c = _walk(0, 1, ["start", "lower", "higher"], [-0.02, -0.02, 0.98])
    a.messages[1]["content"], a.messages[3]["content"], a.states = "50", "75", ["1-100", "51-100", "51-74"]
    c.messages[1]["content"], c.messages[3]["content"], c.states = "75", "50", ["1-100", "1-74", "51-74"]
    by_env, _ = token_advantages([a, c], _cfg("algo.credit=state").algo)
    by_history, _ = token_advantages([a, c], _cfg("algo.credit=state", "algo.state_key=history").algo)
    assert by_env[0][3] == pytest.approx(by_history[0][3])  # turn 0: the shared start under both keys
    assert by_env[0][7] == pytest.approx(by_history[0][7])  # turn 1: different intervals, different histories
    assert by_env[0][11] == pytest.approx(by_history[0][11] - 1.0)  # turn 2: -0.02 against the winner's 0.98


def test_env_state_keys_fall_back_to_the_observation_where_the_env_names_none():
    messages = [{"role": "user", "content": "o0"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "o1"}, {"role": "assistant", "content": "b"}]
    assert turn_observations(messages, 2, "env", ["", ""]) == ["o0", "o1"] == turn_observations(messages, 2, "env", None)
    keys = turn_observations(messages, 2, "env", ["s0", ""])
    assert keys[1] == "o1" and "s0" in keys[0] and keys[0] != "s0"  # a named state never equals an observation
    assert turn_observations([{"role": "user", "content": "s0"}, {"role": "assistant", "content": "a"}], 1, "env", ["s0"]) != ["s0"]


def test_overlong_turns_are_penalised_and_env_weights_scale_advantages():
    t = _episode(0, [0.0, 1.0], overlong=[0])
    assert turn_rewards(t, _cfg("algo.overlong_penalty=0.5").algo) == [-0.5, 1.0]
    trajs = [_win(0, 3, 0), _fail(0, 3, 1)]
    plain = _adv_by_episode(trajs, _cfg())
    weighted = _adv_by_episode(trajs, _cfg("algo.env_weights={hybrid_rl/FrozenLake-v1: 0.5}", "envs=[hybrid_rl/FrozenLake-v1]"))
    assert weighted == [0.5 * a for a in plain]
    # logged per env: the weight shows in the size of that env's advantages, the other env's are as they were
    both = _cfg("algo.env_weights={hybrid_rl/FrozenLake-v1: 0.5}", "envs=[hybrid_rl/FrozenLake-v1,hybrid_rl/Nim-v0]")
    other = [_win(1, 3, 0), _fail(1, 3, 1)]
    for traj in other:
        traj.env_id = "hybrid_rl/Nim-v0"
    _, stats = make_batch(trajs + other, both, pad_id=0)
    _, unweighted = make_batch(trajs + other, _cfg("envs=[hybrid_rl/FrozenLake-v1,hybrid_rl/Nim-v0]"), pad_id=0)
    assert stats["train/adv_abs_mean/FrozenLake-v1"] == pytest.approx(0.5 * unweighted["train/adv_abs_mean/FrozenLake-v1"])
    assert stats["train/adv_abs_mean/Nim-v0"] == unweighted["train/adv_abs_mean/Nim-v0"] > 0


def test_the_normaliser_counts_every_valid_episode_so_one_informative_group_is_not_a_full_step():
    informative = [_win(0, 3, 0), _fail(0, 3, 1)]
    constant = [_fail(g, 3, i) for g in range(1, 8) for i in range(2)]  # all-equal groups: advantage 0
    alone, _ = make_batch(informative, _cfg(), pad_id=0)
    among, stats = make_batch(informative + constant, _cfg(), pad_id=0)
    assert among.num_rows == 2  # the advantage-0 episodes are skipped (compute) ...
    assert among.norm_tokens == 8 * alone.norm_tokens  # ... but still count in the normaliser
    assert stats["train/informative_episodes_frac"] == pytest.approx(2 / 16)
    assert stats["train/adv_abs_mean"] == pytest.approx(1.0)  # over the trained tokens only


class ScriptedPool:
    """Plays every request with fixed outcomes: groups whose seed is divisible by 3 are informative."""

    def __init__(self):
        self.rounds = []

    def run_groups(self, requests):
        self.rounds.append([r.group_id for r in requests])
        out = []
        for r in requests:
            for i in range(r.num_samples):
                ok = r.seed % 3 == 0 and i == 0
                out.append(_win(r.group_id, 2, i) if ok else _fail(r.group_id, 2, i))
        return out


def test_dynamic_sampling_refills_until_the_step_has_enough_informative_groups():
    from hybrid_rl import envs

    cfg = _cfg("algo.dynamic_sampling=true", "algo.max_refill_rounds=6", "rollout.prompts_per_step=4",
               "rollout.samples_per_prompt=2", "envs=[hybrid_rl/FrozenLake-v1]", "algo.dynamic_sampling_filter=advantage")
    pool = ScriptedPool()
    played, kept, stats = play_step(pool, cfg, step=1)
    assert len({t.group_id for t in kept}) == 4
    assert all(t.seed % 3 == 0 for t in kept)
    assert stats["rollout/groups_played"] == len({t.group_id for t in played}) == 4 * len(pool.rounds)
    assert stats["rollout/groups_dropped"] == stats["rollout/groups_played"] - 4
    assert stats["rollout/refill_rounds"] == len(pool.rounds) - 1 >= 1
    ids = [g for r in pool.rounds for g in r]
    assert len(ids) == len(set(ids))  # every round plays new groups
    seeds = envs.seeds("hybrid_rl/FrozenLake-v1", "train", 200)
    step0 = {t.seed for t in play_step(ScriptedPool(), cfg, step=0)[0]}
    assert not step0 & {t.seed for t in played} and {t.seed for t in played} <= set(seeds)  # steps never share seeds
    capped = _cfg("algo.dynamic_sampling=true", "algo.max_refill_rounds=0", "rollout.prompts_per_step=4",
                  "rollout.samples_per_prompt=2", "envs=[hybrid_rl/FrozenLake-v1]", "algo.dynamic_sampling_filter=advantage")
    _, kept_capped, stats_capped = play_step(ScriptedPool(), capped, step=1)
    assert stats_capped["rollout/refill_rounds"] == 0 and len({t.group_id for t in kept_capped}) < 4


def test_dynamic_sampling_cuts_the_last_round_evenly_across_envs():
    """Two envs whose groups are informative equally often: the groups kept over many steps are shared equally.
    The last round's informative groups were taken in group-id order, numbered env by env, so the first env
    listed always won the last places (58% / 42% here)."""
    envs = ["hybrid_rl/FrozenLake-v1", "hybrid_rl/GuessNumber-v0"]

    class HalfInformative(ScriptedPool):
        def run_groups(self, requests):
            out = []
            for r in reversed(requests):  # a pool returns groups in the order they finished
                ok = (r.seed * 2654435761) % 97 < 58
                out += [_episode(r.group_id, [1.0 if ok and i == 0 else 0.0], sample=i, env=r.env_id)
                        for i in range(r.num_samples)]
            return out

    cfg = _cfg("algo.dynamic_sampling=true", "algo.max_refill_rounds=4", "rollout.prompts_per_step=4",
               "rollout.samples_per_prompt=2", f"envs=[{envs[0]}, {envs[1]}]", "algo.dynamic_sampling_filter=success")
    kept = {env: 0 for env in envs}
    for step in range(150):
        _, trajs, _ = play_step(HalfInformative(), cfg, step)
        assert len({t.group_id for t in trajs}) == 4
        for g in {(t.env_id, t.group_id) for t in trajs}:
            kept[g[0]] += 1
    share = kept[envs[0]] / sum(kept.values())
    assert abs(share - 0.5) < 0.03, kept


def test_dapo_filter_keeps_groups_whose_outcomes_differ_not_those_that_differ_only_by_shaping():
    # every group fails, but with different episode lengths (per-turn cost): informative by advantage, not by outcome
    class AllFail(ScriptedPool):
        def run_groups(self, requests):
            self.rounds.append([r.group_id for r in requests])
            return [_fail(r.group_id, 2 + i, i) for r in requests for i in range(r.num_samples)]

    common = ["algo.dynamic_sampling=true", "algo.max_refill_rounds=2", "rollout.prompts_per_step=2",
              "rollout.samples_per_prompt=2", "envs=[hybrid_rl/FrozenLake-v1]"]
    _, kept, stats = play_step(AllFail(), _cfg(*common), step=0)
    assert kept == [] and stats["rollout/refill_rounds"] == 2 and stats["rollout/groups_dropped"] == 6
    _, kept_adv, _ = play_step(AllFail(), _cfg(*common, "algo.dynamic_sampling_filter=advantage"), step=0)
    assert len({t.group_id for t in kept_adv}) == 2
    _, kept_mixed, _ = play_step(ScriptedPool(), _cfg(*common), step=0)
    assert all(len({t.success for t in kept_mixed if t.group_id == g}) == 2 for g in {t.group_id for t in kept_mixed})


@pytest.mark.parametrize("override, expected", [
    ("rollout.sampling.temperature=0", ["temperature", "> 0", "greedy"]),
    ("algo.credit=turn algo.policy_loss=gspo", ["gspo", "credit=turn"]),
    ("algo.credit=state algo.policy_loss=gspo", ["gspo", "credit=state"]),
    ("algo.credit=state algo.state_weight=-1", ["state_weight", ">= 0"]),
    ("algo.env_weights={hybrid_rl/Taxi-v3:2.0}", ["env_weights", "Taxi"]),
    ("algo.gamma=0", ["gamma", "(0, 1]"]),
    ("algo.entropy_coef=.nan", ["entropy_coef", "finite number", "nan"]),
    ("algo.kl_beta=.nan", ["kl_beta", "finite number"]),  # nan == 0 is false: it silently kept zero-advantage episodes
    ("algo.env_weights.FrozenLake-v1=.inf", ["env_weights", "finite", "inf"]),  # 0 x inf = NaN advantages
    ("algo.credit=step", ["algo.credit", "'turn'"]),
])
def test_bad_algo_settings_are_named(override, expected):
    with pytest.raises(Exception) as err:
        _cfg(*override.split())
    for piece in expected:
        assert piece in str(err.value), str(err.value)


def test_settings_the_chosen_credit_or_loss_ignores_are_named_in_a_warning(caplog):
    """gamma under episode credit, clip_eps_high under grpo's symmetric clip, reinforce on stale samples: accepted,
    but a warning says they do nothing (or train without a ratio); the defaults and the shipped recipes warn nothing."""
    from hybrid_rl.rl.config import AlgoConfig

    with caplog.at_level("WARNING", logger="hybrid_rl.rl"):
        AlgoConfig()
        AlgoConfig(credit="state", gamma=0.9, state_weight=0.5, state_key="observation")
        AlgoConfig(policy_loss="dapo", clip_eps_high=0.3)
        AlgoConfig(policy_loss="reinforce")
        from hybrid_rl.config import CONFIG_DIR
        from hybrid_rl.pipeline.recipe import PipelineStageConfig

        load_config(RLStageConfig, CONFIG_DIR / "rl_quick.yaml")
        for name in ("quickstart.yaml", "math_tool.yaml"):
            load_config(PipelineStageConfig, CONFIG_DIR / name)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    cases = [(dict(gamma=0.5), "gamma=0.5"), (dict(policy_loss="grpo", clip_eps_high=0.3), "clip_eps_high=0.3"),
             (dict(credit="turn", state_weight=2.0), "state_weight=2.0"),
             (dict(seq_clip_eps_high=1e-3), "seq_clip_eps_high=0.001"),
             # kl-cov's loss is the unclipped ratio (rl/losses.py); gspo clips its sequence ratio with seq_clip_eps_*
             (dict(policy_loss="kl-cov", mode="async", clip_eps_high=0.9), "clip_eps_high=0.9"),
             (dict(policy_loss="gspo", clip_eps_low=0.1), "clip_eps_low=0.1"),
             (dict(policy_loss="reinforce", mode="async"), "reinforce takes no ratio"),
             (dict(policy_loss="reinforce", updates_per_batch=2), "updates_per_batch=2")]
    for kwargs, message in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="hybrid_rl.rl"):
            AlgoConfig(**kwargs)
        assert any(message in r.getMessage() for r in caplog.records), (kwargs, [r.getMessage() for r in caplog.records])
