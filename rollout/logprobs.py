"""Recompute rollout log-probs with the training forward, and measure how far they are from the rollout's.

Rollout and training run the same model code, so for the same weights the plain-softmax log-prob of
every action token must agree (fp32: max |diff| <= 1e-4). ``logprob_mismatch`` is that check (tests and
benchmarks); the RL loop measures the same thing in its update, ``train/rollout_logprob_diff_max`` and
``train/rollout_mismatch_kl`` (docs/METRICS.md).
"""

from __future__ import annotations

import torch

from hybrid_rl.rollout.trajectory import Trajectory


def training_logprobs(model, trajectories: list[Trajectory], batch_size: int = 8, pad_id: int = 0,
                      replay_routing: bool = False) -> list[list[float]]:
    """Per trajectory, ``logp[t]`` = log p(token_t | tokens_<t) from ``model(input_ids)`` (0 at t=0).

    Rows are right-padded into batches: the model is causal, so padding after a row's end changes nothing
    before it. ``replay_routing`` feeds the trajectories' recorded experts (routing replay)."""
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(trajectories), batch_size):
                chunk = trajectories[start:start + batch_size]
                out.extend(_batch_logprobs(model, chunk, pad_id, replay_routing))
    finally:
        model.train(was_training)
    return out


def _batch_logprobs(model, chunk: list[Trajectory], pad_id: int, replay_routing: bool) -> list[list[float]]:
    lengths = [len(t.token_ids) for t in chunk]
    width = max(lengths)
    ids_bt = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    for r, t in enumerate(chunk):
        ids_bt[r, :lengths[r]] = torch.tensor(t.token_ids, dtype=torch.long)
    device = next(model.parameters()).device
    ids_bt = ids_bt.to(device)
    kwargs = {}
    if replay_routing:
        kwargs["routing"] = _routing_tensor(chunk, width).to(device)
    logits_btv = model(ids_bt, **kwargs).logits.float()
    logp_btv = torch.log_softmax(logits_btv[:, :-1], dim=-1)
    logp_bt = logp_btv.gather(-1, ids_bt[:, 1:, None]).squeeze(-1)
    logp_bt = logp_bt.cpu()
    return [[0.0] + logp_bt[r, :lengths[r] - 1].tolist() for r in range(len(chunk))]


def _routing_tensor(chunk: list[Trajectory], width: int) -> torch.Tensor:
    missing = [t.seed for t in chunk if not t.routed_experts]
    if missing:
        raise ValueError(f"replay_routing=True but trajectories (seeds {missing}) have no routed_experts; "
                         "roll out with episode.record_routing=true")
    first = torch.tensor(chunk[0].routed_experts)
    routing = first[:1].expand(len(chunk), width, *first.shape[1:]).clone()  # padding repeats valid experts
    for r, t in enumerate(chunk):
        routing[r, :len(t.routed_experts)] = torch.tensor(t.routed_experts)
    return routing


def naive_training_logprobs(model, traj: Trajectory) -> list[float]:
    """One trajectory, one unpadded forward, a Python loop over positions."""
    with torch.no_grad():
        logits_tv = model(torch.tensor([traj.token_ids], device=next(model.parameters()).device)).logits[0].float().cpu()
    out = [0.0]
    for t in range(1, len(traj.token_ids)):
        out.append(float(torch.log_softmax(logits_tv[t - 1], dim=-1)[traj.token_ids[t]]))
    return out


def logprob_mismatch(model, trajectories: list[Trajectory], batch_size: int = 8,
                     replay_routing: bool = False) -> dict[str, float]:
    """|rollout log-prob - training log-prob| over the action tokens of the non-failed trajectories.

    Returns ``{"rollout/logprob_mismatch_max", "rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_tokens"}``.
    """
    usable = [t for t in trajectories if not t.failed and t.num_action_tokens > 0]
    diffs: list[float] = []
    if usable:
        for traj, recomputed in zip(usable, training_logprobs(model, usable, batch_size, replay_routing=replay_routing)):
            diffs += [abs(a - b) for a, b, m in zip(traj.logprobs, recomputed, traj.is_action) if m]
    return {
        "rollout/logprob_mismatch_max": max(diffs, default=0.0),
        "rollout/logprob_mismatch_mean": sum(diffs) / len(diffs) if diffs else 0.0,
        "rollout/logprob_mismatch_tokens": float(len(diffs)),
    }
