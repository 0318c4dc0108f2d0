"""The engine over a model: token format, log-prob agreement, continuous batching, extension, faults."""

import math
import time

import pytest
import torch

from helpers import TOK, forced_close_positions, make_model
from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID, FixedTurnsEnv
from hybrid_rl.rollout import logprobs as lp
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig
from hybrid_rl.rollout.engine import Engine, GroupRequest
from hybrid_rl.rollout.evaluate import evaluate
from rollout_fixtures import FAULTY_ID


def play(model, requests, sampling=None, episode=None, **kw):
    engine = Engine(model, TOK, sampling or SamplingConfig(seed=0, ascii_only=True),
                    episode or EpisodeConfig(max_turn_tokens=6, max_batch_episodes=4), **kw)
    return engine, engine.play(requests)


def groups(n, samples=1, env_id=FIXED_TURNS_ID, **env_kwargs):
    return [GroupRequest(env_id, seed=s, group_id=s, num_samples=samples, env_kwargs=env_kwargs) for s in range(n)]


def test_ids_equal_render_chat_of_the_conversation(model_kind):
    model = make_model(model_kind)
    _, trajs = play(model, groups(3, samples=2, turns=3))
    assert len(trajs) == 6
    saw_forced = False
    for t in trajs:
        ids, mask = TOK.render_chat(t.messages)
        assert t.token_ids == ids
        forced = forced_close_positions(t)
        saw_forced |= bool(forced)
        # identical mask except at closing tokens the engine added itself (not sampled: not trained on)
        assert [m for i, m in enumerate(mask) if i not in forced] == [a for i, a in enumerate(t.is_action) if i not in forced]
        assert all(mask[i] == 1 and t.is_action[i] == 0 for i in forced)
        assert t.status == "terminated" and t.num_turns == 3
    assert saw_forced, "max_turn_tokens=6 should cut some turns"


@pytest.mark.parametrize("sampling", [SamplingConfig(seed=1), SamplingConfig(seed=2, temperature=0.7, top_p=0.9, top_k=40)])
def test_rollout_logprobs_equal_training_forward(model_kind, sampling):
    """Multi-turn episodes and forked GRPO groups; plain-softmax log-probs agree to 1e-4 in fp32."""
    model = make_model(model_kind)
    _, trajs = play(model, groups(3, samples=3, turns=3), sampling=sampling,
                    episode=EpisodeConfig(max_turn_tokens=8, max_batch_episodes=5))
    assert sum(t.num_turns for t in trajs) == 27
    stats = lp.logprob_mismatch(model, trajs)
    assert stats["rollout/logprob_mismatch_tokens"] > 100
    assert stats["rollout/logprob_mismatch_max"] <= 1e-4
    # the batched helper equals its naive twin
    naive = lp.naive_training_logprobs(model, trajs[0])
    assert lp.training_logprobs(model, trajs[:3])[0] == pytest.approx(naive, abs=1e-5)
    # sample_logprobs: under the distribution sampled from (specials banned and renormalised, so at
    # temperature 1 without truncation a token is at least as likely there as under the plain softmax)
    acts = [(a, b) for t in trajs for a, b, m in zip(t.logprobs, t.sample_logprobs, t.is_action) if m]
    if sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0:
        assert all(b >= a - 1e-6 for a, b in acts)
    else:
        assert max(abs(a - b) for a, b in acts) > 1e-3


