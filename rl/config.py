"""The typed config of the RL stage (``hybrid-rl rl``): one dataclass per section, units in names.

Sizes, in one place (``RLStageConfig.__post_init__`` checks them):

    a group        = rollout.samples_per_prompt episodes of one env seed (the GRPO baseline)
    a step's batch = rollout.prompts_per_step groups = prompts_per_step * samples_per_prompt episodes
    a micro-batch  = whole episodes, packed back to back into rows as long as the step's longest episode
                     (train.pack_sequences; else one per row, right-padded), at most train.micro_batch_tokens
                     tokens (rows * row length); gradients accumulate over the step's micro-batches
    an update      = one AdamW step per batch by default (on-policy: the ratio is exactly 1), or
                     algo.updates_per_batch steps, each over the whole batch (GRPO's mu iterations)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from hybrid_rl.distributed import ParallelTrainConfig, check_adam_betas
from hybrid_rl.metrics import LoggingConfig
from hybrid_rl.run import RunConfig
from hybrid_rl.model.config import HybridConfig
from hybrid_rl.rl.advantages import ADVANTAGES, GRPO_STD_FLOOR
from hybrid_rl.rl.kl import KL_ESTIMATORS
from hybrid_rl.rl.losses import AGGREGATIONS, POLICY_LOSSES
from hybrid_rl.rollout.config import EpisodeConfig, PoolConfig, SamplingConfig

log = logging.getLogger("hybrid_rl.rl")

__all__ = ["RLRolloutConfig", "AlgoConfig", "RLTrainConfig", "RLEvalConfig", "CheckpointConfig", "RLStageConfig"]


@dataclass
class RLRolloutConfig:
    prompts_per_step: int = 8  # env seeds per step, each one a group
    samples_per_prompt: int = 8  # episodes per seed (G): the group baseline needs at least 2
    max_turn_tokens: int = 32  # tokens the model may generate in one turn (then the end-of-turn token is forced)
    max_episode_tokens: int = 512  # prompt + all turns; a longer episode is truncated
    env_timeout_s: float = 30.0  # a slower env reset/step marks the episode `timeout` (excluded from the loss)
    end_on_invalid_action: bool = False  # end an episode at its first unparsable action
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # temperature 1: sample the policy being trained
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_workers=1))

    def __post_init__(self):
        for name in ("prompts_per_step", "max_turn_tokens", "max_episode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.episode_config()  # its own checks (env_timeout_s >= 0, ...) now, not when the run has started
        if self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}: a group of one episode has no "
                "baseline, so every advantage would be 0. Use e.g. samples_per_prompt=8."
            )

    @property
    def episodes_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def episode_config(self, record_routing: bool = False) -> EpisodeConfig:
        """The engine's episode limits for this stage's rollouts (the one place they are built)."""
        return EpisodeConfig(max_turn_tokens=self.max_turn_tokens, max_episode_tokens=self.max_episode_tokens,
                             max_batch_episodes=self.episodes_per_step, env_timeout_s=self.env_timeout_s,
                             end_on_invalid_action=self.end_on_invalid_action, record_routing=record_routing)


@dataclass
class AlgoConfig:
    advantage: str = "rloo"  # rl/advantages.py: rloo | drgrpo | grpo
    # grpo: its std divisor is never below this, nor below the batch's std (0/1 success rewards: below any group's
    # std that differs in a success, so only groups that differ by per-turn costs alone are held at their small
    # scale; 0 = the batch-std floor alone; no setting gives the paper's group std alone, see rl/advantages.py)
    grpo_std_floor: float = GRPO_STD_FLOOR
    # one advantage per episode; per turn from its reward-to-go (baseline: same turn index); or the episode's
    # plus a per-turn one against the group's turns from the same state (state: GiGPO's anchor states)
    credit: Literal["episode", "turn", "state"] = "episode"
    gamma: float = 1.0  # turn / state credit: discount of later turns' rewards in a turn's reward-to-go
    state_weight: float = 1.0  # state credit: weight of the step advantage added to the episode's (GiGPO's omega)
    # state credit: what makes two turns the same state: the state their env named (info["state"], e.g.
    # GuessNumber's interval), else the observation they answered (env); the observation only (GiGPO; right
    # when the observation is the state, as FrozenLake's map); or everything before the action (any seeded env)
    state_key: Literal["env", "observation", "history"] = "env"
    policy_loss: str = "grpo"  # rl/losses.py: grpo | dapo | gspo | reinforce | clip-cov | kl-cov
    # token-mean | seq-mean-token-sum | seq-mean-token-mean; auto: seq-mean-token-mean under gspo, else token-mean
    loss_agg: str = "auto"
    clip_eps_low: float = 0.2  # ratio floor 1 - eps_low (grpo uses it on both sides)
    clip_eps_high: float = 0.28  # ratio ceiling 1 + eps_high for dapo (DAPO's clip-higher value)
    seq_clip_eps_low: float = 3e-4  # gspo: range of the length-normalised sequence ratio (GSPO paper)
    seq_clip_eps_high: float = 4e-4
    # covariance-based entropy control (Cui et al. 2025; rl/losses.py): cov = (logp - mean) * (A - mean) per action
    # token, means over the micro-batch's action tokens; ceil(ratio * tokens) tokens are selected per micro-batch
    # (at least one for a ratio > 0: the paper's ratios were set for batches of millions of tokens, ours have hundreds)
    clip_cov_ratio: float = 2e-4  # clip-cov: fraction of tokens, drawn from those with cov in [lb, ub], whose gradient is detached
    clip_cov_lb: float = 1.0  # clip-cov: the covariance band candidates come from (the paper's 1 and 5)
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3  # kl-cov: fraction of tokens, those with the largest cov, that get the penalty
    kl_cov_coef: float = 1.0  # kl-cov: weight of |logp - old_logp| on them (0 with zero gradient on a sync step with one update)
    kl_estimator: str = "k3"  # rl/kl.py: k1 | k2 | k3
    kl_beta: float = 0.0  # weight of the KL to the initial policy; 0 = no reference model is kept
    entropy_coef: float = 0.0  # bonus: minus this times the mean entropy of the sampling distribution on action tokens
    overlong_penalty: float = 0.0  # subtracted from the reward of a turn that hit rollout.max_turn_tokens (DAPO's overlong shaping)
    env_weights: dict[str, float] = field(default_factory=dict)  # env id -> weight of its episodes' advantages (default 1)
    # reward component name (an env's info["reward_components"] keys, e.g. success, turn, invalid) -> its weight
    # in the reward RL optimises (default 1 each; the env's own reward is the sum with all weights 1)
    reward_weights: dict[str, float] = field(default_factory=dict)
    skip_zero_advantage: bool = True  # leave advantage-0 episodes out of the update (no policy gradient; saves compute)
    dynamic_sampling: bool = False  # DAPO: play more groups until prompts_per_step of them are informative
    # what makes a group informative for dynamic sampling: "success" (DAPO: some but not all of its episodes
    # succeed, so per-turn costs and penalties alone never fill a batch) or "advantage" (any non-zero advantage)
    dynamic_sampling_filter: Literal["success", "advantage"] = "success"
    max_refill_rounds: int = 4  # dynamic sampling: at most this many extra rounds of prompts_per_step groups per step
    routing_replay: bool = False  # train on the experts the rollout picked (R3), recorded per token
    # log train/routing_mismatch (the rollout records its experts for it): without replay it tells whether replay
    # would change anything; with replay it costs one more forward per micro-batch
    log_routing_mismatch: bool = False
    updates_per_batch: int = 1  # optimizer steps on each rollout batch (GRPO's mu); > 1 takes ratios vs the rollout's log-probs
    mode: Literal["sync", "async"] = "sync"  # async: rollouts of step k+1 run while step k trains

    def __post_init__(self):
        if self.loss_agg == "auto":
            self.loss_agg = "seq-mean-token-mean" if self.policy_loss == "gspo" else "token-mean"
        for registry, name in ((ADVANTAGES, self.advantage), (POLICY_LOSSES, self.policy_loss),
                               (AGGREGATIONS, self.loss_agg), (KL_ESTIMATORS, self.kl_estimator)):
            registry.get(name)  # an unknown name fails here, naming the closest valid one
        if self.clip_eps_low < 0 or self.clip_eps_high < 0 or self.seq_clip_eps_low < 0 or self.seq_clip_eps_high < 0:
            raise ValueError(f"clip ranges must be >= 0, got clip_eps_low/high {self.clip_eps_low}/{self.clip_eps_high}, "
                             f"seq_clip_eps_low/high {self.seq_clip_eps_low}/{self.seq_clip_eps_high}")
        for name in ("clip_eps_low", "seq_clip_eps_low"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be at most 1 (the ratio floor is 1 - {name}; 1 = no floor, a ratio is "
                                 f"never negative), got {getattr(self, name)}: e.g. algo.{name}="
                                 f"{0.2 if name == 'clip_eps_low' else 3e-4}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a fraction of the action tokens in [0, 1], got {value}: e.g. "
                                 f"algo.{name}=0.02 (0 turns the selection off)")
        if not (math.isfinite(self.clip_cov_lb) and math.isfinite(self.clip_cov_ub)) or self.clip_cov_lb > self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be <= clip_cov_ub (finite numbers: the covariance band clip-cov draws from), got "
                             f"clip_cov_lb={self.clip_cov_lb}, clip_cov_ub={self.clip_cov_ub}: e.g. algo.clip_cov_lb=1.0 algo.clip_cov_ub=5.0")
        if not (math.isfinite(self.kl_cov_coef) and self.kl_cov_coef >= 0):
            raise ValueError(f"kl_cov_coef must be a finite number >= 0, got {self.kl_cov_coef}: e.g. algo.kl_cov_coef=1.0 "
                             "(a negative weight would reward moving the selected tokens away from the rollout policy)")
        if self.policy_loss == "kl-cov" and self.mode == "sync" and self.updates_per_batch == 1:
            log.warning("algo.policy_loss=kl-cov with algo.mode=sync and algo.updates_per_batch=1: the ratio is taken against "
                        "the trainer's own log-probs, so the |log ratio| penalty is 0 with zero gradient and kl-cov is the "
                        "plain unclipped policy gradient; use algo.mode=async or algo.updates_per_batch > 1")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.credit != "episode" and self.policy_loss == "gspo":
            raise ValueError(f"policy_loss=gspo takes one ratio and one advantage per sequence, so it cannot use credit={self.credit}; "
                             f"use credit=episode with gspo, or policy_loss=grpo|dapo with credit={self.credit}")
        if self.policy_loss == "gspo" and self.loss_agg != "seq-mean-token-mean":
            raise ValueError(f"policy_loss=gspo weighs every sequence once (its length-normalised ratio times its advantage, "
                             f"Zheng et al. 2025), and loss_agg={self.loss_agg} would weigh each by its length again; use "
                             "algo.loss_agg=seq-mean-token-mean (or auto, the default) with gspo")
        if not (math.isfinite(self.grpo_std_floor) and self.grpo_std_floor >= 0):
            raise ValueError(f"grpo_std_floor must be a finite number >= 0, got {self.grpo_std_floor}: e.g. "
                             "algo.grpo_std_floor=0.25 (0 = only the batch std's floor)")
        if not (math.isfinite(self.state_weight) and self.state_weight >= 0):
            raise ValueError(f"state_weight must be a finite number >= 0, got {self.state_weight}: e.g. algo.state_weight=1.0")
        for name in ("kl_beta", "entropy_coef", "overlong_penalty"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        bad = {k: v for k, v in self.env_weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"env_weights must be finite numbers >= 0, got {bad}: e.g. algo.env_weights={{hybrid_rl/GuessNumber-v0: 2.0}}")
        if self.policy_loss == "reinforce" and (self.mode == "async" or self.updates_per_batch > 1):
            log.warning("algo.policy_loss=reinforce takes no ratio to the policy that sampled: with algo.mode=%s and "
                        "algo.updates_per_batch=%d it trains on samples of an older policy without correction; use "
                        "policy_loss=grpo (clipped ratio) or mode=sync with updates_per_batch=1", self.mode,
                        self.updates_per_batch)
        default = {f.name: f.default for f in dataclasses.fields(self)}
        unused = [f"{name}={getattr(self, name)}" for name, used in (
            ("gamma", self.credit != "episode"), ("state_weight", self.credit == "state"),
            ("grpo_std_floor", self.advantage == "grpo"), ("state_key", self.credit == "state"),
            ("clip_eps_high", self.policy_loss in ("dapo", "clip-cov")),
            ("clip_eps_low", self.policy_loss in ("grpo", "dapo", "clip-cov")),
            ("seq_clip_eps_low", self.policy_loss == "gspo"), ("seq_clip_eps_high", self.policy_loss == "gspo"))
            if not used and getattr(self, name) != default[name]]
        if unused:
            log.warning("algo: settings with no effect under credit=%s and policy_loss=%s: %s (gamma: turn or state credit; "
                        "state_weight, state_key: state credit; grpo_std_floor: advantage=grpo; clip_eps_low: grpo, dapo, "
                        "clip-cov; clip_eps_high: dapo, clip-cov; seq_clip_eps_*: gspo)",
                        self.credit, self.policy_loss, ", ".join(unused))
        bad = {k: v for k, v in self.reward_weights.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"reward_weights must be finite numbers, got {bad}: e.g. algo.reward_weights={{turn: 0.5}}")
        if self.max_refill_rounds < 0:
            raise ValueError(f"max_refill_rounds must be >= 0, got {self.max_refill_rounds}")
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.updates_per_batch}")


@dataclass
class RLTrainConfig(ParallelTrainConfig):
    # strategy / processes / dtype / activation_checkpointing: the trainer core (hybrid_rl/distributed.py)
    dtype: Literal["auto", "fp32", "bf16"] = "fp32"  # fp32 by default: the rollout engine's log-probs are fp32
    steps: int = 20  # GRPO steps (= optimizer steps = policy versions)
    lr: float = 1e-4  # constant after warmup by default: RL from an SFT policy wants small, steady steps
    warmup_steps: int = 0  # linear warmup from 0
    # cosine decay from lr to lr * min_lr_ratio at the end of the last step; 1 = constant (the default). A decay settles
    # the final policy (TRL's GRPO decays linearly to 0 by default; the SFT stage uses the same cosine)
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.0  # no decay: it pulls the SFT weights toward 0 for no RL reason
    beta1: float = 0.9
    beta2: float = 0.99
    max_grad_norm: float = 1.0  # clip the global grad norm; 0 = off
    micro_batch_tokens: int = 4096  # padded tokens per micro-batch (rows x longest row)
    # put several episodes in one row (attention masked and Mamba state reset at each episode's start), rows
    # as long as the step's longest episode: less padding. Token-mean loss only (the per-sequence
    # aggregations and gspo keep one episode per row)
    pack_sequences: bool = True
    # with packing: the episodes of one prompt (a GRPO group) store that prompt once per row, their other
    # positions continuing it (model/shared.py): the projections, experts and lm_head see its tokens once
    share_prefixes: bool = True
    # aux-loss-free balancing step per optimizer step; 0 = off (the default: a bias update changes the policy
    # outside the gradient, which no ratio or clip accounts for; NeMo-RL's Nano recipe freezes it too)
    moe_bias_update_rate: float = 0.0
    torch_threads: int = 0  # torch threads of each trainer process (0 = torch's default)
    ref_offload: bool = False  # algo.kl_beta > 0: keep the reference model on the CPU between its passes
    # tokens per chunk of the log-prob/entropy pass (no [B, T, V] fp32 tensor); null = 1024 when the vocabulary
    # has 8192 or more tokens, else one pass; 0 = one pass
    logprob_chunk_tokens: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "lr", "micro_batch_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.logprob_chunk_tokens is not None and self.logprob_chunk_tokens < 0:
            raise ValueError(f"logprob_chunk_tokens must be >= 0 (0 = one pass, null = by vocabulary size), got {self.logprob_chunk_tokens}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "moe_bias_update_rate", "torch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (1 = constant rate), got {self.min_lr_ratio}")
        check_adam_betas(self.beta1, self.beta2)
        if self.warmup_steps > self.steps:  # a smoke run of a few steps is fine; a real one likely a slip
            logging.getLogger("hybrid_rl.rl").warning(
                "train.warmup_steps (%d) is longer than the run (train.steps=%d): the learning rate never reaches "
                "train.lr", self.warmup_steps, self.steps)


@dataclass
class RLEvalConfig:
    every_steps: int = 10  # steps between evals on held-out seeds; 0 = only at the end
    episodes_per_env: int = 32  # on envs.seeds(env, "eval", n): never seen in training
    temperature: float = 0.0  # 0 = greedy, the policy's best guess
    at_start: bool = True  # evaluate the initial (SFT) policy at step 0 too
    # the seeds of these evals: "eval" (held out: the report's learning curve) or "val" (for choosing a recipe
    # without looking at the held-out seeds; the pipeline's eval.split sets it); the metrics are named eval/...
    split: Literal["eval", "val"] = "eval"
    # at every eval step, also play select_episodes_per_env seeds of the *val* split and keep the RL checkpoint
    # with the highest val success in run_dir/best: the stage's result (TRL's load_best_model_at_end). Chosen
    # on val, never on the held-out eval seeds, and only among RL steps (step 0, the initial policy, never wins)
    select_best: bool = False
    select_episodes_per_env: int = 100

    def __post_init__(self):
        if self.every_steps < 0 or self.episodes_per_env < 1 or self.temperature < 0:
            raise ValueError(f"every_steps must be >= 0, episodes_per_env >= 1, temperature >= 0; got {self}")
        if self.select_episodes_per_env < 1:
            raise ValueError(f"select_episodes_per_env must be >= 1, got {self.select_episodes_per_env}: e.g. "
                             "eval.select_episodes_per_env=100 (val seeds per env for select_best)")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # older step_N are deleted; 0 = keep all

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 0:
            raise ValueError(f"every_steps and keep_last must be >= 0, got {self.every_steps}, {self.keep_last}")


@dataclass
class RLStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    # the architecture when init_from is empty (a policy from scratch); ignored when init_from is set
    model: HybridConfig = field(default_factory=lambda: HybridConfig.from_preset("micro"))
    init_from: str = ""  # HF checkpoint folder to start from (an SFT step_N), or an SFT run dir (its latest step)
    resume: bool = False  # continue run.name from its latest step_N (optimizer, RNG, step and data cursor)
    envs: list[str] = field(default_factory=lambda: ["hybrid_rl/GuessNumber-v0"])  # prompts are split evenly
    rollout: RLRolloutConfig = field(default_factory=RLRolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if not self.envs:
            raise ValueError("envs is empty: name at least one environment, e.g. envs=[hybrid_rl/GuessNumber-v0]")
        if self.rollout.prompts_per_step % len(self.envs):
            raise ValueError(
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step}) must be a multiple of the number of envs "
                f"({len(self.envs)}) so that every env gets the same share of groups; e.g. "
                f"rollout.prompts_per_step={len(self.envs) * max(1, self.rollout.prompts_per_step // len(self.envs))}"
            )
        if self.train.micro_batch_tokens < self.rollout.max_episode_tokens:
            raise ValueError(
                f"train.micro_batch_tokens ({self.train.micro_batch_tokens}) is smaller than rollout.max_episode_tokens "
                f"({self.rollout.max_episode_tokens}): the longest episode must fit in one micro-batch."
            )
        if self.rollout.sampling.temperature <= 0:
            raise ValueError(
                f"rollout.sampling.temperature must be > 0 for RL, got {self.rollout.sampling.temperature}: greedy "
                "rollouts have no distribution to score or explore with. Use e.g. rollout.sampling.temperature=1.0 "
                "(greedy is for eval.temperature)."
            )
        twice = sorted({e for e in self.envs if self.envs.count(e) > 1})
        if twice:
            raise ValueError(f"envs names {twice} more than once: each env's groups would play the same seeds twice "
                             "and share its metrics; name each env once (algo.env_weights weights an env's advantages)")
        unknown = sorted(set(self.algo.env_weights) - set(self.envs))
        if unknown:
            raise ValueError(f"algo.env_weights names env(s) {unknown} that are not in envs {self.envs}")
        if self.resume and not self.run.name:
            raise ValueError("resume=true needs run.name: the run directory to continue")

    @property
    def prompts_per_env(self) -> int:
        return self.rollout.prompts_per_step // len(self.envs)
