"""The verifiable-answer dataset example in docs/ENVIRONMENTS.md runs as written, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "ENVIRONMENTS.md"


def test_the_dataset_example_runs():
    match = re.search(r"<!-- dataset-example -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} lost its <!-- dataset-example --> python block"
    result = subprocess.run([sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"hybrid_rl/Dataset-v0\(path=\S+math\.jsonl;prompt_key=question;reference_format=hashes\): PASS",
                     result.stdout), result.stdout
    assert "expert on 20 eval seeds: success 100.0%" in result.stdout
    assert re.search(r"\[assistant\] (\d+[-+*/]\d+=\d+\. )*Answer: \d+\n\[user\] correct", result.stdout), result.stdout
    assert "incorrect, try again (1 attempt left) | correct" in result.stdout