class SpyModel(torch.nn.Module):
    """Records every decoding call: (kind, batch rows, tokens per row)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.config = getattr(inner, "config", None)
        self.vocab_size = getattr(inner, "vocab_size", None)

    def new_cache(self, n):
        return self.inner.new_cache(n)

    def extend(self, cache, tokens, **kw):
        self.calls.append(("extend", len(tokens), [len(t) for t in tokens]))
        return self.inner.extend(cache, tokens, **kw)

    def decode_step(self, cache, ids, **kw):
        self.calls.append(("decode", len(ids), [1] * len(ids)))
        return self.inner.decode_step(cache, ids, **kw)


def test_continuous_batching_refills_rows_at_once():
    spy = SpyModel(make_model("toy"))
    reqs = [GroupRequest(FIXED_TURNS_ID, s, s, env_kwargs={"turns": 1 + s % 3}) for s in range(9)]
    # stop strings on common letters give turns of random length, so rows fall out of step
    sampling = SamplingConfig(seed=0, ascii_only=True, stop_strings=list("abcdefghij"))
    engine = Engine(spy, TOK, sampling, EpisodeConfig(max_turn_tokens=12, max_batch_episodes=3))
    engine.batch_trace = []
    trajs = engine.play(reqs)
    assert sorted(t.seed for t in trajs) == list(range(9))
    sizes = engine.batch_trace
    assert max(sizes) == 3 and max(b for _, b, _ in spy.calls) <= 3
    # every sampling step is full while episodes wait, then the batch drains: once below 3, never back up
    first_drop = next(i for i, b in enumerate(sizes) if b < 3)
    assert first_drop > 0 and all(b < 3 for b in sizes[first_drop:])
    assert sizes[first_drop:] == sorted(sizes[first_drop:], reverse=True)
    # only the rows at a turn boundary extend with their observation (a boundary does not pad the other
    # rows' forward to the observation's length), and a decode step feeds one token to each row it takes
    assert any(kind == "extend" and rows < 3 and max(per_row) > 1 for kind, rows, per_row in spy.calls)
    assert all(min(per_row) > 0 for _, _, per_row in spy.calls)
    assert all(per_row == [1] * rows for kind, rows, per_row in spy.calls if kind == "decode")


def test_history_is_never_prefilled_twice_and_groups_prefill_once():
    spy = SpyModel(make_model("toy"))
    engine, trajs = play(spy, groups(2, samples=4, turns=3), episode=EpisodeConfig(max_turn_tokens=5, max_batch_episodes=8))
    fed = sum(sum(per_row) for _, _, per_row in spy.calls)
    prompt_len = {t.group_id: t.token_ids.index(TOK.role_ids["assistant"]) + 1 for t in trajs}
    # every token is fed exactly once, except the shared prompt of a group (fed once for its 4 samples)
    # and the end of the last turn: its last sampled token and the closing tokens after it, which nothing
    # reads (a turn's end is fed with the next observation, and the episode ended instead)
    unfed = sum(len(t.token_ids) - max(i for i, a in enumerate(t.is_action) if a) for t in trajs)
    expected = sum(len(t.token_ids) for t in trajs) - unfed - sum(3 * n for n in prompt_len.values())
    assert fed == expected
    assert engine.stats["fed_tokens"] + engine.stats["prefill_tokens"] == expected
    assert engine.stats["prefill_tokens"] == sum(prompt_len.values())


def test_reprefill_baseline_plays_the_same_greedy_episodes():
    model = make_model("toy")
    greedy = SamplingConfig(temperature=0.0)
    ep = EpisodeConfig(max_turn_tokens=5, max_batch_episodes=3)
    _, fast = play(model, groups(4, turns=3), sampling=greedy, episode=ep)
    slow_engine, slow = play(model, groups(4, turns=3), sampling=greedy, episode=ep, reprefill=True)
    key = lambda t: t.seed  # noqa: E731
    assert [t.token_ids for t in sorted(fast, key=key)] == [t.token_ids for t in sorted(slow, key=key)]
    flat = lambda ts: [x for t in sorted(ts, key=key) for x in t.logprobs]  # noqa: E731
    assert flat(fast) == pytest.approx(flat(slow), abs=1e-5)


def test_token_limits_per_turn_and_per_episode():
    model = make_model("toy")
    _, trajs = play(model, groups(3, turns=10), episode=EpisodeConfig(max_turn_tokens=4, max_episode_tokens=120))
    for t in trajs:
        assert len(t.token_ids) <= 120
        assert t.status == "truncated" and "max_episode_tokens" in t.error
        assert TOK.render_chat(t.messages)[0] == t.token_ids
        # no turn generated more than 4 action tokens
        run = 0
        for a in t.is_action:
            run = run + 1 if a else 0
            assert run <= 4


def test_a_prompt_that_does_not_fit_the_episode_is_warned_about_once_per_env(caplog):
    """Such episodes end before the model's first turn: scored, with nothing to train on. Nothing said so."""
    _, trajs = play(make_model("toy"), groups(3, samples=2), episode=EpisodeConfig(max_turn_tokens=4, max_episode_tokens=8))
    assert all(t.status == "truncated" and t.num_action_tokens == 0 and "leaves no room" in t.error for t in trajs)
    warned = [r.getMessage() for r in caplog.records if "leaves no room" in r.getMessage()]
    assert len(warned) == 1 and "max_episode_tokens=8" in warned[0] and "rollout.max_episode_tokens" in warned[0]


def test_stop_strings_end_the_turn():
    model = make_model("toy")
    greedy = SamplingConfig(temperature=0.0, ascii_only=True)
    _, base = play(model, groups(1, turns=1), sampling=greedy, episode=EpisodeConfig(max_turn_tokens=12))
    action = base[0].messages[-1]["content"]
    assert len(action) >= 4
    stop = action[2:4]
    _, cut = play(model, groups(1, turns=1), sampling=SamplingConfig(temperature=0.0, ascii_only=True, stop_strings=[stop]),
                  episode=EpisodeConfig(max_turn_tokens=12))
    assert cut[0].messages[-1]["content"] == action[:action.index(stop) + len(stop)]
    assert TOK.render_chat(cut[0].messages)[0] == cut[0].token_ids


