"""The GRPO loop (``hybrid-rl rl``), flat, top to bottom. Each step:

    push weights (versioned) -> play prompts_per_step groups of samples_per_prompt episodes (more rounds
    with dynamic sampling) -> per-token advantages -> AdamW update(s) over micro-batches -> log
    -> eval on held-out seeds every eval.every_steps -> checkpoint (atomic, resumable)

Departures from the GRPO paper (Shao et al. 2024), and why:
- Episodes are multi-turn. ``algo.credit: episode`` gives every action token its episode's advantage;
  ``algo.credit: turn`` gives each turn's tokens the advantage of that turn's discounted reward-to-go
  (rl/advantages.py: the baseline is the other samples' reward-to-go at the same turn index, which
  keeps the gradient unbiased); ``algo.credit: state`` adds to the episode's advantage each turn's step
  advantage against the other samples' turns from the same state (GiGPO; ``algo.state_key``). Observation tokens are context, never trained on.
- The default advantage is leave-one-out (rloo), not the paper's std-normalised one: per-turn costs make
  an all-fail group's returns differ a little, and dividing by that small std turns length noise into
  unit-sized advantages (rl/advantages.py keeps ``grpo``, with a batch-std floor).
- Tokens are scored under the distribution the engine sampled from (temperature, banned ids, top-k,
  top-p: ``hybrid_rl.rl.losses.ScoringDist``), so ratios and gradients are for the policy that acted.
- One optimizer step per batch by default: a synchronous step is exactly on-policy, the ratio is 1 and
  the clipped loss reduces to REINFORCE with a group baseline (as in nanochat's chat_rl.py). The clip
  matters in async mode, where the batch is one version old, and with ``algo.updates_per_batch > 1``
  (GRPO's mu): the ratio is then taken against the rollout's own log-probs (importance correction,
  clipped as in PPO).
- No KL penalty by default (beta 0, as DAPO and Dr.GRPO); with ``algo.kl_beta > 0`` a frozen copy of
  the initial policy is the reference.
- Failed episodes (env_error / timeout) are left out of group statistics and of the loss. Episodes with
  advantage 0 carry no policy gradient and are skipped in the update when no KL or entropy term needs
  them (``algo.skip_zero_advantage``), but they still count in the loss normaliser, so one informative
  group out of eight moves the policy an eighth as far as eight would. ``algo.dynamic_sampling`` (DAPO)
  plays new groups instead, until the step has ``prompts_per_step`` informative ones.
- Token-mean loss aggregation by default (DAPO / Dr.GRPO); ``algo.loss_agg`` gives the others.
- The MoE bias balancing is off during RL by default (``train.moe_bias_update_rate``): it would move the
  policy outside the gradient, which no ratio accounts for.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hybrid_rl.checkpoint import latest_checkpoint, load_trainer_state, peek_trainer_state, save_checkpoint, write_dir_atomically
from hybrid_rl.config import to_dict
from hybrid_rl.envs.contract import failed_episodes_error
from hybrid_rl.distributed import (LocalProcess, Parallel, adamw, balance_experts, end_forward_only_pass, rank_share,
                                   rank_share_weights)
from hybrid_rl.metrics import MetricsLogger, env_key, json_safe
from hybrid_rl.run import claim_run_dir, resume_point, seed_everything, start_run_dir, torch_threads
from hybrid_rl.schedule import warmup_cosine
from hybrid_rl.rl.advantages import ADVANTAGES, anchor_state_advantages, turn_groups, turn_observations, turn_returns
from hybrid_rl.rl.batch import (TENSOR_FIELDS, Batch, collate, micro_batches, pack, packed_plan, share_units, trained_lengths,
                                trim)
from hybrid_rl.rl.config import RLStageConfig
from hybrid_rl.rl.kl import KL_ESTIMATORS, kl_k3
from hybrid_rl.rl.losses import (COV_LOSSES, POLICY_LOSSES, ClipRange, ScoringDist, aggregate_loss, chunked_policy_logprobs,
                                 cov_selection, policy_logprobs)
from hybrid_rl.rl.routing import routing_mismatch
from hybrid_rl.rollout.evaluate import evaluate_policy as evaluate_policy_on
from hybrid_rl.rollout.evaluate import rollout_metrics, sample_row
from hybrid_rl.rollout.pool import check_reachable, make_pool

log = logging.getLogger("hybrid_rl.rl")


# ------------------------------------------------------------------------------ setup


def load_policy(cfg: RLStageConfig):
    """(model, tokenizer, source): the init_from checkpoint (an SFT step_N or run dir), or a fresh model."""
    from hybrid_rl.model import HybridLM
    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.model.tokenizer import checkpoint_tokenizer

    if not cfg.init_from:
        return _fits(HybridLM(cfg.model), checkpoint_tokenizer(None), "scratch")
    path = Path(cfg.init_from)
    if not (path / "config.json").is_file():  # a run directory: its newest checkpoint
        latest = latest_checkpoint(path)
        if latest is None and cfg.resume and cfg.algo.kl_beta == 0 and not path.exists():
            return _resumed_alone(cfg, path)
        if latest is None:
            also = (" resume=true needs it too: it is the reference policy (algo.kl_beta) and fixes the model's shape; "
                    "with algo.kl_beta=0 a resume goes on without it once it is gone") if cfg.resume else ""
            raise FileNotFoundError(f"init_from={cfg.init_from}: neither a checkpoint (no config.json) nor a run directory "
                                    f"with step_N checkpoints. Pass e.g. runs/<sft-run>/step_200.{also}")
        path = latest
    return _fits(load_pretrained(path).float(), checkpoint_tokenizer(path), str(path))


def _resumed_alone(cfg: RLStageConfig, gone: Path):
    """A resume whose ``init_from`` no longer exists, with ``algo.kl_beta=0``: nothing of it is needed (no reference
    policy; the checkpoint holds the weights, the tokenizer and the shapes), so the run's own latest step_N is the
    model, warned. The source stays the one the run started from (its checkpoints' ``init_source``)."""
    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.model.tokenizer import checkpoint_tokenizer

    ckpt = resume_point(cfg.run, "rl")  # (its own error where there is nothing to resume)
    started = peek_trainer_state(ckpt).get("init_source") or str(gone)
    log.warning("init_from=%s is gone; with algo.kl_beta=0 the resume needs nothing of it and loads %s alone", gone, ckpt)
    return _fits(load_pretrained(ckpt).float(), checkpoint_tokenizer(ckpt), started)


def _fits(model, tokenizer, source: str):
    """(model, tokenizer, source), once the tokenizer's ids are known to fit the model's embeddings (else a
    rollout's first id past them fails deep in the model, after the run has started)."""
    if tokenizer.vocab_size > model.config.vocab_size:
        from hybrid_rl.config import ConfigError

        fix = (f"set model.vocab_size={tokenizer.vocab_size} or more" if source == "scratch" else
               "save the model after model.resize_token_embeddings(len(tokenizer)), or use the tokenizer it was trained with")
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model ({source}) embeds only "
                          f"{model.config.vocab_size}; {fix}")
    return model, tokenizer, source


