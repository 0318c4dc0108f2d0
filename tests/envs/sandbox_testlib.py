"""What the sandbox tests share: the sandboxes a test started (each leads its own process group), and which of
their processes still live."""

from __future__ import annotations

import subprocess
from pathlib import Path

SPAWNED: list[int] = []  # the pids of the sandboxes started in this test process


class RecordingPopen(subprocess.Popen):
    """``subprocess.Popen`` that records the pid (patched into ``envs.sandbox`` by the tests' fixtures)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SPAWNED.append(self.pid)


def sandbox_processes() -> list[int]:
    """Live processes in the process group of any sandbox started here (other test runs' are not)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # the process ended while we looked
            continue
        fields = stat.rpartition(")")[2].split()
        if fields and int(fields[2]) in SPAWNED and fields[0] != "Z":
            found.append(int(entry.name))
    return found