def test_env_errors_and_hangs_end_only_their_episode():
    model = make_model("toy")
    reqs = [GroupRequest(FAULTY_ID, s, s, num_samples=2, env_kwargs={"raise_prob": 0.1, "turns": 4, "hang_s": 3.0,
                                                                      "hang_on_seed": 5}) for s in range(12)]
    _, trajs = play(model, reqs, episode=EpisodeConfig(max_turn_tokens=4, max_batch_episodes=6, env_timeout_s=0.5))
    assert len(trajs) == 24
    status = [t.status for t in trajs]
    assert status.count("env_error") >= 1
    assert {t.status for t in trajs if t.seed == 5} == {"timeout"}
    assert status.count("terminated") >= 12
    for t in trajs:
        t.check()
        if t.failed:
            assert t.error
    result_ok = [t for t in trajs if not t.failed]
    assert all(t.num_turns == 4 for t in result_ok)


def test_an_env_whose_close_hangs_does_not_hold_the_eval(monkeypatch, caplog):
    """Closing the pool waited for every env's close(): one that hung held an eval that had its results forever."""
    import hybrid_rl.rollout.envpool as envpool

    monkeypatch.setattr(envpool, "CLOSE_TIMEOUT_S", 0.3)
    engine, trajs = play(make_model("toy"), groups(2, env_id=FAULTY_ID, turns=2, close_hang_s=30))
    t0 = time.perf_counter()
    engine.close()
    assert time.perf_counter() - t0 < 20 and len(trajs) == 2  # (its close sleeps 30 s)
    assert "did not all close within 0.3 s" in caplog.text and "FaultyEnv" in caplog.text


def test_invalid_action_can_end_the_episode():
    from hybrid_rl.envs.guess_number import GuessNumber  # noqa: F401  (registers the built-ins)

    model = make_model("toy")
    _, trajs = play(model, groups(2, env_id="hybrid_rl/GuessNumber-v0"),
                    episode=EpisodeConfig(max_turn_tokens=4, end_on_invalid_action=True))
    for t in trajs:
        assert t.num_invalid_actions <= 1
        if t.num_invalid_actions:
            assert t.status == "invalid_action"


def test_policy_version_is_recorded_per_token():
    model = make_model("toy")
    engine = Engine(model, TOK, SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=3), policy_version=7)
    calls = []

    def bump():  # the worker's hook: new weights arrive between decode steps
        calls.append(1)
        if len(calls) == 6:
            engine.policy_version = 8

    engine.step_hook = bump
    trajs = engine.play(groups(2, turns=3))
    versions = {v for t in trajs for v in t.policy_version}
    assert versions == {7, 8}
    for t in trajs:
        assert t.policy_version == sorted(t.policy_version)


@pytest.mark.parametrize("says_changed", [None, True])
def test_weights_loaded_by_the_step_hook_reach_the_next_forwards(says_changed):
    """The engine plays in the model's ``steady_weights`` scope: a step hook that edits the weights in place and
    does not return False has them read before the next forward. Here it zeroes the head: every logit 0, so
    each token sampled from a later forward has plain log-prob -log V."""
    model = make_model("micro")
    engine = Engine(model, TOK, SamplingConfig(seed=0, ascii_only=True), EpisodeConfig(max_turn_tokens=4),
                    policy_version=7)
    calls = []

    def load():
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                model.lm_head.weight.zero_()
            engine.policy_version = 8
            return says_changed
        return False

    engine.step_hook = load
    trajs = engine.play(groups(2, samples=2, turns=3))
    late = []
    for t in trajs:
        acts = [(lp_, v) for lp_, v, a in zip(t.logprobs, t.policy_version, t.is_action) if a]
        after = [lp_ for lp_, v in acts if v == 8][1:]  # the first was sampled from the forward before the hook
        late += after
    assert len(late) > 10
    assert late == pytest.approx([-math.log(model.config.vocab_size)] * len(late), abs=1e-5)


def test_routed_experts_are_recorded_and_replay_reproduces_logprobs():
    pytest.importorskip("hybrid_rl.model")
    model = make_model("micro")
    _, trajs = play(model, groups(1, samples=2, turns=2), episode=EpisodeConfig(max_turn_tokens=5, record_routing=True))
    n_moe, k = model.config.layer_pattern.count("E"), model.config.num_experts_per_tok
    for t in trajs:
        r = torch.tensor(t.routed_experts)
        assert r.shape == (len(t.token_ids), n_moe, k)
        assert r.min() >= 0
    free = lp.logprob_mismatch(model, trajs)
    replay = lp.logprob_mismatch(model, trajs, replay_routing=True)
    assert free["rollout/logprob_mismatch_max"] <= 1e-4
    assert replay["rollout/logprob_mismatch_max"] <= 1e-4