def _check_resumed_model(cfg: RLStageConfig, ckpt: Path, source: str, policy: dict, resumed: dict) -> None:
    """The checkpoint being resumed must be the model ``init_from`` loads (the KL reference and the shapes come from
    it): else an error that names the ``init_from`` the run was started with (its config.yaml, before it is rewritten)."""
    differ = sorted(set(policy) ^ set(resumed)) or [k for k in policy if policy[k].shape != resumed[k].shape]
    if not differ:
        return
    from hybrid_rl.config import ConfigError

    first = differ[0]
    shapes = f"{tuple(policy[first].shape) if first in policy else 'absent'} against " \
             f"{tuple(resumed[first].shape) if first in resumed else 'absent'}"
    started = ""
    saved = ckpt.parent / "config.yaml"
    if saved.is_file():
        import yaml

        started = f" (the run started with init_from: {(yaml.safe_load(saved.read_text()) or {}).get('init_from')!r})"
    raise ConfigError(f"resume=true: {ckpt} is not the model init_from={cfg.init_from!r} loads ({source}): {len(differ)} "
                      f"tensor(s) differ, e.g. {first} {shapes}; pass the init_from the run started from{started}")


def _check_resume_settings(cfg: RLStageConfig, ckpt: Path, source: str, state: dict) -> None:
    """A resume that would do nothing (``train.steps`` at or below the checkpoint's step) or train against another
    KL reference (``init_from`` now resolves to another checkpoint than the run started from, e.g. an SFT run
    directory that gained a newer step_N) is refused before the run directory is touched."""
    from hybrid_rl.config import ConfigError

    if cfg.train.steps <= state["step"]:
        raise ConfigError(f"resume=true: {ckpt} is step {state['step']} and train.steps={cfg.train.steps}, so there is "
                          f"nothing left to train; raise train.steps above {state['step']} to go on")
    started = state.get("init_source")
    same = started is None or Path(started).resolve() == Path(source).resolve()  # (a path spelled otherwise is the same)
    if cfg.algo.kl_beta > 0 and not same:
        raise ConfigError(f"resume=true: the run started from init_from {started} (its KL reference, algo.kl_beta="
                          f"{cfg.algo.kl_beta:g}), and init_from={cfg.init_from!r} now loads {source}; pass "
                          f"init_from={started} to resume against the same reference")


def rounds_per_step(cfg: RLStageConfig) -> int:
    """Rounds of prompts_per_step groups a step may play: 1, or 1 + max_refill_rounds with dynamic sampling."""
    return 1 + (cfg.algo.max_refill_rounds if cfg.algo.dynamic_sampling else 0)


def train_requests(cfg: RLStageConfig, step: int, round_: int = 0):
    """Round ``round_`` of this step's groups: prompts_per_env train seeds of each env, chosen by (step, round)
    alone (resume-exact); refill rounds take seeds no other (step, round) takes."""
    from hybrid_rl import envs
    from hybrid_rl.rollout.engine import GroupRequest

    out = []
    per_env = cfg.prompts_per_env
    slot = step * rounds_per_step(cfg) + round_
    for e, env_id in enumerate(cfg.envs):
        seeds = envs.seeds(env_id, "train", (slot + 1) * per_env)[slot * per_env:]
        for j, seed in enumerate(seeds):
            out.append(GroupRequest(env_id, seed, group_id=slot * cfg.rollout.prompts_per_step + e * per_env + j,
                                    num_samples=cfg.rollout.samples_per_prompt))
    return out


def play_step(pool, cfg: RLStageConfig, step: int):
    """This step's episodes -> (played, trained-on candidates, stats). Without dynamic sampling both are the
    one round's episodes. With it (DAPO), rounds of new groups are played until ``prompts_per_step`` groups
    are informative (some advantage is not 0) or ``max_refill_rounds`` extra rounds are spent; the batch
    keeps every informative group of the rounds before the last, and of the last round as many as still fit,
    taken from the envs in turn (the first env to take one rotates with the round), so that the cut does not
    fall on the envs listed last; the rest are dropped."""
    played, kept_groups, rounds = [], [], 0
    for round_ in range(rounds_per_step(cfg)):
        trajs = pool.run_groups(train_requests(cfg, step, round_))
        played += trajs
        rounds += 1
        if not cfg.algo.dynamic_sampling:
            return trajs, trajs, {}
        informative = [g for g in _by_group(trajs) if _informative(g, cfg)]
        room = cfg.rollout.prompts_per_step - len(kept_groups)
        kept_groups += _in_turn(informative, cfg.envs, first=step * rounds_per_step(cfg) + round_)[:room]
        if len(kept_groups) >= cfg.rollout.prompts_per_step:
            break
    n_played = len(_by_group(played))
    stats = {"rollout/groups_played": float(n_played), "rollout/groups_dropped": float(n_played - len(kept_groups)),
             "rollout/refill_rounds": float(rounds - 1)}
    return played, [t for g in kept_groups for t in g], stats


def _by_group(trajectories) -> list[list]:
    """The episodes by group, in group-id order (not the order a pool finished them in)."""
    groups: dict[int, list] = {}
    for t in trajectories:
        groups.setdefault(t.group_id, []).append(t)
    return [groups[g] for g in sorted(groups)]


def _in_turn(groups: list[list], env_ids: list[str], first: int) -> list[list]:
    """``groups`` ordered one per env in turn, env ``first % len(env_ids)`` first: a cut after the first k takes
    k // n_envs from each env (one more from the envs next in turn) where each has that many."""
    queues = [[g for g in groups if g[0].env_id == env_id] for env_id in env_ids]
    queues += [[g for g in groups if g[0].env_id not in env_ids]]  # (an env the config does not list: last)
    n = len(env_ids)
    order = [queues[(first + i) % n] for i in range(n)] + [queues[-1]]
    out = []
    for k in range(max((len(q) for q in order), default=0)):
        out += [q[k] for q in order if k < len(q)]
    return out


