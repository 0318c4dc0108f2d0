"""SFT data rows that used to stop a run or train silently on the wrong thing: each is now a bad sample with its
``file:LINE``, the problem and the fix, skipped and counted (``on_bad_sample=skip``) or reported (``error``)."""

from __future__ import annotations

import json
import re

import pytest

from hybrid_rl.model.tokenizer import ByteTokenizer, HFChatTokenizer
from hybrid_rl.sft.config import DataConfig
from hybrid_rl.sft.data import DataError, load_samples

TOK = ByteTokenizer()
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CALL = '<tool_call>{"name": "calc", "arguments": {"expression": "2+2"}}</tool_call>'
ONE_TOOL = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": CALL},
                         {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}
TWO_TOOLS = {"messages": [{"role": "user", "content": "2+2 and 3+3?"}, {"role": "assistant", "content": CALL + CALL},
                          {"role": "tool", "content": "4"}, {"role": "tool", "content": "6"},
                          {"role": "assistant", "content": "4 and 6"}]}

# The byte tokenizer's template, except that consecutive tool messages share one <|tool|> ... <|end|> turn
# (joined by a newline), as Qwen-style templates group tool responses.
GROUPING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|tool|>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{{ m['content'] }}{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|end|>' }}{% endif %}"
    "{% else %}{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] ~ '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _load(path, tokenizer=TOK, on_bad_sample="skip", **kw):
    return load_samples(DataConfig(jsonl_paths=[str(path)], on_bad_sample=on_bad_sample, max_seq_tokens=512, **kw),
                        tokenizer)


def test_a_row_the_chat_template_cannot_split_per_message_is_a_bad_sample_not_a_crash(tmp_path, caplog):
    """Two tool messages in a row under a template that groups them: strict render_chat raised a bare ValueError
    ("pass strict=False") that stopped the run even with on_bad_sample=skip; now a 'template' bad sample."""
    pytest.importorskip("transformers")
    hf = TOK.to_hf()
    hf.chat_template = GROUPING_TEMPLATE
    tok = HFChatTokenizer(hf)
    path = _write(tmp_path / "chat.jsonl", [GOOD, TWO_TOOLS, ONE_TOOL])
    with caplog.at_level("WARNING"):
        samples, report = _load(path, tok)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:3"]
    assert samples[1].ids == tok.render_chat(ONE_TOOL["messages"])[0]  # one tool message: the template splits it
    assert dict(report.skipped) == {"template": 1} and report.metrics()["train/skipped_samples/template"] == 1
    (example,) = report.examples
    assert example.startswith(f"{path}:2: ") and "message 3 (tool)" in example
    assert "messages 2 and 3 are two 'tool' messages in a row" in example and "merge them into one 'tool' message" in example
    assert "strict=False" not in example  # not a fix a user can apply from the config
    assert f"{path}:2" in caplog.text
    with pytest.raises(DataError) as err:
        _load(path, tok, on_bad_sample="error")
    text = str(err.value)
    assert f"{path}:2: " in text and "two 'tool' messages in a row" in text and "on_bad_sample=skip" in text


def test_structured_tool_calls_are_a_bad_sample_naming_the_text_format(tmp_path, caplog):
    """{"content": "", "tool_calls": [...]} trained an empty reply; "content": null was a generic format error.
    Both are now 'tool_calls' bad samples that say how to write the call as text in content."""
    call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "2+2"}'}}
    empty = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}
    null = json.loads(json.dumps(empty))
    null["messages"][1]["content"] = None
    no_calls = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello", "tool_calls": []}]}  # nothing to lose: kept
    path = _write(tmp_path / "chat.jsonl", [GOOD, empty, null, no_calls])
    with caplog.at_level("WARNING"):
        samples, report = _load(path)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert dict(report.skipped) == {"tool_calls": 2}
    as_text = json.dumps('<tool_call>{"name": "calc", "arguments": {"expression": "2+2"}}</tool_call>')
    for lineno, example in zip((2, 3), report.examples):
        assert example.startswith(f"{path}:{lineno}: message 1 (assistant) has structured \"tool_calls\"")
        assert "<tool_call>" in example and "</tool_call>" in example and f'"content": {as_text}' in example
    with pytest.raises(DataError) as err:
        _load(path, on_bad_sample="error")
    text = str(err.value)
    assert f"{path}:2: " in text and "tool_calls" in text and "format_tool_call" in text and "on_bad_sample=skip" in text


def test_a_cut_off_row_says_so_at_its_line_and_a_directory_is_named_as_one(tmp_path):
    """'{"messages": [' was "not valid JSON (Expecting value at column 1)": the newline after the row made json
    report the column of the next line. A directory in data.jsonl_paths was said not to exist."""
    path = _write(tmp_path / "chat.jsonl", [GOOD, '{"messages": [', GOOD, '{"messages": [{"role": "user", "content": "hel'])
    samples, report = _load(path)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:3"] and dict(report.skipped) == {"not_json": 2}
    cut, unterminated = report.examples
    assert cut.startswith(f"{path}:2: the row is cut off: it ends at column 14 before its JSON is complete")
    assert "column 1)" not in cut and "one whole JSON object" in cut
    assert unterminated.startswith(f"{path}:4: the row is cut off: a string opened at column 43 is never closed")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the row is cut off")):
        _load(path, on_bad_sample="error")

    with pytest.raises(FileNotFoundError) as err:
        _load(tmp_path)
    assert f"{tmp_path} is a directory" in str(err.value) and str(path) in str(err.value)
    assert "does not exist" not in str(err.value)