def test_evaluate_in_process_summarises_per_env():
    model = make_model("toy")
    result = evaluate(model, TOK, [FIXED_TURNS_ID], seeds=[0, 1, 2, 3], episode=EpisodeConfig(max_turn_tokens=4))
    stats = result.summary[FIXED_TURNS_ID]
    assert stats["episodes"] == 4 and stats["failed"] == 0
    assert stats["turns_mean"] == 4
    assert 0.0 <= stats["success_rate"] <= 1.0
    assert "success" in result.table() and FIXED_TURNS_ID in result.table()
    metrics = result.metrics()
    assert metrics["eval/turns/hybrid_rl_bench.FixedTurns-v0"] == 4 and metrics["eval/turns"] == 4
    assert metrics["eval/env_errors"] == 0


def test_env_returning_non_text_is_an_env_error(monkeypatch):
    monkeypatch.setattr(FixedTurnsEnv, "_obs", lambda self: 42 if self._t == 1 else "ok")
    _, trajs = play(make_model("toy"), groups(2, turns=3))
    assert {t.status for t in trajs} == {"env_error"}
    assert all("expected str" in t.error and t.num_turns == 1 for t in trajs)


def test_import_rollout_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, hybrid_rl.rollout as rollout; rollout.evaluate; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_group_larger_than_the_batch_is_forked_in_parts_from_one_prefill():
    spy = SpyModel(make_model("toy"))
    engine, trajs = play(spy, groups(2, samples=5, turns=2), episode=EpisodeConfig(max_turn_tokens=4, max_batch_episodes=3))
    assert sorted((t.group_id, t.sample_index) for t in trajs) == [(g, k) for g in range(2) for k in range(5)]
    prompt_len = trajs[0].token_ids.index(TOK.role_ids["assistant"]) + 1
    assert engine.stats["prefill_tokens"] == 2 * prompt_len
    for g in range(2):  # the samples of a group start from the same prompt and then differ
        same = [t for t in trajs if t.group_id == g]
        assert len({tuple(t.token_ids[:prompt_len]) for t in same}) == 1
        assert len({tuple(t.token_ids) for t in same}) > 1


def test_continuous_batching_plays_the_same_greedy_episodes_as_one_at_a_time():
    """The naive twin of the batched engine: each episode alone in a batch of one. (For the real model,
    batched rows against the training forward is test_rollout_logprobs_equal_training_forward.)"""
    model = make_model("toy")
    greedy = SamplingConfig(temperature=0.0, ascii_only=True)
    reqs = [GroupRequest(FIXED_TURNS_ID, s, s, env_kwargs={"turns": 1 + s % 3}) for s in range(5)]
    _, batched = play(model, reqs, sampling=greedy, episode=EpisodeConfig(max_turn_tokens=5, max_batch_episodes=3))
    _, alone = play(model, reqs, sampling=greedy, episode=EpisodeConfig(max_turn_tokens=5, max_batch_episodes=1))
    by_seed = lambda ts: {t.seed: t for t in ts}  # noqa: E731
    b, a = by_seed(batched), by_seed(alone)
    assert [b[s].token_ids for s in range(5)] == [a[s].token_ids for s in range(5)]
    flat = lambda d: [x for s in range(5) for x in d[s].logprobs]  # noqa: E731
    assert flat(b) == pytest.approx(flat(a), abs=1e-4)


def test_sampled_episodes_do_not_depend_on_their_batch(model_kind):
    """At temperature 1 an episode's tokens are drawn from uniforms keyed by the episode and the position, so
    the batch size, the order of the requests and the other groups beside it change none of them."""
    model = make_model(model_kind)
    reqs = [GroupRequest(FIXED_TURNS_ID, s, s, num_samples=3, env_kwargs={"turns": 1 + s % 3}) for s in range(4)]

    def run(requests, rows):
        _, trajs = play(model, requests, episode=EpisodeConfig(max_turn_tokens=5, max_batch_episodes=rows))
        return {(t.group_id, t.sample_index): t for t in trajs}

    wide, narrow, reverse, alone = run(reqs, 12), run(reqs, 2), run(reqs[::-1], 5), run(reqs[2:3], 1)
    assert sorted(wide) == sorted(narrow) == sorted(reverse)
    for key, t in wide.items():
        assert narrow[key].token_ids == t.token_ids == reverse[key].token_ids
        assert narrow[key].sample_logprobs == pytest.approx(t.sample_logprobs, abs=1e-4)
    assert [alone[(2, k)].token_ids for k in range(3)] == [wide[(2, k)].token_ids for k in range(3)]
    assert len({tuple(t.token_ids) for t in wide.values()}) > 4, "samples differ: the test can fail"
    _, other_seed = play(model, reqs, sampling=SamplingConfig(seed=1, ascii_only=True))
    assert sorted(t.token_ids for t in other_seed) != sorted(t.token_ids for t in wide.values())


