"""docs/METRICS.md's RL table against what a short RL run logs, both ways: every documented series is
logged (with the options that add it switched on), and nothing logged is missing from the page."""

from __future__ import annotations

import re
from pathlib import Path

from hybrid_rl.cli import main
from hybrid_rl.metrics import read_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
SMOKE = ["init_from=", "model.preset=micro", "model.hidden_size=64", "envs=[hybrid_rl/GuessNumber-v0]",
         "rollout.prompts_per_step=2", "rollout.samples_per_prompt=3", "rollout.max_turn_tokens=3",
         "rollout.max_episode_tokens=256", "rollout.pool.num_workers=0", "train.micro_batch_tokens=512",
         "eval.episodes_per_env=2", "eval.every_steps=0", "logging.backends=[jsonl]", "logging.report=false",
         "run.quiet=true", "train.steps=2"]
# every option that adds a series; skip_zero_advantage off and an entropy bonus so that every step trains
# (clip-cov logs the covariance series; kl-cov logs the same names)
ALL_ON = ["algo.policy_loss=clip-cov", "algo.kl_beta=0.01", "algo.routing_replay=true", "algo.log_routing_mismatch=true", "algo.dynamic_sampling=true", "algo.max_refill_rounds=1",
          "train.moe_bias_update_rate=0.001", "algo.entropy_coef=0.01", "algo.skip_zero_advantage=false",
          "algo.credit=state", "eval.select_best=true", "eval.select_episodes_per_env=2"]


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _patterns(section: str) -> list[str]:
    """The backticked names of the first column of the section's table, as regexes (<env>, <i>, * are wildcards)."""
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names += [n for n in re.findall(r"`([^`]+)`", first) if "/" in n]
    return names


def _regex(name: str, env_optional: bool = False) -> re.Pattern:
    """``<env>`` and ``<component>`` one name part (``<env>`` optional with ``env_optional``: the eval table's mean
    over envs), ``<i>`` digits. A ``*`` is not accepted: it would let any name under its prefix pass unlisted."""
    assert "*" not in name, f"docs/METRICS.md lists {name!r}: name the series (placeholders <env>, <component>, <i>)"
    body = re.escape(name.replace(", ...", ""))
    body = body.replace(re.escape("/<env>"), r"(/[^/]+)?" if env_optional else r"/[^/]+").replace(re.escape("<env>"), r"[^/]+")
    body = body.replace(re.escape("<component>"), r"[^/]+")
    body = re.sub(r"<[a-z]>", r"\\d+", body.replace(r"<", "<").replace(r">", ">"))
    return re.compile(body + "$")


def test_metrics_doc_lists_exactly_what_rl_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rl", *SMOKE, *ALL_ON, "run.name=doc"]) == 0
    capsys.readouterr()
    logged = {k for r in read_metrics(tmp_path / "runs" / "doc") for k in r if k not in ("step", "time", "_time")}
    logged = {k for k in logged if "/" in k}
    rl_names = [n for n in _patterns(_section("## RL (")) if not n.startswith("eval/")]
    eval_names = _patterns(_section("## Eval ("))
    documented = [_regex(n) for n in rl_names] + [_regex(n, env_optional=True) for n in eval_names]
    missing_from_doc = sorted(k for k in logged if not any(p.match(k) for p in documented))
    assert not missing_from_doc, f"logged but not in docs/METRICS.md: {missing_from_doc}"
    never_logged = [n for n in rl_names if not any(_regex(n).match(k) for k in logged)]
    assert not never_logged, f"in docs/METRICS.md's RL table but never logged: {never_logged}"
    never_logged = [n for n in eval_names if not any(_regex(n).match(k) for k in logged)]  # the per-env names too
    assert not never_logged, f"in docs/METRICS.md's Eval table but never logged by the RL stage: {never_logged}"