def _informative(group, cfg: RLStageConfig) -> bool:
    if cfg.algo.dynamic_sampling_filter == "success":  # DAPO's filter: accuracy strictly between 0 and 1
        return len({t.success for t in group if not t.failed}) == 2
    return any(a != 0 for adv in token_advantages(group, cfg.algo)[0] for a in adv)


def evaluate_policy(model, tokenizer, cfg: RLStageConfig, select: bool = False) -> tuple[dict[str, float], list]:
    """Episodes (greedy by default) on each env's held-out seeds (``eval.split``: the eval seeds, or val ones), in
    this process: (eval/... metrics, trajectories). ``select``: ``eval.select_episodes_per_env`` val seeds instead
    (``eval.select_best``), metrics named ``val/...``."""
    split, episodes = ("val", cfg.eval.select_episodes_per_env) if select else (cfg.eval.split, cfg.eval.episodes_per_env)
    metrics, trajs = evaluate_policy_on(model, tokenizer, cfg.envs, episodes, split=split, temperature=cfg.eval.temperature,
                                        max_turn_tokens=cfg.rollout.max_turn_tokens, max_episode_tokens=cfg.rollout.max_episode_tokens,
                                        rollout_like=(cfg.rollout.sampling, cfg.rollout.episode_config()))
    if not select:
        return metrics, trajs
    return {f"val/{k.removeprefix('eval/')}": v for k, v in metrics.items() if k.startswith("eval/")}, trajs


BEST_DIR, BEST_FILE = "best", "best.json"
FAILED_STEPS_LIMIT = 3  # consecutive steps in which every episode failed in its env: the run stops


def read_best(run_dir: Path) -> dict | None:
    """``{"step", "val/success", ..., "eval": {...}}`` of the checkpoint ``eval.select_best`` kept in ``run_dir/best``,
    or None."""
    path = Path(run_dir) / BEST_DIR / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_best(run_dir: Path, step: int, model, tokenizer, val: dict[str, float], held_out: dict[str, float]) -> dict:
    """``run_dir/best``: the HF model folder of ``step`` with its val figures and its held-out eval (``best.json``,
    returned), replaced atomically."""
    from hybrid_rl.model.hf import save_pretrained

    record = {"step": step, **val, "eval": held_out}

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, tokenizer)
        (tmp / BEST_FILE).write_text(json.dumps(json_safe(record), indent=1) + "\n")

    write_dir_atomically(Path(run_dir) / BEST_DIR, write)
    return record


# ------------------------------------------------------------------------------ advantages


def turn_rewards(t, algo, turn_of: list[int] | None = None) -> list[float]:
    """The rewards of each action turn of ``t`` (its components weighted by ``algo.reward_weights``), with the
    overlong penalty on turns closed by force. Unweighted they sum to ``episode_return`` (minus penalties):
    a return no step reward accounts for is put on the last turn.
    ``turn_of``: ``t.action_turn_index()`` when the caller has it already."""
    turn_of = t.action_turn_index() if turn_of is None else turn_of
    n = max(len(t.step_rewards), max(turn_of, default=-1) + 1, 1)
    step_rewards = weighted_rewards(t, algo.reward_weights) if algo.reward_weights else t.step_rewards
    rewards = [*step_rewards, *[0.0] * (n - len(step_rewards))]
    rewards[-1] += t.episode_return - sum(t.step_rewards)
    for k in t.overlong_turns:
        if k < n:
            rewards[k] -= algo.overlong_penalty
    return rewards


def weighted_rewards(t, weights: dict[str, float]) -> list[float]:
    """Each turn's reward recombined from its named components (``t.reward_components``), a component
    weighted by ``weights[name]`` (1 when not named)."""
    return [sum(weights.get(name, 1.0) * value for name, value in parts.items()) for parts in t.reward_components]


def check_reward_weights(trajectories, algo) -> None:
    """Warn about ``algo.reward_weights`` names that none of the first step's episodes reported (a typo, or
    a component that only rare events produce), with the names they did report."""
    seen = {name for t in trajectories for parts in t.reward_components for name in parts}
    for name in sorted(set(algo.reward_weights) - seen):
        close = difflib.get_close_matches(name, sorted(seen), n=1)
        log.warning("algo.reward_weights names %r, which no episode of the first step reported%s; reported: %s",
                    name, f" (did you mean {close[0]!r}?)" if close else "", ", ".join(sorted(seen)) or "none")


def token_advantages(trajectories, algo, stats: dict | None = None) -> tuple[list[list[float]], list[bool]]:
    """(per trajectory the advantage of each token (0 off the actions), per trajectory whether it is valid).

    ``credit: episode``: one return per episode (the sum of its turn rewards), one advantage broadcast over
    its action tokens. ``credit: turn``: each turn's discounted reward-to-go against the baseline of the
    group's samples at the same turn index (rl/advantages.py explains why that baseline is unbiased).
    ``credit: state``: the episode's advantage plus ``algo.state_weight`` times the turn's step advantage
    against the other samples' turns from the same state (GiGPO's anchor states, rl/advantages.py).
    Advantages are scaled by the episode's env weight (``algo.env_weights``). ``stats``, when given,
    receives ``train/anchored_turns_frac`` under state credit."""
    adv_fn = ADVANTAGES.get(algo.advantage)
    if algo.advantage == "grpo":
        adv_fn = functools.partial(adv_fn, std_floor=algo.grpo_std_floor)
    valid = [not t.failed and t.num_action_tokens > 0 for t in trajectories]
    turns_of = [t.action_turn_index() for t in trajectories]
    rewards = [turn_rewards(t, algo, turn_of) for t, turn_of in zip(trajectories, turns_of)]
    if algo.credit == "turn":
        returns = turn_returns(rewards, algo.gamma)
        episode_i, turn_i, group_i = turn_groups([t.group_id for t in trajectories], [len(r) for r in returns])
    else:
        returns = [[sum(r)] for r in rewards]
        episode_i, turn_i, group_i = list(range(len(trajectories))), [0] * len(trajectories), [t.group_id for t in trajectories]
    flat_adv = adv_fn(torch.tensor([returns[e][k] for e, k in zip(episode_i, turn_i)], dtype=torch.float64),
                      torch.tensor(group_i, dtype=torch.long),
                      torch.tensor([valid[e] for e in episode_i], dtype=torch.bool)).tolist() if episode_i else []
    per_turn = [[0.0] * len(r) for r in returns]
    for e, k, a in zip(episode_i, turn_i, flat_adv):
        per_turn[e][k] = a
    if algo.credit == "state":  # the episode's advantage plus each turn's step advantage
        anchors = [turn_observations(t.messages, len(r), algo.state_key, t.states) for t, r in zip(trajectories, rewards)]
        step_adv, anchored = anchor_state_advantages(turn_returns(rewards, algo.gamma), [t.group_id for t in trajectories],
                                                     anchors, valid)
        per_turn = [[ep[0] + algo.state_weight * b for b in st] for ep, st in zip(per_turn, step_adv)]
        if stats is not None:
            stats["train/anchored_turns_frac"] = anchored / max(sum(len(r) for r, v in zip(rewards, valid) if v), 1)
    out = []
    for traj, turn_of, adv in zip(trajectories, turns_of, per_turn):
        weight = algo.env_weights.get(traj.env_id, 1.0)
        out.append([(adv[0] if algo.credit == "episode" else adv[k]) * weight if k >= 0 else 0.0 for k in turn_of])
    return out, valid