def test_rows_ending_a_turn_together_step_their_envs_concurrently():
    """Each step waits at a barrier for all 3 episodes' steps: sequential stepping would break it."""
    import threading

    import gymnasium

    class BarrierEnv(FixedTurnsEnv):
        instant_steps = False  # its steps block (on each other): worker threads

        def __init__(self, barrier=None, **kw):
            super().__init__(**kw)
            self.barrier = barrier

        def step(self, action):
            self.barrier.wait(timeout=30)  # BrokenBarrierError -> env_error if the steps were sequential
            return super().step(action)

    if "hybrid_rl_test/Barrier-v0" not in gymnasium.registry:
        gymnasium.register("hybrid_rl_test/Barrier-v0", entry_point=BarrierEnv, disable_env_checker=True)
    barrier = threading.Barrier(3)
    reqs = [GroupRequest("hybrid_rl_test/Barrier-v0", s, s, env_kwargs={"barrier": barrier, "turns": 2}) for s in range(3)]
    engine = Engine(make_model("toy"), TOK, SamplingConfig(seed=0),
                    EpisodeConfig(max_turn_tokens=4, max_batch_episodes=3, env_timeout_s=60))
    engine.banned_v[TOK.end_id] = True  # every turn runs to max_turn_tokens: the 3 rows end turns together
    trajs = engine.play(reqs)
    assert [t.status for t in trajs] == ["terminated"] * 3


def test_an_env_step_with_the_wrong_arity_is_an_env_error(monkeypatch):
    monkeypatch.setattr(FixedTurnsEnv, "step", lambda self, action: ("obs", 0.0, False, {}))
    _, trajs = play(make_model("toy"), groups(2, turns=2), episode=EpisodeConfig(max_turn_tokens=3, env_timeout_s=0))
    assert {t.status for t in trajs} == {"env_error"}
    assert all("ValueError" in t.error for t in trajs)


def test_turns_closed_at_the_token_limit_and_reward_components_are_recorded_per_turn():
    from hybrid_rl import envs

    model = make_model("toy")
    _, trajs = play(model, [GroupRequest("hybrid_rl/FrozenLake-v1", seed=s, group_id=s) for s in range(3)],
                    episode=EpisodeConfig(max_turn_tokens=2, max_episode_tokens=600))
    for t in trajs:
        assert len(t.reward_components) == len(t.step_rewards) == t.num_turns
        for parts, r in zip(t.reward_components, t.step_rewards):
            assert abs(sum(parts.values()) - r) < 1e-9 and parts.keys() & {"turn", "invalid"}  # FrozenLake's named parts
        # a turn is overlong when it filled its 2 tokens without the model ending it
        turn_of = t.action_turn_index()
        lengths = [turn_of.count(k) for k in range(t.num_turns)]
        ended = [t.token_ids[max(i for i, k in enumerate(turn_of) if k == turn)] == TOK.end_id for turn in range(t.num_turns)]
        assert t.overlong_turns == [k for k in range(t.num_turns) if lengths[k] == 2 and not ended[k]]
    assert any(t.overlong_turns for t in trajs)
    assert envs  # the built-ins are registered


def test_the_env_named_state_of_every_turn_is_recorded():
    from hybrid_rl import envs

    # GuessNumber names its state (the interval the feedback leaves); FrozenLake does not (its observation is it)
    _, trajs = play(make_model("toy"), [GroupRequest("hybrid_rl/GuessNumber-v0", seed=s, group_id=s, num_samples=2)
                                        for s in range(2)] + [GroupRequest("hybrid_rl/FrozenLake-v1", seed=0, group_id=9)],
                    episode=EpisodeConfig(max_turn_tokens=3, max_episode_tokens=600))
    for t in trajs:
        if t.env_id.endswith("FrozenLake-v1"):
            assert t.states == [""] * t.num_turns
            continue
        assert len(t.states) == t.num_turns and t.states[0] == "1-16"
        env = envs.make(t.env_id)  # replay the actions: each state is the one the env was in before that action
        _, info = env.reset(seed=t.seed)
        expected = [info["state"]]
        for m in [m for m in t.messages if m["role"] == "assistant"][:-1]:
            expected.append(env.step(m["content"])[4]["state"])
        assert t.states == expected


