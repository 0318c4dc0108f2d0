"""2 trainer processes (ddp, fsdp; gloo on CPU) against 1 on the same RL batch: the same loss, metrics and
parameter update. The batch has 7 one-row micro-batches, so one process also runs a zero-weight filler."""

import sys
from pathlib import Path

import pytest
import torch

from hybrid_rl.distributed import rank_share, rank_share_weights, spawn_python

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_update_job  # noqa: E402


@pytest.fixture(scope="module")
def one_process():
    return dist_update_job.run("local")


@pytest.mark.parametrize("strategy,chunk", [("ddp", None), ("fsdp", None), ("fsdp", 16)])
def test_two_processes_give_the_one_process_update(tmp_path, one_process, strategy, chunk):
    """fsdp with a chunked log-prob pass (16 tokens a chunk, inside the sharded model's forward) too."""
    extra = ["fp32", str(chunk)] if chunk else []
    assert spawn_python([str(HERE / "dist_update_job.py"), str(tmp_path), strategy, *extra], 2) == 0
    two = torch.load(tmp_path / f"{strategy}-fp32-{chunk}.pt")
    assert two["world"] == 2
    for a, b in zip(one_process["stats"], two["stats"]):  # two updates: the second starts from the first's weights
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    torch.manual_seed(0)
    before = dist_update_job.HybridLM(dist_update_job.HybridConfig.from_preset("micro")).state_dict()
    assert set(two["state"]) == set(one_process["state"])
    moved = max(float((one_process["state"][k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4  # the update is real
    for name, value in one_process["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-5, msg=name)


def test_chunked_log_prob_pass_gives_the_same_update(one_process):
    chunked = dist_update_job.run("local", chunk=16)
    for a, b in zip(one_process["stats"], chunked["stats"]):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for name, value in one_process["state"].items():
        torch.testing.assert_close(chunked["state"][name], value, rtol=0, atol=1e-5, msg=name)


def test_rank_shares_cover_every_micro_batch_once_and_are_equally_long():
    for n in range(0, 9):
        for world in (1, 2, 3):
            shares = [rank_share(n, r, world) for r in range(world)]
            weights = [rank_share_weights(n, r, world) for r in range(world)]
            assert len({len(s) for s in shares}) == 1 and all(len(s) >= 1 for s in shares)
            real = sorted(i for s, w in zip(shares, weights) for i, x in zip(s, w) if x)
            assert real == list(range(n))