def make_batch(trajectories, cfg: RLStageConfig, pad_id: int):
    """Advantages, then the trained episodes as one padded Batch (None when nothing to train), and stats.

    The loss normalisers count every valid episode's action tokens, trained or not (see rl/batch.py)."""
    stats: dict[str, float] = {}
    adv, valid = token_advantages(trajectories, cfg.algo, stats)
    informative = [v and any(a != 0 for a in a_t) for v, a_t in zip(valid, adv)]
    skip = cfg.algo.skip_zero_advantage and cfg.algo.kl_beta == 0 and cfg.algo.entropy_coef == 0  # else all have a gradient
    keep = [i for i, t in enumerate(trajectories) if (informative[i] if skip else valid[i])]
    trained_tokens = [abs(a) for i in keep for a, m in zip(adv[i], trajectories[i].is_action) if m and informative[i]]
    stats.update({"train/adv_abs_mean": sum(trained_tokens) / len(trained_tokens) if trained_tokens else 0.0,
                  "train/informative_episodes_frac": sum(informative) / max(sum(valid), 1),
                  "train/trained_episodes_frac": len(keep) / max(len(trajectories), 1)})
    for env_id in sorted({t.env_id for t in trajectories}):
        idx = [i for i, t in enumerate(trajectories) if t.env_id == env_id and valid[i]]
        stats[f"train/informative_episodes_frac/{env_key(env_id)}"] = sum(informative[i] for i in idx) / max(len(idx), 1)
        # the size of what the env's episodes train with, after its algo.env_weights weight
        sizes = [abs(a) for i in idx if informative[i] for a, m in zip(adv[i], trajectories[i].is_action) if m]
        stats[f"train/adv_abs_mean/{env_key(env_id)}"] = sum(sizes) / len(sizes) if sizes else 0.0
    if not keep:
        return None, stats
    kept = [trajectories[i] for i in keep]
    norm_tokens = float(sum(t.num_action_tokens for t, v in zip(trajectories, valid) if v))
    return collate(kept, [adv[i] for i in keep], pad_id, with_routing=cfg.algo.routing_replay or kept[0].routed_experts is not None,
                   norm_tokens=norm_tokens, norm_seqs=float(sum(valid))), stats


# ------------------------------------------------------------------------------ one update


def scoring_dist(cfg: RLStageConfig, tokenizer, model) -> ScoringDist:
    """The distribution the rollout engine samples from (temperature, banned ids, top-k/top-p); the banned-ids mask
    lives where the model's logits will be."""
    from hybrid_rl.rollout.engine import banned_token_mask, model_vocab_size

    s = cfg.rollout.sampling
    banned = banned_token_mask(tokenizer, model_vocab_size(model), s.ascii_only)
    return ScoringDist(s.temperature, s.top_k, s.top_p, banned.to(next(model.parameters()).device))


