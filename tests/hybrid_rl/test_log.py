"""setup_logging configures the project's logger and nothing else of the process's logging."""

import subprocess
import sys
import textwrap

import pytest

from hybrid_rl.log import setup_logging


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this process's logging is pytest's, configured already)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_setup_logging_leaves_the_root_logger_and_other_libraries_alone():
    out = _run("""
        import logging
        from hybrid_rl.log import setup_logging
        root = logging.getLogger()
        before = (root.level, list(root.handlers))
        setup_logging("INFO")
        setup_logging("INFO")  # a second command in the same process
        assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)
        assert len(logging.getLogger("hybrid_rl").handlers) == 1
        logging.getLogger("hybrid_rl.rl").info("ours at info")
        logging.getLogger("otherlib").info("theirs at info")
        logging.getLogger("otherlib").warning("theirs at warning")
        setup_logging("INFO", quiet=True)
        logging.getLogger("hybrid_rl.rl").info("ours quiet info")
        logging.getLogger("hybrid_rl.rl").warning("ours quiet warning")
    """)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    ours = [line for line in lines if "ours at info" in line]
    assert len(ours) == 1 and " INFO hybrid_rl.rl: ours at info" in ours[0], lines
    assert not any("theirs at info" in line for line in lines), lines  # root stays at WARNING
    assert [line for line in lines if "theirs at warning" in line] == ["theirs at warning"], lines  # Python's default
    assert not any("ours quiet info" in line for line in lines), lines
    assert sum("ours quiet warning" in line for line in lines) == 1, lines


def test_setup_logging_uses_the_host_s_handlers_when_it_configured_logging():
    out = _run("""
        import logging, sys
        logging.basicConfig(stream=sys.stdout, level=logging.ERROR, format="HOST %(name)s %(message)s")
        from hybrid_rl.log import setup_logging
        setup_logging("INFO")
        assert logging.getLogger("hybrid_rl").handlers == []
        assert logging.getLogger().level == logging.ERROR
        logging.getLogger("hybrid_rl.sft").info("step 1")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["HOST hybrid_rl.sft step 1"], out.stdout + out.stderr
    assert "step 1" not in out.stderr


def test_setup_logging_rejects_an_unknown_level_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown log level 'LOUD'.*DEBUG, INFO, WARNING, ERROR"):
        setup_logging("LOUD")
