"""``hybrid-rl pipeline [config] [key=value ...]``: the whole recipe, end to end (``make quickstart``).

    1. demonstrations: an imperfect teacher (``demos.teacher``: the env's heuristic, or its expert, with
       ``demos.noise``) plays each env's train seeds; its conversations, failed episodes included, are the
       SFT data, so SFT learns an imperfect policy that RL has to go past
    2. SFT (``hybrid_rl.sft.train.train``) on those demonstrations: from scratch (``model.preset``, the byte
       tokenizer), or from ``init_from``, a NemotronH checkpoint with its own tokenizer, which every later
       stage then uses too (RL rollouts and training, the eval, the exported checkpoints)
    3. GRPO (``hybrid_rl.rl.train.train``) from the SFT checkpoint
    4. eval of the SFT and the RL checkpoints on the same held-out seeds, greedy (``hybrid_rl.rollout.evaluate.evaluate_policy``), beside
       the scripted baselines on those seeds: a random policy, the teacher, and the optimal expert
    5. a results table, printed and written to ``runs/<name>/results.{json,md}``

Runs land in ``runs/<name>/{sft,rl,eval}``, one wandb group (``<name>``) for the three; each has its
metrics.jsonl, TensorBoard files and report.html. The default recipe is configs/quickstart.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybrid_rl.config import add_config_arguments, resolve_config
from hybrid_rl.metrics import LoggingConfig, env_key, json_safe
from hybrid_rl.registry import check_name
from hybrid_rl.run import RunConfig
from hybrid_rl.model.config import HybridConfig
from hybrid_rl.rl.config import AlgoConfig, CheckpointConfig, RLEvalConfig, RLRolloutConfig, RLTrainConfig
from hybrid_rl.sft.config import DataConfig, SFTEvalConfig, SFTTrainConfig

log = logging.getLogger("hybrid_rl.pipeline")


@dataclass
class DemoConfig:
    # who plays the demonstrations: the env's "heuristic" (plausible, systematically sub-optimal), its
    # optimal "expert", or "random" (envs.POLICIES)
    teacher: str = "heuristic"
    noise: float = 0.0  # probability that the teacher plays a random (legal-looking) action instead of its own
    episodes_per_env: int = 300  # on each env's train seeds
    keep_failed: bool = True  # an imperfect teacher's failures are part of its demonstrations

    def __post_init__(self):
        from hybrid_rl.envs.episode import POLICIES

        check_name("teacher", self.teacher, POLICIES)
        if not 0.0 <= self.noise <= 1.0 or self.episodes_per_env < 1:
            raise ValueError(f"noise must be in [0, 1] and episodes_per_env >= 1, got {self.noise}, {self.episodes_per_env}")


@dataclass
class PipelineSFTConfig:
    data: DataConfig = field(default_factory=DataConfig)  # data.envs/jsonl_paths are filled by the pipeline
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    eval: SFTEvalConfig = field(default_factory=lambda: SFTEvalConfig(at_start=False))


@dataclass
class PipelineRLConfig:
    rollout: RLRolloutConfig = field(default_factory=RLRolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class PipelineEvalConfig:
    episodes_per_env: int = 100  # held-out eval seeds, the same for both checkpoints
    # 0 = greedy (each policy's single best guess); 1 = the policy as RL samples it (seeded, repeatable)
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    max_turn_tokens: int = 16
    # the seeds both checkpoints play: "eval" (held out, for reporting) or "val" (for choosing a recipe
    # without ever looking at the held-out seeds)
    split: Literal["eval", "val"] = "eval"

    def __post_init__(self):
        if self.episodes_per_env < 1 or not self.temperatures or min(self.temperatures) < 0 or self.max_turn_tokens < 1:
            raise ValueError(f"episodes_per_env >= 1, temperatures non-empty and >= 0, max_turn_tokens >= 1 expected, got {self}")
        if 0.0 not in self.temperatures:  # results.json and the results table lead with greedy success
            raise ValueError(f"temperatures={self.temperatures} must include 0 (greedy, the headline of results.json and "
                             f"its table), e.g. eval.temperatures=[0.0,{max(self.temperatures):g}]")


@dataclass
class PipelineStageConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="quickstart"))
    # a NemotronH checkpoint directory (transformers' or ours, config.json + safetensors) with its tokenizer
    # saved beside it (tokenizer.save_pretrained(DIR), a chat template included): SFT starts from it and
    # every stage uses its tokenizer; model.* (the preset too) is then ignored. Empty: SFT of model.* from
    # scratch with the byte tokenizer
    init_from: str = ""
    model: HybridConfig = field(default_factory=lambda: HybridConfig.from_preset("micro"))
    envs: list[str] = field(default_factory=lambda: ["hybrid_rl/GuessNumber-v0"])
    demos: DemoConfig = field(default_factory=DemoConfig)
    sft: PipelineSFTConfig = field(default_factory=PipelineSFTConfig)
    rl: PipelineRLConfig = field(default_factory=PipelineRLConfig)
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if not self.envs:
            raise ValueError("envs is empty: name at least one environment with an expert, e.g. [hybrid_rl/GuessNumber-v0]")
        # what the pipeline sets itself: a value given here would be replaced without a word
        given = [key for key, value in (("sft.data.envs", self.sft.data.envs), ("sft.data.jsonl_paths", self.sft.data.jsonl_paths),
                                        ("sft.eval.env_ids", self.sft.eval.env_ids)) if value]
        # (these two only act on sft.data.envs, which the pipeline leaves empty: demos.keep_failed decides there,
        # and the demonstrations are always written to the run's demonstrations.jsonl)
        given += [f"sft.data.{key}" for key in ("keep_failed_demos", "save_demos")
                  if getattr(self.sft.data, key) != getattr(DataConfig(), key)]
        if given:
            raise ValueError(f"{', '.join(given)}: the pipeline makes its SFT data from demos.* on envs and evaluates on envs; "
                             "leave these out (demos.keep_failed keeps failed demonstrations; run `hybrid-rl sft` to "
                             "train on data of your own)")
        splits = [f"{stage}.eval.split={split}" for stage, split in (("sft", self.sft.eval.split), ("rl", self.rl.eval.split))
                  if split != "eval" and split != self.eval.split]  # ("eval", the default: set from eval.split)
        if splits:
            raise ValueError(f"{', '.join(splits)}: the stages' evals play the seeds of eval.split={self.eval.split}, so "
                             "that a val run never shows a held-out figure; set eval.split instead")
        # the SFT stage's evals play by RL's turn rules (set from rl.rollout, so both rows are measured alike)
        rules = [f"sft.eval.{key}" for key, rl_value in self.turn_rules().items()
                 if getattr(self.sft.eval, key) not in (getattr(SFTEvalConfig(), key), rl_value)]
        if rules:
            raise ValueError(f"{', '.join(rules)}: the SFT stage's evals play by the RL rollouts' turn rules, so that "
                             "the SFT and RL figures are measured alike; set rl.rollout.sampling.stop_strings / "
                             "ascii_only, rl.rollout.env_timeout_s / end_on_invalid_action instead")
        many = [f"{stage}.train.processes={train.processes}" for stage, train in (("sft", self.sft.train), ("rl", self.rl.train))
                if train.processes > 1]
        if many:
            raise ValueError(f"{', '.join(many)}: the pipeline runs its stages in one process; start several with "
                             "`hybrid-rl sft|rl ... train.processes=N` (each launches its own processes)")

    def turn_rules(self) -> dict:
        """The RL rollouts' turn rules, as ``SFTEvalConfig`` keys: the SFT stage's evals play by them too."""
        rollout = self.rl.rollout
        return {"stop_strings": list(rollout.sampling.stop_strings), "ascii_only": rollout.sampling.ascii_only,
                "env_timeout_s": rollout.env_timeout_s, "end_on_invalid_action": rollout.end_on_invalid_action}


# ------------------------------------------------------------------------------ the stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "quickstart.yaml")


def run(args: argparse.Namespace) -> int:
    from hybrid_rl.envs import check_env_ids

    cfg = resolve_config(PipelineStageConfig, args)
    if cfg is None:
        return 0
    check_env_ids(cfg.envs, cfg.rl.rollout.pool.env_modules, cfg.rl.rollout.env_timeout_s)
    from hybrid_rl.sft.data import DataError

    try:
        results = pipeline(cfg)
    except DataError as err:  # e.g. a demonstration longer than sft.data.max_seq_tokens
        print(f"hybrid-rl pipeline: error: {err}", file=sys.stderr)
        return 2
    print(results["markdown"])
    return 0


def pipeline(cfg: PipelineStageConfig) -> dict:
    """Demos -> SFT -> RL -> eval of both; returns the results dict (also written to results.json/.md)."""
    from hybrid_rl.config import save_config
    from hybrid_rl.rl.train import train as rl_train
    from hybrid_rl.sft.train import train as sft_train

    check_init_from(cfg.init_from)
    t0 = time.time()
    name = cfg.run.name or f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(cfg.run.output_dir) / name
    if base.exists() and any(base.iterdir()) and not cfg.run.overwrite:
        raise FileExistsError(f"{base} already exists; pick another run.name or pass run.overwrite=true")
    base.mkdir(parents=True, exist_ok=True)
    save_config(cfg, base / "config.yaml")
    stage_run = lambda stage: RunConfig(**{**vars(cfg.run), "name": f"{name}/{stage}", "group": cfg.run.group or name,  # noqa: E731
                                           "tags": [*cfg.run.tags, stage]})

    demos = write_demos(cfg, base / "demonstrations.jsonl")
    log.info("demonstrations: %s", demos)

    from hybrid_rl.sft.config import SFTStageConfig

    data = DataConfig(**{**vars(cfg.sft.data), "envs": [], "jsonl_paths": [str(base / "demonstrations.jsonl")]})
    sft_eval = SFTEvalConfig(**{**vars(cfg.sft.eval), "env_ids": list(cfg.envs), "split": cfg.eval.split, **cfg.turn_rules()})
    sft_cfg = SFTStageConfig(run=stage_run("sft"), model=cfg.model, init_from=cfg.init_from or None, data=data,
                             train=cfg.sft.train, eval=sft_eval, logging=cfg.logging)
    t_sft = time.time()
    sft_summary = sft_train(sft_cfg)
    t_sft = time.time() - t_sft

    from hybrid_rl.rl.config import RLStageConfig

    rl_cfg = RLStageConfig(run=stage_run("rl"), model=cfg.model, init_from=sft_summary["checkpoint"], envs=list(cfg.envs),
                           rollout=cfg.rl.rollout, algo=cfg.rl.algo, train=cfg.rl.train,
                           eval=dataclasses.replace(cfg.rl.eval, split=cfg.eval.split),  # no held-out figure in a val run
                           checkpoint=cfg.rl.checkpoint, logging=cfg.logging)
    t_rl = time.time()
    rl_result = rl_train(rl_cfg)
    t_rl = time.time() - t_rl

    t_eval = time.time()
    table = compare_checkpoints(cfg, stage_run("eval"), {"sft": sft_summary["checkpoint"], "rl": rl_result["checkpoint"]})
    results = {
        "name": name, "envs": list(cfg.envs), "eval_seeds": f"envs.seeds(env, '{cfg.eval.split}', {cfg.eval.episodes_per_env})",
        "demos": demos, "results": table, "baselines": scripted_baselines(cfg),
        "time_s": {"sft": round(t_sft, 1), "rl": round(t_rl, 1), "eval": round(time.time() - t_eval, 1),
                   "total": round(time.time() - t0, 1)},
        "runs": {"sft": sft_summary["run_dir"], "rl": rl_result["run_dir"], "eval": str(base / "eval")},
        "checkpoints": {"sft": sft_summary["checkpoint"], "rl": rl_result["checkpoint"]},
    }
    if "best" in rl_result:  # rl.eval.select_best: the RL step kept for its val success, not the last step
        results["rl_selected"] = rl_result["best"]
    results["markdown"] = results_markdown(results)
    (base / "results.json").write_text(json.dumps(json_safe({k: v for k, v in results.items() if k != "markdown"}), indent=1) + "\n")
    (base / "results.md").write_text(results["markdown"])
    return results


def check_init_from(directory: str) -> None:
    """A ``ConfigError`` naming the problem and the fix unless ``directory`` is empty or a NemotronH checkpoint
    with a chat tokenizer whose ids fit the model's embeddings."""
    from hybrid_rl.config import ConfigError
    from hybrid_rl.model.hf import CheckpointError, read_config
    from hybrid_rl.model.tokenizer import load_tokenizer

    if not directory:
        return
    try:
        model_cfg = read_config(directory)
    except (OSError, CheckpointError) as err:
        raise ConfigError(f"init_from={directory} is not a NemotronH checkpoint: {err}") from None
    if not (Path(directory) / "tokenizer_config.json").is_file():
        raise ConfigError(f"init_from={directory} has no tokenizer (no tokenizer_config.json); save the model's tokenizer "
                          "beside its weights with tokenizer.save_pretrained(DIR), a chat_template included")
    try:
        tokenizer = load_tokenizer(directory)
    except ValueError as err:  # no chat template, or one that cannot end an assistant turn
        raise ConfigError(f"init_from={directory}: {err}") from None
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"init_from={directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"embeddings only {model_cfg.vocab_size}; save the model after "
                          "model.resize_token_embeddings(len(tokenizer)), or use the tokenizer it was trained with")


