"""One RL update on a fixed batch, in each process of a launched group (or alone): writes the loss, the
metrics and the updated full weights to OUT/<strategy>.pt from the main process.

    python dist_update_job.py OUT STRATEGY [DTYPE [CHUNK [KL [offload]]]]

KL (0.1, say): the loss has a KL term to a frozen reference (``Parallel.frozen_copy``; alone, a plain copy),
and each process also writes its share of the reference's elements and their dtypes to OUT; ``offload``:
the reference lives in host memory between its passes (``train.ref_offload``).
"""

import copy
import sys

import torch

from hybrid_rl.distributed import LocalProcess, Parallel
from hybrid_rl.model import HybridConfig, HybridLM
from hybrid_rl.rl.batch import Batch
from hybrid_rl.rl.config import AlgoConfig, RLRolloutConfig, RLStageConfig, RLTrainConfig
from hybrid_rl.rl.train import policy_update


def fixed_batch(rows: int = 5, length: int = 48, vocab: int = 300) -> Batch:
    """Rows of different lengths (so micro-batches differ in size), advantages of both signs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (rows, length + 1), generator=g)
    mask = torch.zeros(rows, length)
    for r in range(rows):
        n = length - 5 * r
        mask[r, 3:n] = (torch.rand(n - 3, generator=g) < 0.7).float()
    adv = (torch.randn(rows, 1, generator=g) * mask)
    logp = -torch.rand(rows, length, generator=g) * 2 * mask
    return Batch(ids[:, :-1], ids[:, 1:], mask, logp, adv, norm_tokens=float(mask.sum()) + 11.0, norm_seqs=rows + 1.0)


def config(strategy: str, processes: int, dtype: str = "fp32", chunk: int | None = None, kl: float = 0.0,
           offload: bool = False) -> RLStageConfig:
    return RLStageConfig(envs=["hybrid_rl/FrozenLake-v1"], rollout=RLRolloutConfig(max_episode_tokens=64),
                         algo=AlgoConfig(updates_per_batch=2, kl_beta=kl),
                         train=RLTrainConfig(strategy=strategy, processes=processes, dtype=dtype, micro_batch_tokens=64,
                                             max_grad_norm=0.5, lr=1e-3, ref_offload=offload,
                                             logprob_chunk_tokens=chunk))


def loads(model) -> dict:
    """The MoE layers' routed-token counts (``expert_load``) of this process."""
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("expert_load")}


def local_share(model) -> dict:
    """This process's elements of the model's parameters (a shard's, for a sharded model) and their dtypes."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return {"numel": sum(t.numel() for t in local), "dtypes": sorted({str(t.dtype) for t in local})}


def fsdp_records(model) -> int:
    """The forward-order records FSDP2 keeps for a backward's prefetching (0 for a model that is not sharded)."""
    if not hasattr(model, "_get_fsdp_state"):
        return 0
    state = model._get_fsdp_state()
    return len(state._comm_ctx.post_forward_order) + sum(len(group._post_forward_indices)
                                                         for unit in state._state_ctx.all_states
                                                         for group in unit._fsdp_param_groups)


def run(strategy: str, dtype: str = "fp32", chunk: int | None = None, loads_path: str = "", kl: float = 0.0,
        ref_path: str = "", offload: bool = False) -> dict | None:
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("micro"))
    batch = fixed_batch()
    if strategy == "local":
        cfg = config("single", 1, dtype, chunk, kl)
        par = LocalProcess(dtype)
        ref = copy.deepcopy(model).eval().requires_grad_(False) if kl else None
        optimizer, cache = torch.optim.AdamW(model.parameters(), lr=1e-3), {}
        stats = [policy_update(model, optimizer, batch, cfg, ref, old_from_rollout=True, par=par, ref_cache=cache)
                 for _ in range(2)]
        return {"stats": stats, "state": {k: v.clone() for k, v in model.state_dict().items()}, "loads": loads(model)}
    import os
    cfg = config(strategy, int(os.environ.get("WORLD_SIZE", "1")), dtype, chunk, kl, offload)
    par = Parallel(cfg.train)
    ref = par.frozen_copy(model, offload=offload) if kl else None
    model, optimizer = par.wrap(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    cache: dict = {}  # one batch, two updates: the reference's log-probs are computed once (as the RL loop does)
    stats = [policy_update(model, optimizer, batch, cfg, ref, old_from_rollout=True, par=par, ref_cache=cache)
             for _ in range(2)]
    state = par.full_state_dict()
    if loads_path:  # each process's routed-token counts, summed by the test (what balance_experts sums)
        torch.save(loads(model), loads_path.format(rank=par.rank))
    if ref_path:
        torch.save({"reference": local_share(ref), "policy": local_share(model), "records": fsdp_records(ref)},
                   ref_path.format(rank=par.rank))
    out = {"stats": stats, "state": state, "world": par.world} if par.is_main else None
    par.close()
    return out


if __name__ == "__main__":
    out_dir, strategy = sys.argv[1], sys.argv[2]
    dtype = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "None" else None
    kl = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    offload = len(sys.argv) > 6 and sys.argv[6] == "offload"
    torch.set_num_threads(1)
    tag = f"{strategy}-{dtype}-{chunk}" + (f"-kl{kl}" if kl else "") + ("-offload" if offload else "")
    result = run(strategy, dtype, chunk, loads_path=f"{out_dir}/{tag}-loads-{{rank}}.pt", kl=kl,
                 ref_path=f"{out_dir}/{tag}-ref-{{rank}}.pt" if kl else "", offload=offload)
    if result is not None:
        torch.save(result, f"{out_dir}/{tag}.pt")
