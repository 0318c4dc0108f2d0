"""Every registered environment passes the checker; the checker itself catches broken envs."""

import gymnasium as gym
import pytest

from hybrid_rl import envs
from hybrid_rl.envs.checker import SUCCESS_FLOOR, check


def test_every_builtin_passes_the_check(env_id):
    report = check(env_id, episodes=100)
    assert report.passed, report.format()
    assert report.expert["episodes"] == 100
    if env_id != "hybrid_rl/Blackjack-v1":
        assert report.expert["success_rate"] >= SUCCESS_FLOOR, report.format()


def test_blackjack_expert_is_reported_not_demanded():
    report = check("Blackjack-v1", episodes=300)
    assert report.passed
    assert 0.3 < report.expert["success_rate"] < 0.6  # basic strategy wins ~43% of hands


def test_every_registered_id_passes_the_check():
    failed = [r.format() for r in (check(i, episodes=20) for i in envs.env_ids()) if not r.passed]
    assert not failed, "\n".join(failed)


class _Broken(envs.TextEnv):
    """Raises on empty actions and misreports its reward components."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observe("Say hi.")

    def step_text(self, text):
        if not text:
            raise ValueError("empty")
        obs, reward, term, trunc, info = self.result("ok", {"success": 1.0}, terminated=True, success=True)
        return obs, reward + 0.5, term, trunc, info

    def expert_action(self, noise=None):
        return "hi"


class _Unsolved(_Broken):
    """Its expert never wins."""

    def step_text(self, text):
        return self.result("no", {}, terminated=True)


@pytest.fixture
def registered():
    added = []

    def register(name, cls):
        gym.register(id=f"hybrid_rl_test/{name}", entry_point=cls, max_episode_steps=2)
        added.append(f"hybrid_rl_test/{name}")
        return added[-1]

    yield register
    for env_id in added:
        gym.registry.pop(env_id, None)


def test_check_catches_raising_steps_and_wrong_reward_components(registered):
    report = check(registered("Broken-v0", _Broken), episodes=5)
    assert not report.passed
    assert "step(empty) raised ValueError" in report.results["bad_actions"]
    assert "reward_components" in report.results["info_contract"]


def test_check_demands_a_winning_expert_on_solvable_envs(registered):
    report = check(registered("Unsolved-v0", _Unsolved), episodes=5)
    assert "expert success 0.0% < 99%" in report.results["expert"]
    _Unsolved.solvable = False
    try:
        assert check("hybrid_rl_test/Unsolved-v0", episodes=5).results["expert"] == "ok"
    finally:
        del _Unsolved.solvable


class _NumberState(_Unsolved):
    """Names its state with a number, not a str."""

    def state_key(self):
        return 3

    def _with_state(self, info):
        info["state"] = self.state_key()
        return info


def test_check_demands_a_string_state(registered):
    report = check(registered("NumberState-v0", _NumberState), episodes=5)
    assert "info['state'] is int; name the state with a str" in report.results["info_contract"]


class _HangsOnAnswer(_Broken):
    """A step that never returns (for a test: 20 s) on the expert's answer."""

    def step_text(self, text):
        if text == "hi":
            import time

            time.sleep(20)
        return self.result("no", {}, terminated=True)


class _NanReward(_Broken):
    def step_text(self, text):
        return self.result("ok", {"success": float("nan")}, terminated=True)


def test_a_check_that_hangs_fails_and_the_others_still_run(registered):
    """`envs check` on a step that never returned hung with no output."""
    report = check(registered("HangsOnAnswer-v0", _HangsOnAnswer), episodes=2, timeout_s=1.0)
    assert report.results["expert"].startswith("did not finish within 1 s") and "--timeout" in report.results["expert"]
    assert report.results["bad_actions"] == "ok"


def test_a_nan_reward_is_reported_as_such_not_as_nondeterminism(registered):
    """nan != nan made two equal episodes 'differ', with both traces (kilobytes) printed."""
    report = check(registered("NanReward-v0", _NanReward), episodes=2)
    assert report.results["determinism"] == "ok"
    assert "reward nan is not a finite number" in report.results["info_contract"]


class _EndsOnStop(_Broken):
    """Ends only when told 'stop': without a turn limit, an episode of anything else never ends."""

    def step_text(self, text):
        if text.strip() == "stop":
            return self.result("bye", {"success": 1.0}, terminated=True, success=True)
        return self.result("go on", {})

    def expert_action(self, noise=None):
        return "stop"


def test_an_env_without_a_turn_limit_is_warned_about_not_played_forever():
    """Its determinism check played until the check's timeout (300 s, silent) and was reported as hung."""
    gym.register(id="hybrid_rl_test/EndsOnStop-v0", entry_point=_EndsOnStop)  # no max_episode_steps
    try:
        report = check("hybrid_rl_test/EndsOnStop-v0", episodes=3, timeout_s=60)
        assert report.passed, report.format()
        assert any("no max_episode_steps" in w for w in report.warnings)
    finally:
        gym.registry.pop("hybrid_rl_test/EndsOnStop-v0", None)
