"""SFT data: sources -> conversations -> token rows with an assistant-only loss mask.

Sources (any mix, see ``DataConfig``):
  - expert demonstrations of registered environments, played on the env's *train* seeds
    (``envs.seeds(env_id, "train", n)``; eval uses the disjoint eval seeds);
  - JSONL files, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line;
  - a local HF ``datasets`` directory (``save_to_disk``) with a ``messages`` column.

Rendering is ``hybrid_rl.model.tokenizer.render_chat`` and nothing else, so a conversation's ids and mask are the
very ids the rollout loop builds turn by turn (mask = the assistant's content and closing end token).

Every sample is validated; a bad one is reported with where it came from (``file.jsonl:LINE``,
``dataset[ROW]``, ``env seed``) and a reason, then skipped and counted, or the job stops
(``data.on_bad_sample``). Nothing bad is trained on silently: ``DataReport`` carries the counts.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from hybrid_rl.metrics import env_key
from hybrid_rl.model.tokenizer import ROLES

log = logging.getLogger("hybrid_rl.sft.data")

__all__ = [
    "Sample", "DataError", "DataReport", "expert_conversation", "env_conversations", "read_jsonl",
    "read_hf_dataset", "write_jsonl", "validate_messages", "render_samples", "load_samples",
]

MAX_REPORTED = 20  # bad samples logged one by one; the rest only counted


@dataclass
class Sample:
    ids: list[int]
    mask: list[int]  # 1 = trained on (assistant content + its end token)
    source: str  # "path:LINE", "dataset[ROW]" or "env_id seed S"

    @property
    def num_trained_tokens(self) -> int:
        """Tokens whose *prediction* is trained: masked positions after the first (nothing predicts token 0)."""
        return sum(self.mask[1:])


class DataError(ValueError):
    """Bad training data with ``data.on_bad_sample=error``; the message names the sample and the fix."""


@dataclass
class DataReport:
    kept: Counter = field(default_factory=Counter)  # per source: the env id, jsonl, hf
    skipped: Counter = field(default_factory=Counter)  # per reason kind
    truncated: int = 0  # conversations cut to data.max_seq_tokens (data.truncate)
    examples: list[str] = field(default_factory=list)  # the first MAX_REPORTED "where: why" lines

    def metrics(self) -> dict[str, float]:
        out = {f"train/samples/{env_key(k)}": float(v) for k, v in self.kept.items()}
        out["train/skipped_samples"] = float(sum(self.skipped.values()))
        out.update({f"train/skipped_samples/{k}": float(v) for k, v in self.skipped.items()})
        out["train/truncated_samples"] = float(self.truncated)
        return out


class BadSample(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        # short key for counting: not_utf8, not_json, format, tool_calls, unknown_role, no_assistant, empty_assistant,
        # template, too_long
        self.kind = kind


# ------------------------------------------------------------------------------------ sources


def expert_conversation(env_id: str, seed: int) -> tuple[list[dict], bool]:
    """One expert episode as chat messages: [system], observation, action, ..., action; and its success.

    The final observation (after the episode ends) is dropped: nothing is trained on it and the rollout
    loop never feeds it to the model.
    """
    from hybrid_rl import envs

    episode = envs.expert_episode(env_id, seed)
    messages = list(episode.messages)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages, episode.success


def env_conversations(env_id: str, episodes: int, keep_failed: bool = False) -> Iterator[tuple[str, object]]:
    """(source, {"messages": ...}) for ``episodes`` expert episodes on the env's train seeds."""
    from hybrid_rl import envs

    failed = 0
    for seed in envs.seeds(env_id, "train", episodes):
        messages, success = expert_conversation(env_id, seed)
        if not success and not keep_failed:
            failed += 1
            continue
        yield f"{env_id} seed {seed}", {"messages": messages, "env_id": env_id, "seed": seed}
    if failed:
        log.warning("%s: the expert failed %d of %d episodes; they are left out (data.keep_failed_demos=true keeps them)",
                    env_id, failed, episodes)