def test_finished_rows_ride_along_until_compaction_without_changing_any_episode(monkeypatch):
    """Finished rows stay in the batch (left out of the decode steps, no cache copy) until a quarter of it is
    done or waiting episodes need the room; a row's decode does not depend on its batch, so every episode is
    the one eager compaction plays, token for token and log-prob for log-prob."""
    model = make_model("toy")
    requests = lambda: groups(3, samples=4, turns=3) + [  # noqa: E731  episodes that end before the others
        GroupRequest(FIXED_TURNS_ID, seed=10 * turns + s, group_id=10 * turns + s, num_samples=1,
                     env_kwargs={"turns": turns}) for turns in (1, 2) for s in range(3)]
    episode = EpisodeConfig(max_turn_tokens=6, max_batch_episodes=18)  # every episode admitted at once

    def run(fraction):
        monkeypatch.setattr(Engine, "DEAD_ROWS_FRACTION", fraction)
        engine, trajs = play(model, requests(), episode=episode)
        key = lambda t: (t.group_id, t.seed, t.sample_index)  # noqa: E731
        return engine, [(t.token_ids, t.logprobs, t.sample_logprobs) for t in sorted(trajs, key=key)]

    default = Engine.DEAD_ROWS_FRACTION
    eager_engine, eager = run(0.0)
    lazy_engine, lazy = run(default)
    assert eager_engine.stats["compactions"] >= lazy_engine.stats["compactions"] >= 1
    assert lazy == eager
    assert lazy_engine.stats["generated_tokens"] == eager_engine.stats["generated_tokens"]


def test_a_slow_environment_does_not_hold_the_other_rows(tmp_path):
    """An env step runs beside the batch: while one episode's environment is stuck in ``step`` (a rendezvous
    it leaves only when the test says so), the other episodes play to their end. An engine that waited
    for every step before decoding would stall here until the step's time limit."""
    paused = GroupRequest(FAULTY_ID, seed=0, group_id=0, env_kwargs={"turns": 3, "pause_dir": str(tmp_path),
                                                                      "pause_at_turn": 1})
    others = [GroupRequest(FAULTY_ID, seed=s, group_id=s, num_samples=2, env_kwargs={"turns": 3}) for s in (1, 2)]
    engine = Engine(make_model("micro"), TOK, SamplingConfig(seed=0, ascii_only=True),
                    EpisodeConfig(max_turn_tokens=6, max_batch_episodes=8, env_timeout_s=60))

    def release():  # before every pass: once the four others are done, let the paused step return
        if engine.stats["episodes"] == 4 and list(tmp_path.glob("reached-*")):
            (tmp_path / "go").touch()

    engine.step_hook = release
    trajs = engine.play([paused, *others])
    assert [t.seed for t in trajs][-1] == 0 and sorted(t.seed for t in trajs[:4]) == [1, 1, 2, 2]
    assert all(t.status == "terminated" and t.num_turns == 3 for t in trajs)


def test_episodes_do_not_depend_on_when_their_rows_are_fed():
    """Rows wait for their environment on different schedules (a slow step on one seed or another, so the
    rows feed their observations in other forwards, beside other rows). A row's arithmetic does not depend
    on its batch and its samples are keyed by episode and position, so every episode is the same, token
    for token and log-prob for log-prob."""
    model = make_model("micro")
    sampling = SamplingConfig(seed=3, temperature=0.9, top_p=0.95, ascii_only=True)

    def run(hang_s, seed):
        reqs = [GroupRequest(FAULTY_ID, seed=s, group_id=s, num_samples=3,
                             env_kwargs={"turns": 3, "hang_s": hang_s, "hang_on_seed": seed}) for s in range(3)]
        engine, trajs = play(model, reqs, sampling=sampling, episode=EpisodeConfig(max_turn_tokens=6, max_batch_episodes=6))
        return {(t.seed, t.sample_index): (t.token_ids, t.logprobs, t.sample_logprobs) for t in trajs}

    base = run(0.0, -1)
    assert len(base) == 9
    for hang_s, seed in ((0.2, 1), (0.1, 0), (0.1, 2)):
        assert run(hang_s, seed) == base


