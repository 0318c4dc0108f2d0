"""Fixtures of the SFT tests (helpers live in sft_testlib.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_testlib import write_chat_jsonl


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    return write_chat_jsonl(tmp_path / "chat.jsonl")