def check_jsonl_path(path: str | Path) -> Path:
    """``path`` if it is a file; else ``FileNotFoundError`` saying what it is instead (missing, a directory)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.jsonl"))
        holds = (f"it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found
                 else "it holds no .jsonl file")
        example = path / (found[0] if found else "train.jsonl")
        raise FileNotFoundError(f"data.jsonl_paths: {path} is a directory, not a JSONL file ({holds}); name each .jsonl "
                                f"file itself, e.g. data.jsonl_paths=[{example}]")
    if not path.is_file():
        raise FileNotFoundError(f"data.jsonl_paths: {path} does not exist (give a JSONL file with one conversation per line)")
    return path


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(``path:LINE``, parsed object or a ``BadSample``) per non-blank line (lines count from 1)."""
    path = check_jsonl_path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:  # strictly: a Latin-1 file read with replacement characters would train on U+FFFD
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, BadSample("not_utf8", f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                                   "re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            row = line.rstrip("\r\n")  # the row alone: an error at its end is at its last column, not on the next line
            try:
                yield where, json.loads(row)
            except json.JSONDecodeError as err:
                yield where, BadSample("not_json", _json_error(row, err))


_ONE_ROW_PER_LINE = ("Each line must hold one whole JSON object: was the file truncated, or an object written over "
                     "several lines (pretty-printed)? Complete the row on its line, or remove it")


def _json_error(row: str, err: json.JSONDecodeError) -> str:
    """What is wrong with a row that does not parse, at its column in the row (``err.pos`` counts from the row's start)."""
    column = err.pos + 1
    if err.msg.startswith("Unterminated string"):
        return (f"the row is cut off: a string opened at column {column} is never closed, so the row is not complete "
                f"JSON. {_ONE_ROW_PER_LINE}")
    if err.pos >= len(row.rstrip()):
        return (f"the row is cut off: it ends at column {len(row.rstrip())} before its JSON is complete ({err.msg} "
                f"at the end of the row). {_ONE_ROW_PER_LINE}")
    if err.msg == "Extra data":
        return (f"not valid JSON: more than one JSON value on one line (extra data at column {column}); write one "
                "conversation per line")
    return f"not valid JSON ({err.msg} at column {column})"


def read_hf_dataset(directory: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """(``dir[ROW]``, row dict) for a local ``datasets`` directory (``load_from_disk``)."""
    import datasets

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data.hf_dataset_dir: {directory} is not a directory (expected a datasets.save_to_disk output)")
    ds = datasets.load_from_disk(str(directory))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.hf_dataset_dir {directory} has splits {list(ds)}, not {split!r}; set data.hf_dataset_split")
        ds = ds[split]
    if "messages" not in ds.column_names:
        raise DataError(f"data.hf_dataset_dir {directory} has columns {ds.column_names}; a 'messages' column is needed")
    for row, item in enumerate(ds):
        yield f"{directory}[{row}]", item


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """One JSON object per line (atomic); returns the number of lines."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


# ------------------------------------------------------------------------------------ validation


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads keeps an unpaired \udXXX escape as such a character


def validate_messages(obj: object) -> list[dict]:
    """The conversation's messages, or ``BadSample`` saying what is wrong with it.

    Only ``role`` and ``content`` are read. A message with structured ``tool_calls`` (or a legacy
    ``function_call``) is bad, not trained as its ``content`` alone: its calls belong in ``content`` as text in
    the project's tool-call format (``envs.tools.format_tool_call``)."""
    if isinstance(obj, BadSample):
        raise obj
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadSample("format", 'expected an object with a non-empty "messages" list, got '
                        f"{_short(obj)}")
    for k, m in enumerate(messages):
        if isinstance(m, dict) and (m.get("tool_calls") or m.get("function_call")):
            raise BadSample("tool_calls", _tool_calls_reason(k, m))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            null = isinstance(m, dict) and "content" in m and m["content"] is None
            null = ' ("content" is null: write "" for no text)' if null else ""
            raise BadSample("format", f'message {k} must be {{"role": str, "content": str}}{null}, got {_short(m)}')
        if m["role"] not in ROLES:
            raise BadSample("unknown_role", f"message {k} has unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        lone = _LONE_SURROGATE.search(m["content"])
        if lone:
            raise BadSample("not_utf8", f"message {k}'s content holds a lone surrogate \\u{ord(lone.group()):04x} at character "
                            f"{lone.start() + 1}: half of a UTF-16 pair (a JSON escape like \\ud83d without its partner), "
                            "which has no UTF-8 form; write the whole character (or its pair of escapes) or remove it")
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadSample("empty_assistant", f"message {k} (assistant) is empty: trained as it is it teaches the model to "
                            "end its turn at once (a prompt-only row, as RL datasets have, or a reply lost in export); "
                            "fill in the reply, or drop the message or the row")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample("no_assistant", "conversation has no assistant turn: nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _tool_calls_reason(k: int, message: dict) -> str:
    """Why a message with structured tool calls is bad, and its content with the calls written as text."""
    from hybrid_rl.envs.tools import format_tool_call

    key = "tool_calls" if message.get("tool_calls") else "function_call"
    example = format_tool_call("calc", {"expression": "3*4"})
    head = (f'message {k} ({message.get("role")}) has structured "{key}", which SFT does not read: it renders and trains '
            f'only "content" (here {_short(message.get("content"), 40)}), so the calls would be lost (and an empty '
            f'content trained as the reply). Write each call as text in "content", in the project\'s tool-call format '
            f'{example} (what envs.tools.format_tool_call writes), and remove "{key}"')
    text = _tool_calls_as_text(message, key)
    if text is None:
        return head
    text = json.dumps(text, ensure_ascii=False)
    return head + f'; for this message: "content": {text if len(text) <= 300 else text[:297] + "..."}'


def _tool_calls_as_text(message: dict, key: str) -> str | None:
    """The message's content followed by its calls in the project's format; None if a call is not name+arguments."""
    from hybrid_rl.envs.tools import format_tool_call

    calls = message[key] if key == "tool_calls" else [message[key]]
    if not isinstance(calls, list):
        return None
    parts = [message.get("content") or ""]
    if not isinstance(parts[0], str):
        return None
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return None
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI style: the arguments object as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        parts.append(format_tool_call(fn["name"], arguments))
    return "".join(parts)


def _short(obj: object, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[: n - 3] + "..."


def render_samples(
    items: Iterable[tuple[str, object]],
    tokenizer,
    max_seq_tokens: int,
    on_bad_sample: str,
    report: DataReport,
    kind: str,
    truncate: bool = False,
) -> list[Sample]:
    """Validate and render (source, object) items; bad ones are skipped+counted or raise ``DataError``.
    With ``truncate`` a conversation longer than ``max_seq_tokens`` keeps its first ``max_seq_tokens`` tokens."""
    samples = []
    for where, obj in items:
        try:
            messages = validate_messages(obj)
            try:
                ids, mask = tokenizer.render_chat(messages)
            except _template_errors() as err:  # the checkpoint's template cannot render this row turn by turn
                raise _template_bad(err, messages, tokenizer) from None
            if len(ids) > max_seq_tokens:
                if not truncate:
                    raise BadSample("too_long", f"{len(ids)} tokens is longer than data.max_seq_tokens={max_seq_tokens}; "
                                    "raise it, or set data.truncate=true to train on the first "
                                    f"{max_seq_tokens} tokens")
                if not any(mask[:max_seq_tokens]):
                    raise BadSample("too_long", f"{len(ids)} tokens is longer than data.max_seq_tokens={max_seq_tokens} "
                                    f"and its first {max_seq_tokens} tokens hold no assistant token to train on")
                ids, mask = ids[:max_seq_tokens], mask[:max_seq_tokens]
                report.truncated += 1
        except BadSample as bad:
            _bad(where, bad, on_bad_sample, report)
            continue
        samples.append(Sample(ids, mask, where))
        report.kept[kind] += 1
    return samples


def _template_errors() -> tuple[type[Exception], ...]:
    """What a chat template's rendering raises for a conversation it does not support: ``HFChatTokenizer``'s
    ValueError (the conversation does not split into per-message pieces) and Jinja's ``raise_exception``."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # no transformers/jinja2: only the byte tokenizer, whose rendering never fails after validation
        return (ValueError,)
    return (ValueError, TemplateError)


def _template_bad(err: Exception, messages: list[dict], tokenizer) -> BadSample:
    """A ``template`` BadSample: which message the chat template cannot render as its own turn, and the fix."""
    name = type(getattr(tokenizer, "hf", tokenizer)).__name__
    found = re.search(r"does not render message (\d+)", str(err))
    k = int(found.group(1)) if found else None
    if k is None or not 0 <= k < len(messages):
        return BadSample("template", f"the chat template of the tokenizer ({name}) cannot render this conversation "
                         f"message by message ({err}); this template does not support this conversation: change its messages "
                         "(their order, or merge consecutive messages of one role) or remove the row")
    role = messages[k]["role"]
    why = (f"the chat template of the tokenizer ({name}) renders message {k} ({role}) differently inside the "
           "conversation than as a turn of its own, so SFT would train on other ids than rollout builds turn by turn")
    if k > 0 and messages[k - 1]["role"] == role:
        fix = (f"messages {k - 1} and {k} are two {role!r} messages in a row, which this template groups into one "
               f"turn: merge them into one {role!r} message (join their contents) or remove the row")
    else:
        after = f"after a {messages[k - 1]['role']!r} message" if k else "as the first message"
        fix = (f"this template does not support a {role!r} message {after}; reorder or merge the row's messages, "
               "or remove the row")
    return BadSample("template", f"{why}. Fix: {fix}")


def _bad(where: str, bad: BadSample, on_bad_sample: str, report: DataReport) -> None:
    line = f"{where}: {bad}"
    if on_bad_sample == "error":
        raise DataError(f"bad training sample at {line}. Fix or remove it, or set data.on_bad_sample=skip to skip "
                        "(and count) bad samples.")
    report.skipped[bad.kind] += 1
    if len(report.examples) < MAX_REPORTED:
        report.examples.append(line)
        log.warning("skipping bad sample at %s", line)


def load_samples(data_cfg, tokenizer, demos_path: Path | None = None) -> tuple[list[Sample], DataReport]:
    """All configured sources, validated and rendered, in a fixed order (envs, jsonl files, hf dataset)."""
    report = DataReport()
    samples: list[Sample] = []
    demos: list[dict] = []
    for path in data_cfg.jsonl_paths:  # a wrong path fails now, not after the expert demonstrations are played
        check_jsonl_path(path)
    for spec in data_cfg.envs:
        convs = list(env_conversations(spec.env_id, spec.episodes, data_cfg.keep_failed_demos))
        demos += [obj for _, obj in convs]
        samples += render_samples(convs, tokenizer, data_cfg.max_seq_tokens, data_cfg.on_bad_sample, report,
                                  spec.env_id, data_cfg.truncate)
    if demos and demos_path is not None and data_cfg.save_demos:
        write_jsonl(demos, demos_path)
        log.info("wrote %d expert demonstrations to %s (re-use with data.jsonl_paths)", len(demos), demos_path)
    for path in data_cfg.jsonl_paths:
        samples += render_samples(read_jsonl(path), tokenizer, data_cfg.max_seq_tokens, data_cfg.on_bad_sample,
                                  report, "jsonl", data_cfg.truncate)
    if data_cfg.hf_dataset_dir:
        samples += render_samples(read_hf_dataset(data_cfg.hf_dataset_dir, data_cfg.hf_dataset_split), tokenizer,
                                  data_cfg.max_seq_tokens, data_cfg.on_bad_sample, report, "hf", data_cfg.truncate)
    if report.truncated:
        log.info("truncated %d conversations to data.max_seq_tokens=%d (data.truncate)", report.truncated,
                 data_cfg.max_seq_tokens)
    skipped = sum(report.skipped.values())
    if skipped:
        log.warning("skipped %d bad samples (%s); kept %d", skipped, dict(report.skipped), len(samples))
    if not samples:
        raise DataError(f"no usable training samples (skipped: {dict(report.skipped) or 'none'}); check data.* in the config")
    return samples, report

