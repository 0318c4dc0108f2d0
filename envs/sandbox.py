"""Run model-written Python in a separate, limited process, and describe what happened in one message.

``run_python(code, limits)`` starts ``sandbox_child.py`` in an isolated interpreter (``python -I -S
-B``, an empty environment) whose working directory is a fresh temporary directory, in its own
session; the child sets its limits and kernel isolation, then runs the code (see sandbox_child.py for
the layers and their order). Here, around it:

- the wall-time limit: past ``wall_s`` the whole process group is killed (``os.killpg``); so is any
  process left behind when the code ends;
- the output: stdout and stderr go to an anonymous temporary file (never to a pipe that could fill
  memory here), capped by RLIMIT_FSIZE in the child; the first ``output_bytes`` come back;
- the verdict: ``SandboxResult.status`` is "ok", "error" (the code raised), "blocked" (the sandbox
  refused something) or "killed" (a limit stopped it), and ``message`` says which in words the model
  can act on ("killed: CPU time limit 2 s exceeded"). Nothing the code does raises here.

The verdict comes from one report the child's supervisor process sends on a socket made here (see
sandbox_child.py): the code runs in a worker process forked from it that never holds that socket, and
what the worker reports from inside (each refusal as it happens, then how the code ended) is keyed and
can only add a refusal, never remove one. The order of the verdict is fixed: the wall-time limit, then a
death by signal (the CPU limit, the output limit, any other signal), then a refusal, then the code's
exception; "ok" needs a clean exit and neither. A missing report is never "ok".

What the sandbox does not protect against is listed in docs/ENVIRONMENTS.md ("The Python sandbox").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "CHILD"]

CHILD = Path(__file__).with_name("sandbox_child.py")


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 2            # CPU seconds; the tasks need well under 0.5 s
    wall_s: float = 10.0      # wall seconds: a sleeping or blocked process is killed too; loose for a busy host
    memory_mb: int = 256      # address space (RLIMIT_AS); an interpreter without site-packages needs ~20 MB
    output_bytes: int = 1000  # what comes back to the model (an observation stays short)
    file_bytes: int = 1 << 20  # largest file the code may write, its output included
    disk_bytes: int = 16 << 20  # all its files together (a tmpfs of that size: the "disk" layer, where the kernel allows)
    open_files: int = 32
    processes: int = 8        # RLIMIT_NPROC: threads count too; not enforced for root (see the docs)

    def __post_init__(self):
        for name, value in asdict(self).items():
            whole = name != "wall_s"  # setrlimit and the output cut take whole numbers
            number = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
            if not number or not 0 < value < float("inf"):
                hint = f", e.g. {name}={max(1, int(value))}" if whole and isinstance(value, float) and 0 < value < 1e18 else ""
                raise ValueError(f"SandboxLimits.{name}={value!r}: every limit must be a positive "
                                 f"{'whole' if whole else 'finite'} number{hint}.")


@dataclass
class SandboxResult:
    status: str               # "ok" | "error" | "blocked" | "killed"
    output: str               # stdout and stderr, truncated to output_bytes
    message: str = ""         # the verdict in words, "" when the code ran to the end
    layers: tuple[str, ...] = ()  # kernel isolation in force: "net", "fs", "disk", "sys", "pid", "seccomp"

    def text(self) -> str:
        """The tool message: the output, then the verdict on its own line."""
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.message:
            parts.append(self.message)
        return "\n".join(parts) or "(no output)"


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code`` under ``limits``; returns what it printed and how it ended."""
    with tempfile.TemporaryDirectory(prefix="hybrid-rl-sandbox-") as tmp, tempfile.TemporaryFile() as out:
        # A socket, not a pipe: a pipe can be opened again through /proc/<pid>/fd/N (even for writing);
        # a socket cannot. Our copy of the child's end is closed as soon as the child has it.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours:
            try:
                returncode, timed_out = _spawn(code, tmp, limits, out, theirs)
            finally:
                theirs.close()
            report = _read_report(ours)
        out.seek(0)
        raw = out.read(limits.output_bytes + 1)
        size = out.seek(0, os.SEEK_END)
    output = raw[:limits.output_bytes].decode("utf-8", "replace")
    if size > limits.output_bytes:
        output += f"\n[output truncated at {limits.output_bytes} bytes]"
    verdict, message = _verdict(returncode, timed_out, report, size, limits)
    layers = report.get("layers", [])
    return SandboxResult(verdict, output, message, tuple(x for x in layers if isinstance(x, str)))


def _spawn(code: str, tmp: str, limits: SandboxLimits, out, report: socket.socket) -> tuple[int, bool]:
    argv = [sys.executable, "-I", "-S", "-B", str(CHILD), tmp, json.dumps(asdict(limits)), str(report.fileno())]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env={},
                            pass_fds=(report.fileno(),), start_new_session=True)
    report.close()
    timed_out = False
    try:
        proc.communicate(code.encode("utf-8", "replace"), timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BrokenPipeError:  # the child died before reading its code; its exit status says why
        pass
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return proc.returncode, timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left
        pass


def _read_report(sock: socket.socket) -> dict:
    """The supervisor's report (one JSON object), or {} when it sent none (it died or was killed)."""
    sock.setblocking(False)
    data = b""
    while len(data) < 1 << 16:
        try:
            chunk = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, OSError):
            break
        if not chunk:
            break
        data += chunk
    lines = data.decode("utf-8", "replace").splitlines()
    try:
        report = json.loads(lines[0]) if len(lines) == 1 else None
    except json.JSONDecodeError:
        report = None
    return report if isinstance(report, dict) else {}


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else str(number)


def _verdict(returncode: int, timed_out: bool, report: dict, size: int, limits: SandboxLimits) -> tuple[str, str]:
    """A limit or a signal first, then a refusal, then the code's exception; "ok" only for a clean exit."""
    if timed_out:
        return "killed", f"killed: wall-time limit {limits.wall_s:g} s exceeded"
    worker = report.get("returncode")
    if not isinstance(worker, int) or isinstance(worker, bool):  # no report: the supervisor itself failed
        if returncode < 0:  # (it has no CPU limit of its own: a SIGKILL here is the OOM killer or another process)
            return "killed", f"killed: signal {_signal_name(-returncode)}"
        return "error", f"error: the sandbox did not report how the code ended (exit status {returncode})"
    cpu = report.get("cpu_s")
    cpu = cpu if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) else 0.0
    if worker == -signal.SIGXCPU or (worker == -signal.SIGKILL and cpu >= limits.cpu_s - 0.05):
        return "killed", f"killed: CPU time limit {limits.cpu_s} s exceeded"
    if worker < 0:
        if size >= limits.file_bytes:
            return "killed", f"killed: output limit {limits.file_bytes} bytes exceeded"
        return "killed", f"killed: signal {_signal_name(-worker)}"
    violation = report.get("violation")
    if isinstance(violation, str) and violation:
        return "blocked", f"blocked: {violation}"
    outcome = report.get("outcome") if isinstance(report.get("outcome"), dict) else {}
    if outcome.get("status") == "error":
        message = str(outcome.get("message", ""))
        if message.startswith("MemoryError"):
            message += f" (memory limit {limits.memory_mb} MB)"
        elif "File too large" in message:
            message += f" (file size limit {limits.file_bytes} bytes)"
        return "error", f"error: {message}"
    if worker == 0:  # the code ran to the end, or called os._exit(0): no refusal was reported on the way
        return "ok", ""
    if size >= limits.file_bytes:
        return "killed", f"killed: output limit {limits.file_bytes} bytes exceeded"
    return "error", f"error: the process exited with status {worker}"
