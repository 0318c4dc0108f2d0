"""The typed config of the SFT stage (``hybrid-rl sft``): one dataclass per section, units in names.

Sizes, in one place (``SFTStageConfig.__post_init__`` checks they divide):

    a row          = data.max_seq_tokens tokens: whole documents packed back to back, then padding
    a micro-batch  = train.micro_batch_tokens tokens = micro_batch_tokens // max_seq_tokens rows
    an optimizer step (global batch) = grad_accum_steps micro-batches on each of the processes
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field
from typing import Literal

from hybrid_rl.distributed import ParallelTrainConfig, check_adam_betas
from hybrid_rl.run import RunConfig
from hybrid_rl.model.config import HybridConfig
from hybrid_rl.rollout.config import EpisodeConfig, SamplingConfig

try:
    from hybrid_rl.metrics import LoggingConfig
except ImportError:  # the metrics package lands separately; any mapping is accepted meanwhile
    LoggingConfig = dict  # type: ignore[misc,assignment]

__all__ = ["EnvDemoConfig", "DataConfig", "SFTTrainConfig", "SFTEvalConfig", "SFTStageConfig"]


@dataclass
class EnvDemoConfig:
    env_id: str  # a registered text environment with an expert, e.g. hybrid_rl/GuessNumber-v0
    episodes: int = 100  # expert episodes on the env's *train* seeds (eval seeds are disjoint)

    def __post_init__(self):
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive, got {self.episodes} for {self.env_id}")


@dataclass
class DataConfig:
    envs: list[EnvDemoConfig] = field(default_factory=list)  # expert demonstrations made on the fly
    jsonl_paths: list[str] = field(default_factory=list)  # one {"messages": [...]} conversation per line
    hf_dataset_dir: str | None = None  # a `datasets.save_to_disk` directory with a "messages" column
    hf_dataset_split: str = "train"  # used when hf_dataset_dir holds a DatasetDict
    on_bad_sample: Literal["skip", "error"] = "error"  # skip = count them by reason, the first 20 logged with their line
    max_seq_tokens: int = 1024  # row length of packing; a longer conversation is a bad sample, unless:
    # truncate: cut a longer conversation to its first max_seq_tokens tokens and train on the assistant tokens
    # among them (TRL's max_length truncation); one with no assistant token left is still a bad sample
    truncate: bool = False
    save_demos: bool = True  # write the env demonstrations to <run_dir>/demonstrations.jsonl (re-usable)
    keep_failed_demos: bool = False  # keep expert episodes that did not succeed (experts can be imperfect)

    def __post_init__(self):
        if self.max_seq_tokens <= 1:
            raise ValueError(f"max_seq_tokens must be at least 2, got {self.max_seq_tokens}")


@dataclass
class SFTTrainConfig(ParallelTrainConfig):
    # strategy / processes / dtype (auto: bf16 on a GPU) / activation_checkpointing: hybrid_rl/distributed.py
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 20  # linear warmup from 0
    max_steps: int = 300  # optimizer steps
    micro_batch_tokens: int = 4096  # tokens per micro-batch per process (a multiple of data.max_seq_tokens)
    grad_accum_steps: int = 1  # micro-batches per optimizer step per process
    weight_decay: float = 0.01  # on matrices only (not norms, biases, the MoE selection bias)
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0  # clip the global grad norm; 0 = no clipping
    moe_bias_update_rate: float = 1e-3  # aux-loss-free balancing step per optimizer step; 0 = off
    log_every: int = 1  # steps between train/ perf/ moe/ records (docs/METRICS.md: every step)
    eval_every: int = 100  # steps between evals on held-out seeds; 0 = only at the end
    save_every: int = 100  # steps between checkpoints; 0 = only at the end
    keep_last_checkpoints: int = 2  # older step_N are deleted; 0 = keep all

    def __post_init__(self):
        super().__post_init__()
        for name in ("lr", "max_steps", "micro_batch_tokens", "grad_accum_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "moe_bias_update_rate", "eval_every",
                     "save_every", "keep_last_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be positive (1 = every step), got {self.log_every}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_adam_betas(self.beta1, self.beta2)
        if self.warmup_steps > self.max_steps:  # a smoke run of a few steps is fine; a real one likely a slip
            logging.getLogger("hybrid_rl.sft").warning(
                "train.warmup_steps (%d) is longer than the run (train.max_steps=%d): the learning rate never "
                "reaches train.lr", self.warmup_steps, self.max_steps)


@dataclass
class SFTEvalConfig:
    env_ids: list[str] = field(default_factory=list)  # empty = the envs of data.envs
    episodes_per_env: int = 32  # on the env's held-out *eval* seeds (or the val seeds, below)
    max_turn_tokens: int = 64  # per assistant turn
    at_start: bool = True  # also evaluate the untrained (random-init or init_from) model at step 0
    # the seeds played: "eval" (held out, for reporting) or "val" (for choosing a recipe without looking at the
    # held-out seeds; the pipeline's eval.split sets it); the metrics are named eval/... either way
    split: Literal["eval", "val"] = "eval"
    # the turn rules the eval plays by, as RL's rollout.sampling / rollout.* keys of the same names (the pipeline
    # sets them from its rl.rollout, so that the SFT and RL figures are measured alike)
    stop_strings: list[str] = field(default_factory=list)  # end a turn when its text ends with one
    ascii_only: bool = False  # forbid bytes >= 128 in the model's turns
    env_timeout_s: float = 30.0  # an env reset/step slower than this marks the episode `timeout` (0 = no limit)
    end_on_invalid_action: bool = False  # end an episode at its first unparsable action

    def __post_init__(self):
        self.turn_rules()  # the rollout configs' own checks, with their messages

    def turn_rules(self):
        """(sampling, episode) rollout settings carrying the eval's turn rules (``evaluate_policy``'s ``rollout_like``)."""
        return (SamplingConfig(stop_strings=list(self.stop_strings), ascii_only=self.ascii_only),
                EpisodeConfig(env_timeout_s=self.env_timeout_s, end_on_invalid_action=self.end_on_invalid_action))


@dataclass
class SFTStageConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: HybridConfig = field(default_factory=lambda: HybridConfig.from_preset("micro"))
    init_from: str | None = None  # an HF-format checkpoint dir to start from; null = random init
    resume: bool = False  # continue run.name from its latest step_N (weights, optimizer, RNG, data cursor)
    data: DataConfig = field(default_factory=DataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.train.micro_batch_tokens % self.data.max_seq_tokens:
            raise ValueError(
                f"train.micro_batch_tokens ({self.train.micro_batch_tokens}) must be a multiple of "
                f"data.max_seq_tokens ({self.data.max_seq_tokens}): a micro-batch is a whole number of packed rows; "
                f"e.g. train.micro_batch_tokens={self.data.max_seq_tokens * max(1, self.train.micro_batch_tokens // self.data.max_seq_tokens)}"
            )
        if not (self.data.envs or self.data.jsonl_paths or self.data.hf_dataset_dir):
            raise ValueError(
                "no training data: set data.envs (expert demonstrations), data.jsonl_paths or data.hf_dataset_dir"
            )
        if self.resume and not self.run.name:
            raise ValueError("resume=true needs run.name: the run directory to continue")

    @property
    def rows_per_micro_batch(self) -> int:
        return self.train.micro_batch_tokens // self.data.max_seq_tokens

    @property
    def eval_env_ids(self) -> list[str]:
        return list(self.eval.env_ids) or [e.env_id for e in self.data.envs]