def test_an_instant_env_answers_within_the_pass_its_turn_ended(monkeypatch):
    """After sampling, a pass waits a moment (``ENV_GRACE_S``) for the environments of the turns that just
    ended: an instant one answers in it, and its row feeds the observation in this pass's forward instead of
    sitting one out. The same episodes, in no more forwards than without the wait."""
    model = make_model("micro")
    sampling = SamplingConfig(seed=1, temperature=1.0, ascii_only=True)
    episode = EpisodeConfig(max_turn_tokens=6, max_batch_episodes=6)
    monkeypatch.setattr(FixedTurnsEnv, "instant_steps", False)  # on the worker threads, where the wait matters
    runs = {}
    for grace_s in (0.0, 30.0):
        monkeypatch.setattr(Engine, "ENV_GRACE_S", grace_s)
        engine, trajs = play(model, groups(3, samples=2, turns=3), sampling=sampling, episode=episode)
        runs[grace_s] = (engine.stats, {(t.seed, t.sample_index): (t.token_ids, t.logprobs) for t in trajs})
    (no_wait, base), (waited, same) = runs[0.0], runs[30.0]
    assert same == base and len(base) == 6
    assert waited["forward_calls"] <= no_wait["forward_calls"]
    assert waited["idle_row_steps"] <= no_wait["idle_row_steps"]


def test_an_env_that_declares_instant_steps_steps_on_the_engines_thread(monkeypatch, caplog):
    """``instant_steps``: the env's reset and steps run on the thread that plays (no hand-off to a worker),
    and the episodes are token for token those played with the env on the worker threads. An env that
    declares it but takes longer than ``INSTANT_LIMIT_S`` goes back to the workers, with a warning, once two
    of its calls did and they are at least half of its calls; slow calls now and then do not move it."""
    import threading
    import time as time_mod

    model = make_model("micro")
    sampling = SamplingConfig(seed=3, temperature=1.0, ascii_only=True)
    episode = EpisodeConfig(max_turn_tokens=6, max_batch_episodes=4)
    threads: list[int] = []
    step = FixedTurnsEnv.step

    def recorded_step(self, action):
        threads.append(threading.get_ident())
        return step(self, action)

    monkeypatch.setattr(FixedTurnsEnv, "step", recorded_step)
    runs = {}
    for instant in (True, False):
        monkeypatch.setattr(FixedTurnsEnv, "instant_steps", instant)
        threads.clear()
        _, trajs = play(model, groups(3, samples=2, turns=3), sampling=sampling, episode=episode)
        runs[instant] = {(t.seed, t.sample_index): (t.token_ids, t.logprobs, t.step_rewards) for t in trajs}
        on_engine_thread = {ident == threading.get_ident() for ident in threads}
        assert on_engine_thread == {instant} and len(threads) == 18
    assert runs[True] == runs[False] and len(runs[True]) == 6

    def slow_step(self, action):
        threads.append(threading.get_ident())
        time_mod.sleep(0.02)
        return step(self, action)

    monkeypatch.setattr(FixedTurnsEnv, "instant_steps", True)
    monkeypatch.setattr(FixedTurnsEnv, "step", slow_step)
    threads.clear()
    with caplog.at_level("WARNING", logger="hybrid_rl.rollout"):
        engine, trajs = play(model, groups(3, samples=2, turns=3), sampling=sampling, episode=episode)
    assert {(t.seed, t.sample_index): (t.token_ids, t.logprobs, t.step_rewards) for t in trajs} == runs[True]
    # two slow calls on the engine's thread (Engine.SLOW_INLINE_CALLS), then the worker threads
    assert threads[:2] == [threading.get_ident()] * 2 and set(threads[2:]) and threading.get_ident() not in threads[2:]
    assert FixedTurnsEnv in engine._not_instant
    assert "FixedTurnsEnv declare instant_steps" in caplog.text and "worker threads" in caplog.text

    # slow calls now and then (stalls of this thread, a first call's set-up) leave the class on the engine's
    # thread: here the 1st and the 5th step of 18 (2 slow calls, but not half of its calls)
    stalls = iter([0.02, 0.0, 0.0, 0.0, 0.02])

    def one_stall(self, action):
        threads.append(threading.get_ident())
        time_mod.sleep(next(stalls, 0.0))
        return step(self, action)

    monkeypatch.setattr(FixedTurnsEnv, "step", one_stall)
    threads.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hybrid_rl.rollout"):
        engine, trajs = play(model, groups(3, samples=2, turns=3), sampling=sampling, episode=episode)
    assert {(t.seed, t.sample_index): (t.token_ids, t.logprobs, t.step_rewards) for t in trajs} == runs[True]
    assert set(threads) == {threading.get_ident()} and len(threads) == 18
    assert not engine._not_instant and "instant_steps" not in caplog.text


def test_instant_steps_are_declared_by_the_pure_builtin_games_only():
    """The built-in games step inline; the environments that run code or a verifier, and plain gymnasium
    envs without the attribute, stay on the worker threads (``steps_instantly``)."""
    from hybrid_rl import envs
    from hybrid_rl.rollout.envpool import steps_instantly

    for env_id in ("hybrid_rl/FrozenLake-v1", "hybrid_rl/Buttons-v0", "hybrid_rl/Nim-v0", "hybrid_rl/Arithmetic-v0"):
        assert steps_instantly(envs.make(env_id)), env_id
    for env_id in ("hybrid_rl/PythonTool-v0", "hybrid_rl/MathWords-v0", "hybrid_rl/Calculator-v0"):
        assert not steps_instantly(envs.make(env_id)), env_id
    assert not steps_instantly(object())
    assert steps_instantly(FixedTurnsEnv()) and not steps_instantly(FixedTurnsEnv(step_delay_s=0.05))


