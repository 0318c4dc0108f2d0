"""hybrid_rl.checkpoint: atomic step_N directories, keep-last pruning, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybrid_rl.checkpoint import (
    TRAINER_STATE, latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint,
)


def _writer(payload: str):
    def write(directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.txt").write_text(payload)
    return write


def test_save_load_round_trip_and_rng_restored(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = save_checkpoint(tmp_path, 7, _writer("w7"), {"step": 7, "cursor": {"epoch": 1, "batch": 4}})
    assert path == tmp_path / "step_7" and (path / "model.txt").read_text() == "w7"
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(100)  # advance every generator
    random.random()
    np.random.rand(5)
    state = load_trainer_state(path)
    assert state["step"] == 7 and state["cursor"] == {"epoch": 1, "batch": 4}
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


def test_keep_last_prunes_oldest_and_latest_is_highest_step(tmp_path):
    for step in (2, 10, 4, 6):
        save_checkpoint(tmp_path, step, _writer(str(step)), {"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"


def test_crashed_save_is_never_picked_up_and_is_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _writer("1"), {"step": 1})

    def crash(directory):
        directory.mkdir(parents=True)
        (directory / "model.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, crash, {"step": 2})
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"
    assert not (tmp_path / "step_2").exists()
    save_checkpoint(tmp_path, 2, _writer("2"), {"step": 2})  # the retry removes the leftover temp dir
    assert latest_checkpoint(tmp_path) == tmp_path / "step_2"
    assert not list(tmp_path.glob(".step_2.tmp-*"))


def test_resaving_a_step_replaces_it_whole(tmp_path):
    save_checkpoint(tmp_path, 3, _writer("old"), {"step": 3, "v": 0})
    save_checkpoint(tmp_path, 3, _writer("new"), {"step": 3, "v": 1})
    assert (tmp_path / "step_3" / "model.txt").read_text() == "new"
    assert load_trainer_state(tmp_path / "step_3", restore_rng=False)["v"] == 1


def test_a_dir_without_trainer_state_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_5").mkdir()
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match=TRAINER_STATE):
        load_trainer_state(tmp_path / "step_5")


def test_cuda_rng_states_of_more_gpus_than_visible_restore_those_visible(monkeypatch):
    # a run saved on a machine with 3 visible GPUs, resumed with 1 (CUDA_VISIBLE_DEVICES): torch's
    # set_rng_state_all indexed a generator that does not exist (IndexError)
    from hybrid_rl import checkpoint

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", seen.append)
    state = checkpoint.rng_state()
    checkpoint.set_rng_state({**state, "cuda": ["gpu0", "gpu1", "gpu2"]})
    assert seen == [["gpu0"]]
