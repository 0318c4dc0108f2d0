"""The engine plays a fixed set of episodes exactly as it did when the recording was made.

Speed work on the engine (how rows are batched into forwards, when stop strings are checked, how
environments are stepped) must not change what it plays: for the same seeds, the same token ids,
statuses and routed experts, and the same log-probs up to the round-off between the model's decode and
extend paths (which the model's tests hold to 1e-4). The recording in ``data/engine_recording.json``
covers sampling at temperature 1 with continuous batching (more episodes than rows), a stop string,
forced closes at the turn limit, routing records and both test models.

Regenerate it only when a change is meant to alter what the engine plays:
``.venv/bin/python tests/rollout/test_engine_recording.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TOK, make_model  # noqa: E402

from hybrid_rl.benchmarks.fixed_turns import FIXED_TURNS_ID  # noqa: E402
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig  # noqa: E402
from hybrid_rl.rollout.engine import Engine, GroupRequest  # noqa: E402

RECORDING = Path(__file__).parent / "data" / "engine_recording.json"
KEYS = ("token_ids", "is_action", "status", "num_turns", "overlong_turns", "step_rewards", "routed_experts")


def play_fixed_set(kind: str) -> dict[str, dict]:
    """3 groups x 3 samples of 3-turn FixedTurns on 4 rows -> {"group/sample": the trajectory's record}."""
    routing = kind != "toy"
    engine = Engine(make_model(kind), TOK, SamplingConfig(seed=0, ascii_only=True, stop_strings=["q"]),
                    EpisodeConfig(max_turn_tokens=6, max_batch_episodes=4, env_timeout_s=0, record_routing=routing))
    requests = [GroupRequest(FIXED_TURNS_ID, seed=g, group_id=g, num_samples=3,
                             env_kwargs={"turns": 3, "obs_len": 16}) for g in range(3)]
    out = {}
    for traj in engine.play(requests):
        record = {key: getattr(traj, key) for key in KEYS}
        record.update(logprobs=traj.logprobs, sample_logprobs=traj.sample_logprobs)
        out[f"{traj.group_id}/{traj.sample_index}"] = record
    return out


@pytest.mark.parametrize("kind", ["toy", "micro"])
def test_engine_plays_the_recorded_episodes(kind):
    if kind != "toy":
        pytest.importorskip("hybrid_rl.model.hybrid")
    recorded = json.loads(RECORDING.read_text())[kind]
    played = play_fixed_set(kind)
    assert sorted(played) == sorted(recorded)
    for name, want in recorded.items():
        got = played[name]
        for key in KEYS:
            assert got[key] == want[key], f"episode {name}: {key} differs from the recording"
        for key in ("logprobs", "sample_logprobs"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), f"episode {name}: {key}"


if __name__ == "__main__":
    RECORDING.parent.mkdir(exist_ok=True)
    RECORDING.write_text(json.dumps({kind: play_fixed_set(kind) for kind in ("toy", "micro")}) + "\n")
    print(f"wrote {RECORDING}")
