"""2 trainer processes (ddp, fsdp; gloo on CPU) against 1 on the same RL batch: the same loss, metrics and
parameter update. The batch packs into 5 micro-batches, so one process also runs a zero-weight filler."""

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
    # the experts' counts too (the balancing step's input): 5 micro-batches, so rank 1 plays a zero-weight filler
    # whose tokens were counted as load
    ranks = [torch.load(tmp_path / f"{strategy}-fp32-{chunk}-loads-{r}.pt") for r in range(2)]
    for name, value in one_process["loads"].items():
        got = sum(next(v for k, v in rank.items() if k.endswith(name)) for rank in ranks)
        assert torch.equal(got, value), name


@pytest.mark.parametrize("dtype,offload", [("fp32", True), ("bf16", False)])
def test_fsdp_reference_policy_is_sharded_and_computes_as_the_policy(tmp_path, dtype, offload):
    """With a KL term under fsdp the frozen reference is sharded like the policy (each process holds half of it),
    in the dtype the policy computes in, so the first update's KL is exactly 0 (the two models are equal); its
    passes are collectives, and the rank that runs a filler micro-batch runs one more (5 micro-batches on 2
    processes). fp32, with the reference in host memory between passes: the one-process update with the KL term."""
    args = [str(HERE / "dist_update_job.py"), str(tmp_path), "fsdp", dtype, "None", "0.1"] + (["offload"] if offload else [])
    assert spawn_python(args, 2) == 0
    tag = f"fsdp-{dtype}-None-kl0.1" + ("-offload" if offload else "")
    two = torch.load(tmp_path / f"{tag}.pt")
    assert two["stats"][0]["train/kl"] == 0.0 and two["stats"][1]["train/kl"] > 1e-3  # the second update moved away
    torch.manual_seed(0)
    total = sum(p.numel() for p in dist_update_job.HybridLM(dist_update_job.HybridConfig.from_preset("micro")).parameters())
    for rank in range(2):
        shares = torch.load(tmp_path / f"{tag}-ref-{rank}.pt")
        assert shares["reference"]["numel"] == shares["policy"]["numel"] < 0.55 * total
        assert shares["reference"]["dtypes"] == (["torch.bfloat16"] if dtype == "bf16" else ["torch.float32"])
        assert shares["records"] == 0  # FSDP2's forward-order records, which only a backward clears, do not pile up
    if dtype == "fp32":
        assert_same_update(dist_update_job.run("local", kl=0.1), two, atol=2e-5)


def test_chunked_log_prob_pass_gives_the_same_update(one_process):
    assert_same_update(one_process, dist_update_job.run("local", chunk=16))


def assert_same_update(one: dict, other: dict, atol: float = 1e-5) -> None:
    """The same metrics of both updates (rel 1e-5) and the same weights after them (within ``atol``)."""
    for a, b in zip(one["stats"], other["stats"]):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for name, value in one["state"].items():
        torch.testing.assert_close(other["state"][name], value, rtol=0, atol=atol, msg=name)


def test_rank_shares_cover_every_micro_batch_once_and_are_equally_long():
    for n in range(0, 9):
        for world in (1, 2, 3):
            shares = [rank_share(n, r, world) for r in range(world)]
            weights = [rank_share_weights(n, r, world) for r in range(world)]
            assert len({len(s) for s in shares}) == 1 and all(len(s) >= 1 for s in shares)
            real = sorted(i for s, w in zip(shares, weights) for i, x in zip(s, w) if x)
            assert real == list(range(n))


def test_adamw_is_fused_on_plain_parameters_and_steps_like_the_loop():
    """The trainers' AdamW uses the fused kernel on plain CPU/GPU parameters (as TRL's default does), with the
    per-op loop's result; a parameter of another tensor type (FSDP2's DTensor) keeps the default."""
    from hybrid_rl.distributed import adamw

    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    w_loop = [torch.nn.Parameter(p.detach().clone()) for p in w]
    fused, loop = adamw(w, lr=0.1, weight_decay=0.01), torch.optim.AdamW(w_loop, lr=0.1, weight_decay=0.01, fused=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for ps in (w, w_loop):
            for p in ps:
                p.grad = torch.sin(p.detach() * 3)
        fused.step()
        loop.step()
    for a, b in zip(w, w_loop):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    groups = adamw([{"params": [w[0]], "weight_decay": 0.1}, {"params": [w[1]], "weight_decay": 0.0}], lr=0.1)
    assert groups.defaults["fused"] is True and [g["weight_decay"] for g in groups.param_groups] == [0.1, 0.0]

    class Sharded(torch.Tensor):  # stands for a tensor subclass such as DTensor
        pass

    odd = torch.randn(2).as_subclass(Sharded).requires_grad_(True)
    assert not adamw([odd], lr=0.1).defaults.get("fused")