def test_ctrl_c_in_an_instant_env_step_stops_the_engine(monkeypatch):
    """An instant env steps on the engine's thread, so a KeyboardInterrupt raised in its step (Ctrl-C) stops
    ``play`` as it would anywhere else, instead of being booked as that episode's env error."""
    import pytest

    def interrupted(self, action):
        raise KeyboardInterrupt

    monkeypatch.setattr(FixedTurnsEnv, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        play(make_model("toy"), groups(2, turns=2), episode=EpisodeConfig(max_turn_tokens=3))


@pytest.mark.parametrize("reward", [float("nan"), float("inf")])
def test_a_non_finite_reward_is_an_env_error_of_its_episode_only(monkeypatch, reward):
    """One NaN reward would make every advantage of its batch NaN (group and batch statistics): it ends its
    own episode, and the other episodes play on."""
    step = FixedTurnsEnv.step

    def bad_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        return obs, (reward if self._seed == 1 else r), terminated, truncated, info

    monkeypatch.setattr(FixedTurnsEnv, "step", bad_step)
    _, trajs = play(make_model("toy"), groups(3, turns=2))
    by_seed = {t.seed: t for t in trajs}
    assert by_seed[1].status == "env_error" and "finite" in by_seed[1].error
    assert by_seed[0].status == by_seed[2].status == "terminated"
    assert all(map(math.isfinite, by_seed[0].step_rewards + by_seed[2].step_rewards))


def test_an_info_that_is_not_a_dict_is_an_env_error_of_its_episode_only(monkeypatch):
    """gymnasium's checker looks at the first step only: a later step's info of the wrong type ends its episode
    with a message, instead of crashing play() and losing the batch."""
    step = FixedTurnsEnv.step

    def bad_step(self, action):
        obs, r, terminated, truncated, info = step(self, action)
        return obs, r, terminated, truncated, (["x"] if self._seed == 0 and self._t == 2 else info)

    monkeypatch.setattr(FixedTurnsEnv, "step", bad_step)
    engine, trajs = play(make_model("toy"), groups(2, turns=3))
    by_seed = {t.seed: t for t in trajs}
    assert by_seed[0].status == "env_error" and "info of type list" in by_seed[0].error
    assert by_seed[0].num_turns == 2 and by_seed[1].status == "terminated"


def test_a_reset_info_that_is_not_a_dict_is_an_env_error(monkeypatch):
    monkeypatch.setattr(FixedTurnsEnv, "reset", lambda self, seed=None, options=None: ("hello", "not a dict"))
    _, trajs = play(make_model("toy"), groups(2, turns=2))
    assert {t.status for t in trajs} == {"env_error"}
    assert all("info of type str" in t.error for t in trajs)


def test_an_unknown_env_id_after_good_groups_leaves_their_envs_in_the_pool(monkeypatch):
    """The groups before the bad one took envs when play() raised for its id: they go back to the pool, none is lost
    or left open outside it."""
    closed = []
    monkeypatch.setattr(FixedTurnsEnv, "close", lambda self: closed.append(self), raising=False)
    engine = Engine(make_model("toy"), TOK, SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=3, max_batch_episodes=8))
    bad = GroupRequest("hybrid_rl/NoSuchEnv-v0", seed=9, group_id=9, num_samples=2)
    with pytest.raises(Exception, match="NoSuchEnv"):
        engine.play(groups(2, samples=2, turns=3) + [bad])
    assert len(engine.envs) == 4 and not closed
    engine.close()
    assert len(closed) == 4


def test_an_exception_in_play_closes_the_environments_in_flight(monkeypatch):
    """An error that ends play() (here: the model's forward) leaves no environment open outside the pool."""
    closed = []
    monkeypatch.setattr(FixedTurnsEnv, "close", lambda self: closed.append(self), raising=False)
    engine = Engine(make_model("toy"), TOK, SamplingConfig(seed=0), EpisodeConfig(max_turn_tokens=3))
    calls = []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected forward failure")
        return Engine._forward(engine, *args, **kwargs)

    engine._forward = failing_forward
    with pytest.raises(RuntimeError, match="injected"):
        engine.play(groups(2, samples=2, turns=3))
    deadline = time.monotonic() + 10  # broken envs are closed on a background thread
    while len(closed) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(closed) == 4 and len(engine.envs) == 0