def policy_update(model, optimizer, batch: Batch, cfg: RLStageConfig, ref_model=None, old_from_rollout: bool = False,
                  dist: ScoringDist | None = None, par: Parallel | None = None, ref_cache: dict | None = None,
                  seed: int = 0):
    """One optimizer step over ``batch`` in micro-batches (gradients accumulate); returns train/ metrics.

    Tokens are scored under ``dist``, the distribution the rollout sampled from. The rollout-mismatch
    figures compare the batch's rollout log-probs with this update's log-probs *before* its optimizer
    step: on the first update of a synchronous step that is engine vs trainer on the same weights.

    With several trainer processes (``par``), every process builds the same micro-batches and runs its
    round-robin share of them; the loss normalisers are the whole step's (``batch.norm_tokens``), and each
    process scales its loss by the process count because DDP and FSDP average gradients over processes:
    the update equals the one-process update on the whole batch. The metrics are summed over processes.
    ``ref_cache`` keeps the reference log-probs of each micro-batch for the next updates on this batch
    (the reference model does not change); with ``train.ref_offload`` the reference lives on the CPU
    between those passes.

    ``seed`` seeds this update's random choices (clip-cov's draw; the loop passes one per run seed, step and
    update): micro-batch ``i`` draws with ``mix_seed(seed, i)``, the same on every process and after a resume.
    With clip-cov / kl-cov the tokens are selected per micro-batch (rl/losses.py), and the update also logs
    how many were selected and their covariance."""
    par = par or LocalProcess(device=next(model.parameters()).device)  # (a CUDA model gets its batch on CUDA)
    loss_fn, kl_fn = POLICY_LOSSES.get(cfg.algo.policy_loss), KL_ESTIMATORS.get(cfg.algo.kl_estimator)
    a = cfg.algo
    clip = ClipRange(a.clip_eps_low, a.clip_eps_high, a.seq_clip_eps_low, a.seq_clip_eps_high, clip_cov_ratio=a.clip_cov_ratio,
                     clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub, kl_cov_ratio=a.kl_cov_ratio, kl_cov_coef=a.kl_cov_coef)
    with_cov = a.policy_loss in COV_LOSSES
    agg = cfg.algo.loss_agg
    n_tokens, n_seqs = batch.norm_tokens, batch.norm_seqs
    batch_tokens = float(batch.action_mask_bt.sum())
    lengths = trained_lengths(batch)
    sums = dict(loss=0.0, kl=0.0, clipped=0.0, entropy=0.0, mismatch=0.0, ratio=0.0, route_diff=0.0, route_n=0.0,
                cov=0.0, cov_selected=0.0, cov_selected_sum=0.0)
    mismatch_max = 0.0
    ref_cache = {} if ref_cache is None else ref_cache
    with_kl = ref_model is not None and cfg.algo.kl_beta > 0
    optimizer.zero_grad(set_to_none=True)
    if packs(cfg):
        units = share_units(batch, lengths, cfg.train.micro_batch_tokens) if cfg.train.share_prefixes else None
        plan, _ = packed_plan(lengths, cfg.train.micro_batch_tokens, units)
        make_mb = lambda i: pack(batch, plan[i], lengths)  # noqa: E731
    else:
        plan = micro_batches(lengths, cfg.train.micro_batch_tokens)
        make_mb = lambda i: trim(batch.rows(plan[i]))  # noqa: E731
    share = rank_share(len(plan), par.rank, par.world)
    weights = rank_share_weights(len(plan), par.rank, par.world)
    for j, (i, weight) in enumerate(zip(share, weights)):
        mb = _to(make_mb(i), par.device)
        mask_bt, on_bt = mb.action_mask_bt, mb.action_mask_bt.bool()
        replay = mb.routing_btlk if cfg.algo.routing_replay else None
        mb_clip = dataclasses.replace(clip, cov_seed=mix_seed(seed, i)) if with_cov else clip
        if with_kl and j not in ref_cache:  # (by place in the share: a sharded reference's passes are collectives,
            ref_cache[j] = reference_logprobs(ref_model, mb, replay, dist, cfg.train, par)  # a filler runs one too)
        with par.no_sync(last=j == len(share) - 1):
            with par.autocast():
                # the MoE load counts the episodes' tokens, not padding (as SFT's does), and nothing of a filler: the
                # experts' counts (and the balancing step) equal one process's
                counted = mb.real_bt if weight else torch.zeros_like(mb.input_ids_bt, dtype=torch.bool)
                out, (logp_bt, entropy_bt) = score(model, mb, replay, dist, cfg.train,
                                                   record=mb.routing_btlk is not None and replay is None, load_mask=counted)
                old_logp_bt = mb.rollout_logp_bt if old_from_rollout else logp_bt.detach()
                loss_bt, clipped_bt = loss_fn(logp_bt, old_logp_bt, mb.adv_bt, mask_bt, mb_clip)
                loss = aggregate_loss(loss_bt, mask_bt, agg, n_tokens, n_seqs)
                if cfg.algo.entropy_coef:
                    loss = loss - cfg.algo.entropy_coef * aggregate_loss(entropy_bt, mask_bt, agg, n_tokens, n_seqs)
                if with_kl:
                    kl = aggregate_loss(kl_fn(logp_bt, ref_cache[j], mask_bt), mask_bt, agg, n_tokens, n_seqs)
                    loss = loss + cfg.algo.kl_beta * kl
                    sums["kl"] += weight * float(kl.detach())
            par.backward(loss * (weight * par.world))
        trainer_routing = None
        if mb.routing_btlk is not None:  # the trainer's own experts: free without replay, one more forward with it
            if replay is None:
                trainer_routing = out.routed_experts
            elif cfg.algo.log_routing_mismatch:  # (before the filler check: every process runs the same forwards)
                trainer_routing = _natural_routing(model, mb)
        if not weight:  # a filler that keeps the processes' collectives in step: no metrics
            continue
        with torch.no_grad():
            on = lambda x: torch.where(on_bt, x, torch.zeros_like(x))  # noqa: E731
            sums["loss"] += float(loss)
            sums["clipped"] += float(clipped_bt.sum())
            sums["entropy"] += float(on(entropy_bt).sum())
            sums["mismatch"] += float(kl_k3(mb.rollout_logp_bt, logp_bt, mask_bt).sum())  # KL(rollout || trainer)
            mismatch_max = max(mismatch_max, float(on((mb.rollout_logp_bt - logp_bt).abs()).max()))
            sums["ratio"] += float(on(torch.exp(on(logp_bt - old_logp_bt))).sum())
            if with_cov:  # the selection the loss made (the same inputs and seed)
                cov_bt, selected_bt = cov_selection(a.policy_loss, logp_bt, old_logp_bt, mb.adv_bt, mask_bt, mb_clip)
                sums["cov"] += float(cov_bt.sum())
                sums["cov_selected"] += float(selected_bt.sum())
                sums["cov_selected_sum"] += float(cov_bt[selected_bt].sum())
            if trainer_routing is not None:
                diff, n = routing_mismatch(mb.routing_btlk, trainer_routing, mask_bt)
                sums["route_diff"] += diff
                sums["route_n"] += n
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else math.inf
    grad_norm = par.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    sums = dict(zip(sums, par.sum(list(sums.values()))))
    (mismatch_max,) = par.max([mismatch_max])
    per_tok = lambda x: x / max(batch_tokens, 1)  # noqa: E731
    stats = {"train/loss": sums["loss"], "train/clip_fraction": per_tok(sums["clipped"]), "train/entropy": per_tok(sums["entropy"]),
             "train/ratio_mean": per_tok(sums["ratio"]), "train/grad_norm": grad_norm,
             "train/rollout_mismatch_kl": per_tok(sums["mismatch"]),
             "train/rollout_logprob_diff_max": mismatch_max}
    if with_kl:
        stats["train/kl"] = sums["kl"]
    if with_cov:
        stats.update({"train/cov_mean": per_tok(sums["cov"]), "train/cov_selected_frac": per_tok(sums["cov_selected"]),
                      "train/cov_selected_mean": sums["cov_selected_sum"] / max(sums["cov_selected"], 1)})
    if sums["route_n"]:
        stats["train/routing_mismatch"] = sums["route_diff"] / sums["route_n"]
    return stats


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, update, micro-batch index): a hash, so neighbouring
    parts do not give correlated generators."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def packs(cfg: RLStageConfig) -> bool:
    """Whether the update packs episodes into shared rows (``train.pack_sequences``): only with a loss
    summed token by token; a per-sequence aggregation or GSPO's sequence ratio reads whole rows. clip-cov and
    kl-cov pack too: their selection reads a micro-batch's action tokens, whatever rows hold them (rl/losses.py)."""
    return cfg.train.pack_sequences and cfg.algo.loss_agg == "token-mean" and cfg.algo.policy_loss != "gspo"