def scripted_baselines(cfg: PipelineStageConfig) -> dict:
    """Held-out success and mean turns of the scripted policies on the eval seeds the checkpoints play:
    {"random" | "teacher" | "expert": {env_key: {"success", "turns", "return"}}}; an env without that policy
    (a plain gymnasium env has no expert) is left out of it."""
    from hybrid_rl import envs

    out: dict[str, dict] = {}
    for who, policy, noise in (("random", "random", None), ("teacher", cfg.demos.teacher, cfg.demos.noise),
                               ("expert", "expert", 0.0)):
        for env_id in cfg.envs:
            try:
                stats = envs.expert_stats(env_id, cfg.eval.episodes_per_env, split=cfg.eval.split, noise=noise, policy=policy)
            except ValueError as err:  # the env has no such teacher; the message says which
                log.info("no %s baseline: %s", who, err)
                continue
            out.setdefault(who, {})[env_key(env_id)] = {"success": stats["success_rate"], "turns": stats["mean_turns"],
                                                        "return": stats["mean_return"]}
    return out


def write_demos(cfg: PipelineStageConfig, path: Path) -> dict:
    """The teacher's conversations as SFT JSONL ({"messages": ...}); returns its success rate per env."""
    from hybrid_rl import envs

    stats = {}
    with path.open("w") as fh:
        for env_id in cfg.envs:
            wins = kept = 0
            for seed in envs.seeds(env_id, "train", cfg.demos.episodes_per_env):
                episode = envs.expert_episode(env_id, seed, noise=cfg.demos.noise, policy=cfg.demos.teacher)
                messages = list(episode.messages)
                while messages and messages[-1]["role"] != "assistant":  # nothing to learn after the last action
                    messages.pop()
                wins += episode.success
                if messages and (episode.success or cfg.demos.keep_failed):
                    kept += 1
                    fh.write(json.dumps({"messages": messages, "env_id": env_id, "seed": seed}) + "\n")
            stats[env_key(env_id)] = {"episodes": kept, "teacher": cfg.demos.teacher, "noise": cfg.demos.noise,
                                      "teacher_success": wins / cfg.demos.episodes_per_env}
    return stats


