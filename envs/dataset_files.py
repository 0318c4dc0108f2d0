"""The rows of a verifiable-answer dataset, read from local files only (no hub access at run time).

Sources: a JSONL file (one JSON object per line; read here, so a bad line is named by file:line), a
``.parquet`` or ``.csv`` file (``datasets.load_dataset``), a folder written by ``Dataset.save_to_disk``
(``datasets.load_from_disk``; for a ``DatasetDict`` name one split's folder), or a list of dicts.

A row needs a non-empty prompt (text, or chat messages whose system and user contents are joined) and
a reference answer (text or a number; ``reference_format`` takes it out of a longer answer, e.g. GSM8K's
``... #### 42``). A row that is not an object, lacks either, or whose prompt is longer than an observation
may be is reported in one warning with its file:line and skipped; a source with no usable row is a
``ValueError`` that names it and says how to fix the column names.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from hybrid_rl.envs.adapters.common import split_prompt
from hybrid_rl.envs.core import MAX_OBS_CHARS, quote
from hybrid_rl.envs.verifiers import ANSWER_FORMATS

__all__ = ["Row", "load_rows", "read_records", "MAX_BAD_ROWS_SHOWN"]

MAX_BAD_ROWS_SHOWN = 20  # the warning lists this many bad rows, then counts the rest
HF_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Row:
    prompt: str
    reference: str  # the answer the verifier compares with, already taken out by reference_format


def load_rows(source: Any, prompt_key: str = "prompt", answer_key: str = "answer",
              reference_format: str = "full") -> list[Row]:
    """The usable rows of ``source`` (a path or a list of dicts); bad rows warn once and are skipped."""
    take_reference = ANSWER_FORMATS.get(reference_format).extract
    rows, bad = [], []
    for where, record in read_records(source):
        row = _row(record, where, prompt_key, answer_key, take_reference, reference_format)
        (rows if isinstance(row, Row) else bad).append(row)
    name = source if isinstance(source, (str, Path)) else "rows"
    if bad:
        shown = "\n".join(f"  {problem}" for problem in bad[:MAX_BAD_ROWS_SHOWN])
        more = f"\n  ... and {len(bad) - MAX_BAD_ROWS_SHOWN} more" if len(bad) > MAX_BAD_ROWS_SHOWN else ""
        warnings.warn(f"{name}: skipped {len(bad)} bad row(s) of {len(rows) + len(bad)}:\n{shown}{more}",
                      RuntimeWarning, stacklevel=2)
    if not rows:
        raise ValueError(f"{name}: no usable rows ({len(bad)} bad). Each row needs a non-empty {prompt_key!r} and "
                         f"{answer_key!r}; name your columns with prompt_key= and answer_key= (GSM8K: "
                         f"prompt_key=question, reference_format=hashes).")
    return rows


def read_records(source: Any) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of ``source``; a JSONL line that is not JSON is an ``Exception``."""
    if isinstance(source, (list, tuple)):
        return ((f"rows[{i}]", record) for i, record in enumerate(source))
    if not isinstance(source, (str, Path)):
        raise ValueError(f"path={source!r}: give a JSONL file, a .parquet/.csv file, a save_to_disk folder or a list of dicts.")
    path = Path(source)
    if path.is_dir():
        return _hf_records(path, _load_from_disk(path))
    if not path.is_file():
        raise ValueError(f"path={str(source)!r}: no such file or folder; give a JSONL file (one JSON object per "
                         f"line), a .parquet/.csv file or a folder written by Dataset.save_to_disk.")
    if path.suffix in HF_SUFFIXES:
        import datasets

        return _hf_records(path, datasets.load_dataset(HF_SUFFIXES[path.suffix], data_files=str(path), split="train"))
    return _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield f"{path}:{number}", _json(line)


def _json(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return ValueError(f"not JSON ({err.msg})")


def _load_from_disk(path: Path):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(f"{path / name}" for name in loaded)
        raise ValueError(f"path={str(path)!r} holds a DatasetDict; name one split's folder: {splits}.")
    return loaded


def _hf_records(path: Path, dataset: Iterable[dict]) -> Iterator[tuple[str, Any]]:
    return ((f"{path}[{i}]", record) for i, record in enumerate(dataset))


def _prompt_text(value: Any) -> str:
    """Text as it is; chat messages (a list of ``{"role", "content"}``) as their system and user text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return ""
    return "\n\n".join(part for part in split_prompt(value) if part.strip())


def _row(record: Any, where: str, prompt_key: str, answer_key: str, take_reference, reference_format: str) -> Row | str:
    """The row, or what is wrong with it (``where: problem``)."""
    if isinstance(record, Exception):
        return f"{where}: {record}"
    if not isinstance(record, dict):
        return f"{where}: a {type(record).__name__}, not an object"
    missing = [key for key in (prompt_key, answer_key) if key not in record]
    if missing:
        return f"{where}: no {' or '.join(map(repr, missing))} (keys: {', '.join(map(str, record)) or 'none'})"
    prompt = _prompt_text(record[prompt_key])
    if not prompt.strip():
        return f"{where}: empty {prompt_key!r}"
    if len(prompt) > MAX_OBS_CHARS:
        return f"{where}: {prompt_key!r} is {len(prompt)} characters, over the {MAX_OBS_CHARS} an observation may have"
    answer = record[answer_key]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        return f"{where}: empty or non-text {answer_key!r}"
    reference = take_reference(str(answer))
    if reference is None:
        return f"{where}: {answer_key!r} {quote(str(answer))} has no answer in the {reference_format!r} format"
    return Row(prompt, reference)