def reference_logprobs(ref_model, mb: Batch, replay, dist: ScoringDist | None, cfg_train, par: Parallel):
    """Log-probs of the micro-batch's targets under the frozen reference policy (for the KL term); an
    offloaded reference comes to the device for this pass only (a sharded one, ``Parallel.frozen_copy``, a unit
    at a time by itself).

    The pass runs with autograd enabled, as the policy's does, so that both take the same code (the model's
    inference path sums in other orders: a bf16 KL of ~2e-6 at the first step, where the two are equal);
    nothing in it requires a gradient, so no graph is kept."""
    offload = cfg_train.ref_offload and par.strategy != "fsdp"
    if offload:
        ref_model.to(par.device)
    try:
        with torch.enable_grad(), par.autocast():
            return score(ref_model, mb, replay, dist, cfg_train, with_entropy=False)[1][0].detach()
    finally:
        if offload:
            ref_model.to("cpu")
        elif hasattr(ref_model, "reshard"):  # sharded: back to 1/N, without the records a backward would clear
            end_forward_only_pass(ref_model)


def score(model, mb: Batch, replay, dist: ScoringDist | None, tc, record: bool = False, with_entropy: bool = True,
          load_mask=None):
    """(the model output, (log-prob, entropy) [B, T] of the micro-batch's targets under ``dist``).

    Only the action positions are scored: the final hidden states there go through ``lm_head`` and the
    log-softmax (inside the model's forward, which a sharded model needs), and every other position gets
    0, which no loss term or metric reads (each is masked by ``action_mask_bt``). A multi-turn episode is
    mostly observation tokens (FrozenLake: ~4 of 5 positions), whose [T, V] logits, log-probs and entropies
    were computed and thrown away. With ``train.logprob_chunk_tokens`` (by default for vocabularies of
    8192 and more) the action positions are scored a chunk at a time: no [N, V] tensor for all of them."""
    chunk = logprob_chunk(tc, model_vocab(model))
    on_bt = mb.action_mask_bt.bool()
    where = on_bt.nonzero(as_tuple=True)
    targets_n = mb.target_ids_bt[where]
    b, t = on_bt.shape

    def head(h_btd, w_vd):
        h_1nd = h_btd[where][None]
        ones_1n = torch.ones_like(targets_n[None], dtype=torch.float32)
        if chunk:
            logp_1n, entropy_1n = chunked_policy_logprobs(h_1nd, w_vd, targets_n[None], ones_1n, dist,
                                                          with_entropy=with_entropy, chunk_tokens=chunk)
        else:
            logits_1nv = torch.nn.functional.linear(h_1nd, w_vd).float()
            logp_1n, entropy_1n = policy_logprobs(logits_1nv, targets_n[None], ones_1n, dist, with_entropy=with_entropy)
        spread = lambda x_1n: x_1n.new_zeros(b, t).index_put(where, x_1n[0])  # noqa: E731
        return spread(logp_1n), (spread(entropy_1n) if with_entropy else None)

    extra = {} if load_mask is None else {"load_mask": load_mask}  # (load_mask: which positions count as MoE load)
    out = model(mb.input_ids_bt, doc_ids=mb.doc_ids_bt, routing=replay, record_routing=record, head=head,
                doc_parents=mb.doc_parents_bt, **extra)
    return out, out.head


CHUNK_FROM_VOCAB, DEFAULT_CHUNK_TOKENS = 8192, 1024


def logprob_chunk(tc, vocab: int) -> int:
    """Tokens per chunk of the log-prob pass; 0 = the whole micro-batch at once (small vocabularies, where
    one pass is faster)."""
    if tc.logprob_chunk_tokens is None:
        return DEFAULT_CHUNK_TOKENS if vocab >= CHUNK_FROM_VOCAB else 0
    return tc.logprob_chunk_tokens


def model_vocab(model) -> int:
    core = getattr(model, "module", model)
    return core.config.vocab_size


def _to(mb: Batch, device) -> Batch:
    if device is None or torch.device(device).type == "cpu":
        return mb
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return Batch(*(move(getattr(mb, f)) for f in TENSOR_FIELDS), norm_tokens=mb.norm_tokens, norm_seqs=mb.norm_seqs)


@torch.no_grad()
def _natural_routing(model, mb: Batch):
    """The experts the trainer would pick without replay (one extra forward, for the mismatch metric only)."""
    return model(mb.input_ids_bt, doc_ids=mb.doc_ids_bt, doc_parents=mb.doc_parents_bt, record_routing=True,
                 load_mask=torch.zeros_like(mb.input_ids_bt, dtype=torch.bool)).routed_experts  # (counted once already)


def staleness_metrics(trajectories, version: int) -> dict[str, float]:
    """How many policy versions behind the trainer (``version``) the batch's action tokens were sampled."""
    behind = [version - v for t in trajectories for v, a in zip(t.policy_version, t.is_action) if a]
    return {"train/staleness_mean": sum(behind) / len(behind) if behind else 0.0, "train/staleness_max": float(max(behind, default=0))}


# ------------------------------------------------------------------------------ the loop


def train(cfg: RLStageConfig) -> dict:
    """Run the RL stage; returns {"run_dir", "checkpoint", "eval": {...}} of the final policy (on the main
    process; the other trainer processes return the same dict with an empty eval).

    ``train.torch_threads`` holds for the stage only: the process gets its thread count back when the stage
    returns or fails. (Left at the stage's count, what ran next in the process, e.g. a second pipeline's SFT,
    ran on other threads and so took other float roundings: its gradient sums split over another number of
    partial sums.)"""
    with torch_threads(cfg.train.torch_threads):
        return _train(cfg)


def _train(cfg: RLStageConfig) -> dict:
    par = Parallel(cfg.train)
    try:
        return _train_on(cfg, par)
    finally:  # a run that failed before its loop (a bad input) ends its process state too; else a no-op
        par.close(clean=False)


