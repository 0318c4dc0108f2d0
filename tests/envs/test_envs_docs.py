"""The complete example in docs/ENVIRONMENTS.md runs as written."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "ENVIRONMENTS.md"


def complete_example() -> str:
    match = re.search(r"<!-- complete-example -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} lost its <!-- complete-example --> python block"
    return match.group(1)


def test_the_docs_example_is_short():
    code = [line for line in complete_example().splitlines() if line.strip()]
    assert len(code) <= 30


def test_the_docs_example_runs_and_its_env_passes_the_check():
    result = subprocess.run([sys.executable, "-c", complete_example()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "hybrid_rl/Countdown-v0: PASS" in result.stdout
    assert "success 100.0%" in result.stdout and "[assistant]" in result.stdout
