"""The ``Trajectory`` record: one episode as flat token arrays plus its conversation and outcome.

Token ids are carried from generation to training, never re-tokenized from text. Arrays are aligned
per token (length T): ``token_ids``, ``is_action`` (1 = sampled by the policy, trained on),
``logprobs`` (log-prob of an action token under the plain softmax of the logits, 0 elsewhere; this is
what the training forward recomputes), ``sample_logprobs`` (under the distribution actually sampled
from: temperature / top-k / top-p; 0 elsewhere and 0 for greedy), ``policy_version`` (the weights
version in use when the token was appended). ``routed_experts`` is ``[T][n_moe_layers][k]`` when the
rollout recorded routing, else None.

Per turn (one entry per env step): ``step_rewards`` (the env's reward), ``reward_components`` (the named
parts of that reward, ``info["reward_components"]``, or ``{"reward": r}`` when the env gives none).
``states``: per action turn, the state the env said the action was taken from (``info["state"]`` of the
reset or of the step before; "" where it named none).
``overlong_turns`` lists the turns whose action hit ``max_turn_tokens`` and was closed by force.
The action tokens of turn k are the k-th run of consecutive ``is_action`` ones (``action_turn_index``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

STATUSES = ("terminated", "truncated", "env_error", "timeout", "invalid_action")
# episodes whose outcome says nothing about the policy: kept in the records, left out of group statistics
FAILED_STATUSES = ("env_error", "timeout")


@dataclass
class Trajectory:
    env_id: str
    seed: int
    group_id: int = 0
    sample_index: int = 0  # which of the group's G samples
    status: str = "truncated"
    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}] as rendered
    token_ids: list[int] = field(default_factory=list)
    is_action: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)
    policy_version: list[int] = field(default_factory=list)
    routed_experts: list[list[list[int]]] | None = None
    step_rewards: list[float] = field(default_factory=list)
    reward_components: list[dict[str, float]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)  # per action turn: info["state"] before it, "" if none
    overlong_turns: list[int] = field(default_factory=list)
    episode_return: float = 0.0
    success: bool = False
    num_turns: int = 0
    num_invalid_actions: int = 0
    error: str = ""  # what went wrong for env_error / timeout
    worker: str = ""  # which worker played it (debugging)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")

    # ------------------------------------------------------------------ derived
    @property
    def failed(self) -> bool:
        """True for env_error / timeout: keep the record, leave it out of group statistics and the loss."""
        return self.status in FAILED_STATUSES

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_action_tokens(self) -> int:
        return int(sum(self.is_action))

    def action_turn_index(self) -> list[int]:
        """Per token, the turn its action belongs to (0, 1, ...), -1 off the actions."""
        out, turn, prev = [], -1, 0
        for a in self.is_action:
            if a and not prev:
                turn += 1
            out.append(turn if a else -1)
            prev = a
        return out

    def check(self) -> None:
        """Raise ValueError when the per-token arrays disagree in length."""
        n = len(self.token_ids)
        arrays = {"is_action": self.is_action, "logprobs": self.logprobs, "sample_logprobs": self.sample_logprobs,
                  "policy_version": self.policy_version}
        if self.routed_experts is not None:
            arrays["routed_experts"] = self.routed_experts
        bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
        if bad:
            raise ValueError(f"trajectory {self.env_id} seed {self.seed}: {len(self.token_ids)} token ids but lengths {bad}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "Trajectory":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Trajectory field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, line: str) -> "Trajectory":
        return cls.from_dict(json.loads(line))


def write_jsonl(trajectories: Iterable[Trajectory], path: str | Path, append: bool = False) -> Path:
    """One trajectory per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as fh:
        for traj in trajectories:
            fh.write(traj.to_json() + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Trajectory]:
    return [Trajectory.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]