def _train_on(cfg: RLStageConfig, par: Parallel) -> dict:
    seed_everything(cfg.run.seed)
    model, tokenizer, source = load_policy(cfg)
    if (cfg.algo.routing_replay or cfg.algo.log_routing_mismatch) and not getattr(model, "moe_layers", None):
        from hybrid_rl.config import ConfigError

        raise ConfigError(f"algo.routing_replay / algo.log_routing_mismatch: the policy ({source}) has no MoE layers, "
                          "so there is no routing to record or replay; set both to false for this model")
    if par.is_main and cfg.rollout.pool.num_workers and cfg.rollout.pool.address:  # before the run directory is touched
        check_reachable(cfg.rollout.pool.address)
    ckpt, resumed = None, None
    # the run directory's name, refused now if it holds another run; cleared (run.overwrite) only once the inputs loaded
    claimed = Path(par.broadcast(str(claim_run_dir(cfg.run, "rl", resume=cfg.resume)) if par.is_main else None))
    if cfg.resume:  # refused now, before the run directory is touched, if there is nothing of this stage to resume
        from hybrid_rl.model.hf import load_pretrained

        ckpt = resume_point(cfg.run, "rl")
        resumed = load_pretrained(ckpt).float().state_dict()
        _check_resumed_model(cfg, ckpt, source, model.state_dict(), resumed)
    if ckpt is not None:
        _check_resume_settings(cfg, ckpt, source, peek_trainer_state(ckpt))
    model.train()
    ref_model = None
    if cfg.algo.kl_beta > 0:  # a frozen copy of the initial policy, on the CPU between its passes when offloaded
        ref_model = par.frozen_copy(model, offload=cfg.train.ref_offload)
    tc = cfg.train
    model, optimizer = par.wrap(model, lambda m: adamw(m.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                                       weight_decay=tc.weight_decay))
    # the run directory is cleared (run.overwrite) only now, when every input has loaded and been checked
    run_dir = claimed
    if par.is_main:
        start_run_dir(run_dir, cfg.run, cfg, resume=cfg.resume)
    par.barrier()
    start_step, resumed_batch = 0, None
    if ckpt is not None:
        par.load_full_state_dict(resumed)
        state = load_trainer_state(ckpt)
        par.load_optimizer_state(optimizer, state["optimizer"])
        start_step = state["step"]
        resumed_batch = state.get("next_batch")
        log.info("resumed %s at step %d", ckpt, start_step)
    log.info("RL from %s: %s, %d x %d episodes per step, %d steps, %d trainer process(es) (%s, %s) -> %s", source,
             cfg.envs, cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.train.steps, par.world,
             par.strategy, par.dtype, run_dir)

    main = par.is_main  # the main process plays, logs, evaluates and writes checkpoints
    metrics = pool = executor = None
    failed = True  # a run that raises (no Ray worker starts, an update fails, ...) closes its logger as failed
    try:
        if main:
            metrics = MetricsLogger(cfg.logging, run_dir, run_dir.name, to_dict(cfg), group=cfg.run.group, tags=cfg.run.tags,
                                    resume_step=start_step if ckpt is not None else None)
            # the rollout records its experts for replay, or to measure how often the trainer's differ (the metric)
            episode = cfg.rollout.episode_config(record_routing=cfg.algo.routing_replay or cfg.algo.log_routing_mismatch)
            pool = make_pool(par.full_model(), tokenizer, cfg.rollout.sampling, episode, cfg.rollout.pool, seed=cfg.run.seed)
        else:
            par.full_model()  # the collective of the line above
        dist = scoring_dist(cfg, tokenizer, par.core)
        pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
        is_async = cfg.algo.mode == "async"
        executor = ThreadPoolExecutor(max_workers=1) if is_async and main else None
        final_eval: dict[str, float] = {}

        def evaluate() -> tuple[dict[str, float], list]:  # a collective under fsdp (the full weights are gathered)
            full = par.full_model()
            return evaluate_policy(full, tokenizer, cfg) if main else ({}, [])

        best = read_best(run_dir) if cfg.eval.select_best and cfg.resume else None

        def select(step: int, held_out: dict[str, float]) -> dict[str, float]:
            """eval.select_best: this policy's val success; kept in run_dir/best if it is the highest so far."""
            nonlocal best
            full = par.full_model()  # a collective under fsdp
            if not main:
                return {}
            val, _ = evaluate_policy(full, tokenizer, cfg, select=True)
            score = val["val/success"]  # NaN when no val episode could be scored: never the best
            if math.isfinite(score) and (best is None or not math.isfinite(best["val/success"]) or score > best["val/success"]):
                best = save_best(run_dir, step, full, tokenizer, val, held_out)
                log.info("step %d: val success %.3f, the best so far -> %s", step, val["val/success"], run_dir / BEST_DIR)
            if best is None:  # nothing scored yet
                return val
            return {**val, "val/best_step": best["step"], "val/best_success": best["val/success"]}

        def weights() -> dict:  # the policy to push, taken between updates; async pushes while the next update runs
            state = par.full_state_dict()
            # async: a copy (the update goes on meanwhile). For Ray workers the copy is made in host memory: the pool
            # keeps what it was pushed until the next push (on a GPU that would be a second copy of every weight)
            # and sends it from host memory anyway; the in-process pool loads it into its own model at once, so
            # its copy stays on the device
            if not is_async or par.strategy == "fsdp":
                return state
            to = "cpu" if cfg.rollout.pool.num_workers else None  # Ray workers (make_pool's choice)
            return {k: v.detach().to(to or v.device, copy=True) for k, v in state.items()}

        def push_and_play(state, version, at_step):  # policy version = updates applied so far; None: pushed already
            t0 = time.perf_counter()
            if state is not None:
                pool.push_weights(state, version)
            t1 = time.perf_counter()
            played, kept, stats = play_step(pool, cfg, at_step)
            return played, kept, stats, t1 - t0, time.perf_counter() - t1

        if cfg.eval.at_start and start_step == 0:
            final_eval, eval_trajs = evaluate()
            if main:
                metrics.log(final_eval, step=0)
                metrics.log_samples([sample_row(t) for t in eval_trajs[:4]], step=0)

        pending = None
        if is_async and start_step < cfg.train.steps:
            # the batch of start_step is played by version start_step-1: kept in the checkpoint when resuming
            first = weights() if not resumed_batch else None
            if main:
                pending = _done(_batch_from_state(resumed_batch)) if resumed_batch else \
                    executor.submit(push_and_play, first, start_step, start_step)
        failed_steps = 0  # consecutive steps whose every episode failed (env_error / timeout): nothing to train on
        for step in range(start_step, cfg.train.steps):
            t_step = time.perf_counter()
            if is_async:  # this batch was played by version step-1 (step 0: version 0) while step-1 trained
                result = pending.result() if main else None
                if step + 1 < cfg.train.steps:
                    # no update since the first push of a fresh start: the workers hold these weights already
                    state = None if step == start_step and not resumed_batch else weights()
                    if main:
                        pending = executor.submit(push_and_play, state, step, step + 1)
            else:
                state = weights()
                result = push_and_play(state, step, step) if main else None
                del state
            played, kept, play_stats, sync_s, rollout_s = par.broadcast(result)
            t_train = time.perf_counter()
            if step == start_step and cfg.algo.reward_weights and main:
                check_reward_weights(played, cfg.algo)
            batch, batch_stats = make_batch(kept, cfg, pad_id)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            update_stats, mismatch, ref_cache = {}, {}, {}
            for u in range(cfg.algo.updates_per_batch if batch is not None else 0):
                update_stats = policy_update(model, optimizer, batch, cfg, ref_model, dist=dist, par=par, ref_cache=ref_cache,
                                             old_from_rollout=is_async or cfg.algo.updates_per_batch > 1,
                                             seed=mix_seed(cfg.run.seed, step, u))
                if u == 0:  # before any step on this batch: rollout vs trainer (sync: on the same weights)
                    mismatch = {k: update_stats[k] for k in MISMATCH_KEYS}
            moe_stats = balance_experts(par.core, cfg.train.moe_bias_update_rate, par) if cfg.train.moe_bias_update_rate else {}
            train_s = time.perf_counter() - t_train
            row = {**rollout_metrics(played), **staleness_metrics(played, step), **play_stats, **batch_stats, **update_stats, **mismatch, **moe_stats,
                   "train/lr": lr_at(step, cfg), "perf/rollout_s": rollout_s, "perf/train_s": train_s,
                   "perf/weight_sync_s": sync_s, "perf/step_s": time.perf_counter() - t_step,
                   "perf/rollout_tokens_per_s": sum(t.num_tokens for t in played) / max(rollout_s, 1e-9),
                   "perf/tokens_per_s": sum(t.num_tokens for t in played) / max(time.perf_counter() - t_step, 1e-9)}
            done = step + 1
            if (cfg.eval.every_steps and done % cfg.eval.every_steps == 0) or done == cfg.train.steps:
                final_eval, _ = evaluate()
                row.update(final_eval)
                if cfg.eval.select_best:
                    row.update(select(done, final_eval))
            if main:
                metrics.log(row, step=done)
                metrics.log_samples([sample_row(t) for t in played[:: max(1, len(played) // 4)]], step=done)
            failed_steps = failed_steps + 1 if played and all(t.failed for t in played) else 0
            if failed_steps == FAILED_STEPS_LIMIT:  # (every rank sees the same played episodes: all stop)
                raise failed_episodes_error(
                    played, f"every episode of steps {done - failed_steps + 1}-{done}",
                    f"The run stops at step {done}, its metrics and checkpoints kept; fix the env and go on with "
                    "resume=true.")
            if (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == cfg.train.steps:
                # async: the next batch (played by this step's starting version) goes into the checkpoint
                next_batch = pending.result() if main and is_async and done < cfg.train.steps else None
                full, optimizer_state = par.full_model(), par.optimizer_state(optimizer)
                if main:
                    save_rl_checkpoint(run_dir, done, full, tokenizer, optimizer_state, cfg.checkpoint.keep_last, next_batch,
                                       init_source=source)
                par.barrier()
        failed = False
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        if pool is not None:
            pool.close()
        if metrics is not None:
            metrics.close(failed=failed)
        par.close(clean=not failed)
    ckpt = latest_checkpoint(run_dir)
    out = {"run_dir": str(run_dir), "checkpoint": str(ckpt) if ckpt else "", "eval": final_eval}
    if cfg.eval.select_best and main and best is not None:  # the policy with the best val success, not the last one
        out.update(checkpoint=str(run_dir / BEST_DIR), best={k: v for k, v in best.items() if k != "eval"},
                   eval=best["eval"] or final_eval)
    return out


MISMATCH_KEYS = ("train/rollout_mismatch_kl", "train/rollout_logprob_diff_max")


def _done(value):
    """A finished future holding ``value``."""
    from concurrent.futures import Future

    future = Future()
    future.set_result(value)
    return future


def _batch_state(result) -> dict:
    played, kept, stats, sync_s, rollout_s = result
    kept_ids = {id(t) for t in kept}
    return {"played": [t.to_dict() for t in played], "kept": [i for i, t in enumerate(played) if id(t) in kept_ids],
            "stats": stats, "sync_s": sync_s, "rollout_s": rollout_s}


def _batch_from_state(state: dict):
    from hybrid_rl.rollout.trajectory import Trajectory

    played = [Trajectory.from_dict(d) for d in state["played"]]
    return played, [played[i] for i in state["kept"]], state["stats"], state["sync_s"], state["rollout_s"]


def lr_at(step: int, cfg: RLStageConfig) -> float:
    """Linear warmup over train.warmup_steps, then constant, or (``train.min_lr_ratio < 1``) cosine down to
    ``lr * min_lr_ratio`` at step ``train.steps`` (one past the last trained step, as transformers' cosine
    schedule: 240 steps at 0.1x train their last at 0.10004x). Set by hand each step: resume needs only the step."""
    tc = cfg.train
    return warmup_cosine(step, tc.lr, tc.warmup_steps, tc.steps, tc.min_lr_ratio)


def save_rl_checkpoint(run_dir, step, model, tokenizer, optimizer_state: dict, keep_last, next_batch=None,
                       init_source: str | None = None):
    """step_N: the HF model folder, plus the optimizer state (keyed by parameter name: ``Parallel.optimizer_state``),
    the step, (async) the already played next batch and the checkpoint ``init_from`` resolved to (the KL
    reference of a resume)."""
    from hybrid_rl.model.hf import save_pretrained

    state = {"stage": "rl", "optimizer": optimizer_state, "step": step, "init_source": init_source}
    if next_batch is not None:
        state["next_batch"] = _batch_state(next_batch)
    return save_checkpoint(run_dir, step, lambda d: save_pretrained(model, d, tokenizer), state, keep_last=keep_last)


