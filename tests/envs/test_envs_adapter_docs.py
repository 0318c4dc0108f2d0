"""Each adapter's example in docs/ENVIRONMENTS.md runs as written, in a fresh interpreter."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "ENVIRONMENTS.md"
# adapter -> what its example prints when it works
EXPECTED = {"legacy": ["my/OldCountdown-v0: PASS", "[assistant] 0", "True"],
            "trl": ["my/Vault-v0: PASS", "open 1.0"],
            "nemo_gym": ["my/TwoPlusTwo-v0: PASS", "What is 2+2? 1.0"],
            "skyrl": ["my/Guess-v0: PASS", "Guess my digit. 1.0"]}


def adapter_example(name: str) -> str:
    match = re.search(rf"<!-- adapter-example: {name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} lost its <!-- adapter-example: {name} --> python block"
    return match.group(1)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_adapter_example_runs(name):
    result = subprocess.run([sys.executable, "-c", adapter_example(name)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for piece in EXPECTED[name]:
        assert piece in result.stdout, result.stdout
