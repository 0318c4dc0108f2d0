"""Typed configs of the rollout stage: sampling, episode limits, the Ray worker pool, and `eval`.

Each section is a dataclass the YAML loader (hybrid_rl.config) validates; the RL stage embeds
``SamplingConfig``/``EpisodeConfig``/``PoolConfig`` in its own config, `hybrid-rl eval` uses ``EvalStageConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hybrid_rl.run import RunConfig


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (argmax); RL samples at 1.0 so rollout == training distribution
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    stop_strings: list[str] = field(default_factory=list)  # end the turn when the action text ends with one
    ascii_only: bool = False  # forbid bytes >= 128 (keeps actions valid UTF-8 for a byte-level untrained model)
    seed: int | None = None  # sampling stream seed (None: the stage's run.seed; a bare Engine's is random); every worker samples the same stream

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings may not hold an empty string")


@dataclass
class EpisodeConfig:
    max_turn_tokens: int = 128  # new tokens the model may generate in one turn (then <|end|> is forced)
    max_episode_tokens: int = 2048  # total length of an episode's token sequence (prompt + all turns)
    max_batch_episodes: int = 32  # rows decoded together by one engine (continuous batching)
    env_timeout_s: float = 30.0  # an env reset/step slower than this marks the episode `timeout` (0 = no limit)
    end_on_invalid_action: bool = False  # end the episode with status invalid_action at the first unparsable action
    record_routing: bool = False  # keep the routed experts of every token (routing replay in RL)

    def __post_init__(self):
        if self.max_turn_tokens < 1:
            raise ValueError(f"max_turn_tokens must be >= 1, got {self.max_turn_tokens}")
        if self.max_episode_tokens < 2:
            raise ValueError(f"max_episode_tokens must be >= 2, got {self.max_episode_tokens}")
        if self.max_batch_episodes < 1:
            raise ValueError(f"max_batch_episodes must be >= 1, got {self.max_batch_episodes}")
        if self.env_timeout_s < 0:
            raise ValueError(f"env_timeout_s must be >= 0 (0 = no limit), got {self.env_timeout_s}")


@dataclass
class PoolConfig:
    num_workers: int = 2  # RolloutWorker actors; 0 = no Ray, play in this process
    num_cpus_per_worker: float = 1.0  # Ray CPU resource per worker (fractional is fine: 0.5 fits 2 on 1 core)
    num_gpus_per_worker: float = 0.0
    torch_threads: int = 1  # torch.set_num_threads inside each worker
    address: str | None = None  # HOST:PORT of a Ray head node to join (`ray start --head --port=6379`); None = start a local Ray
    ray_num_cpus: int | None = None  # CPUs of a local Ray started here (None = Ray's default)
    object_store_mb: int = 512  # object store of a local Ray started here (raised when the weight buckets need more)
    # weight sync: the state dict travels in buckets of at most this many MiB, each its own ray.put; a tensor
    # larger than that is cut into flat pieces. The object store holds two buckets at a time, not the model
    sync_bucket_mb: float = 64.0
    # dtype of floating tensors on the wire: fp32 keeps rollout and trainer weights bit-identical; bf16 halves
    # the bytes (the workers cast back into their model's dtype)
    sync_dtype: Literal["fp32", "bf16"] = "fp32"
    spread: bool = True  # place workers on different nodes when the cluster has several
    groups_per_task: int = 0  # groups handed to a worker at once (0 = an even split over the workers)
    task_timeout_s: float = 600.0  # a task running longer than this is a stalled worker: error, never a hang
    max_task_retries: int = 3  # re-runs of a task whose worker died (Ray restarts the worker)
    env_modules: list[str] = field(default_factory=list)  # modules that register third-party envs: imported by the driver, an in-process pool and each worker

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < 0:
            raise ValueError("num_cpus_per_worker and num_gpus_per_worker must be >= 0")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.task_timeout_s <= 0:
            raise ValueError(f"task_timeout_s must be > 0, got {self.task_timeout_s}")
        if self.groups_per_task < 0:
            raise ValueError(f"groups_per_task must be >= 0 (0 = even split), got {self.groups_per_task}")
        if self.sync_bucket_mb <= 0:
            raise ValueError(f"sync_bucket_mb must be > 0, got {self.sync_bucket_mb}")


@dataclass
class CheckpointEvalConfig:
    checkpoint: str = ""  # HF-format checkpoint folder (model/hf.py layout)
    envs: list[str] = field(default_factory=list)  # env ids, e.g. [hybrid_rl/GuessNumber-v0]
    episodes: int = 32  # per env, on envs.seeds(env_id, "eval", episodes)
    seed_split: str = "eval"
    save_trajectories: bool = True  # write trajectories.jsonl next to eval.json

    def __post_init__(self):
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")


@dataclass
class EvalStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    eval: CheckpointEvalConfig = field(default_factory=CheckpointEvalConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