def compare_checkpoints(cfg: PipelineStageConfig, run: RunConfig, checkpoints: dict[str, str]) -> dict:
    """Eval of each checkpoint on the same held-out seeds at each eval temperature, logged as a run of its own."""
    import torch

    from hybrid_rl.metrics import MetricsLogger
    from hybrid_rl.run import make_run_dir
    from hybrid_rl.model.hf import load_pretrained
    from hybrid_rl.model.tokenizer import checkpoint_tokenizer
    from hybrid_rl.rollout.evaluate import evaluate_policy, sample_row

    run_dir = make_run_dir(run, "eval", cfg)
    with MetricsLogger(cfg.logging, run_dir, run.name.replace("/", "-"), {"checkpoints": checkpoints},
                       group=run.group, tags=run.tags) as logger:  # closed as failed if an eval raises
        table: dict[str, dict[str, dict[str, float]]] = {}  # stage -> "T=0" -> eval/... metrics
        device = "cuda" if torch.cuda.is_available() else "cpu"  # where the stages trained and evaluated
        for i, (stage, path) in enumerate(checkpoints.items()):
            model, tokenizer = load_pretrained(path, device=device).float(), checkpoint_tokenizer(path)
            row = {}
            for temp in cfg.eval.temperatures:
                # (both checkpoints by the RL rollouts' turn rules: stop strings, byte ban, env time, invalid actions)
                metrics, trajectories = evaluate_policy(model, tokenizer, cfg.envs, cfg.eval.episodes_per_env,
                                                        split=cfg.eval.split, temperature=temp,
                                                        max_turn_tokens=cfg.eval.max_turn_tokens,
                                                        rollout_like=(cfg.rl.rollout.sampling, cfg.rl.rollout.episode_config()))
                table.setdefault(stage, {})[f"T={temp:g}"] = metrics
                if temp == 0:  # greedy under the plain names; sampled success beside them
                    row.update(metrics)
                else:
                    row.update({k.replace("eval/success", f"eval/success_t{temp:g}", 1): v
                                for k, v in metrics.items() if k.startswith("eval/success")})
                logger.log_samples([sample_row(t, stage=stage, temperature=temp) for t in trajectories[:2]], step=i)
            logger.log(row, step=i)  # step 0 = the SFT checkpoint, step 1 = the RL checkpoint
    return table


