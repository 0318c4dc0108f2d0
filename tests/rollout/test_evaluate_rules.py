"""The stages' evals play by the training rollouts' turn rules: RL's in-loop eval and the pipeline's final eval
take ``rollout.sampling.stop_strings`` / ``ascii_only`` and ``rollout.env_timeout_s`` / ``end_on_invalid_action``
(they were played with the defaults, so a policy trained with turns cut at a stop string was evaluated without
the cut); the SFT stage's eval takes its own ``eval.*`` keys of the same names, which the pipeline sets from RL's."""

from collections import Counter

import pytest

from hybrid_rl.config import load_config
from hybrid_rl.rl.config import RLStageConfig
from hybrid_rl.rl.train import evaluate_policy
from hybrid_rl.sft.config import SFTStageConfig
from hybrid_rl.sft.train import run_eval
from helpers import TOK, make_model

ENV = "hybrid_rl/GuessNumber-v0"


def _eval(*overrides):
    cfg = load_config(RLStageConfig, None, [f"envs=[{ENV}]", "rollout.max_turn_tokens=8", "rollout.max_episode_tokens=256",
                                            "eval.episodes_per_env=3", *overrides])
    return evaluate_policy(make_model("micro"), TOK, cfg)[1]


def test_an_unparsable_action_ends_the_eval_episode_when_it_ends_a_training_one():
    plain, ending = _eval(), _eval("rollout.end_on_invalid_action=true")
    assert all(t.status == "invalid_action" and t.num_turns == 1 for t in ending)  # a random model writes no number
    assert all(t.status != "invalid_action" and t.num_turns > 1 for t in plain)


def test_eval_turns_end_at_the_rollouts_stop_strings_and_keep_their_byte_ban():
    plain = _eval()
    texts = [m["content"] for t in plain for m in t.messages if m["role"] == "assistant"]
    seen = Counter(c for text in texts for c in text if c.isascii() and c.isprintable() and c not in " '\\\"")
    stop = seen.most_common(1)[0][0]  # a character the model writes: the rule has something to cut
    cut = _eval(f"rollout.sampling.stop_strings=['{stop}']", "rollout.sampling.ascii_only=true")
    actions = [m["content"] for t in cut for m in t.messages if m["role"] == "assistant"]
    assert actions and all(a.isascii() for a in actions)
    assert all(stop not in a[:-len(stop)] for a in actions)  # the turn ended at its first stop string
    assert any(a.endswith(stop) for a in actions)
    assert any(not text.isascii() for text in texts)  # without the ban a random byte model writes non-ASCII bytes


def test_the_sft_stages_eval_plays_by_its_turn_rules(tmp_path):
    class Logger:
        def log(self, metrics, step):
            self.metrics = metrics

        def log_samples(self, rows, step):
            self.rows = rows

    def turns(*overrides):
        cfg = load_config(SFTStageConfig, None, [f"data.envs=[{{env_id: {ENV}, episodes: 2}}]", "eval.max_turn_tokens=8",
                                                 "eval.episodes_per_env=3", *overrides])
        logger = Logger()
        run_eval(make_model("micro"), TOK, cfg, [], logger, step=0)
        return logger.metrics["eval/turns"], logger.metrics["eval/invalid_actions"]

    assert turns("eval.end_on_invalid_action=true") == (1.0, 1.0)  # a random model writes no number: ended at once
    assert turns()[0] > 1
    with pytest.raises(ValueError, match="stop_strings may not hold an empty string"):
        load_config(SFTStageConfig, None, ["eval.stop_strings=['']"])