def read_results(base: Path) -> dict:
    """A pipeline's ``results.json``, its figures (``results``, ``baselines``) with ``null`` read back as NaN: the file
    is strict JSON (``json_safe``), and its readers do arithmetic and formatting on the figures."""
    def nan_for_null(obj):
        if obj is None:
            return math.nan
        if isinstance(obj, dict):
            return {k: nan_for_null(v) for k, v in obj.items()}
        return [nan_for_null(v) for v in obj] if isinstance(obj, list) else obj

    res = json.loads((Path(base) / "results.json").read_text())
    return {**res, **{key: nan_for_null(res[key]) for key in ("results", "baselines") if key in res}}


def success_se(p: float, n: int) -> float:
    """Binomial standard error of a success rate p over n episodes."""
    return (p * (1 - p) / max(n, 1)) ** 0.5


def results_markdown(results: dict) -> str:
    table, base = results["results"], results.get("baselines", {})
    n = int(results["eval_seeds"].rsplit(",", 1)[-1].strip(" )"))
    lines = [f"## {results['name']}: held-out success ({results['eval_seeds']}), greedy, +- binomial standard error", "",
             "| env | random | teacher | SFT | RL | expert |", "|---|---:|---:|---:|---:|---:|"]
    for env_id in results["envs"]:
        key = env_key(env_id)
        cell = lambda p: f"{p:.2f} +- {success_se(p, n):.2f}"  # noqa: E731
        scripted = {who: cell(base[who][key]["success"]) if key in base.get(who, {}) else "-" for who in ("random", "teacher", "expert")}
        lines.append(f"| {key} | {scripted['random']} | {scripted['teacher']} | {cell(table['sft']['T=0'][f'eval/success/{key}'])} "
                     f"| {cell(table['rl']['T=0'][f'eval/success/{key}'])} | {scripted['expert']} |")
    lines += ["", "| env | sampling | metric | SFT | RL | change |", "|---|---|---|---:|---:|---:|"]
    for env_id in results["envs"]:
        for temp in table["sft"]:
            how = "greedy" if temp == "T=0" else temp
            for what in ("success", "return", "turns"):
                key = f"eval/{what}/{env_key(env_id)}"
                sft, rl = table["sft"][temp][key], table["rl"][temp][key]
                lines.append(f"| {env_key(env_id)} | {how} | {what} | {sft:.3f} | {rl:.3f} | {rl - sft:+.3f} |")
    t = results["time_s"]
    if "rl_selected" in results:  # rl.eval.select_best
        sel = results["rl_selected"]
        lines += ["", f"RL checkpoint: step {sel['step']}, the RL step with the highest val success ({sel['val/success']:.2f}; "
                      "rl.eval.select_best, val seeds only)"]
    lines += ["", f"time: SFT {t['sft']:.0f} s, RL {t['rl']:.0f} s, eval {t['eval']:.0f} s, total {t['total']:.0f} s",
              f"runs: {', '.join(results['runs'].values())}", ""]
    return "\n".join(lines)
