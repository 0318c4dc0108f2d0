"""The sandbox's ``pid`` layer: the code sees only its own process in ``/proc``.

Without it the code could read ``/proc`` of every process on the machine: the caller's environment
(``/proc/<ppid>/environ``, where API keys live) and command line, and reopen the caller's pipes and files
through ``/proc/<pid>/fd/N``. With it the code runs as PID 1 of a new PID namespace with a procfs of that
namespace on ``/proc``. These tests put a marker where the caller's secrets would be and check that the code
cannot find it, and that the limits and refusals are reported as before now that the code's process is a
namespace's first process (which ignores signals it has no handler for). Where the machine does not allow a
PID namespace and a procfs mount (a probe says, independently of the sandbox), they are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hybrid_rl.envs import sandbox
from hybrid_rl.envs.sandbox import SandboxLimits, run_python
from sandbox_testlib import RecordingPopen, sandbox_processes

LIMITS = SandboxLimits(cpu_s=1, wall_s=5.0, memory_mb=256, output_bytes=2000, file_bytes=1 << 20)
REPO = Path(__file__).resolve().parents[2]

# Whether this machine lets a process make a PID namespace and mount its procfs (the sandbox's way: directly
# as root, else inside a new user namespace); it touches no mount outside its own private mount namespace.
MACHINE_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID = 0x00020000, 0x10000000, 0x20000000
attempts = [NEWNS | NEWPID, NEWUSER | NEWNS | NEWPID][0 if os.geteuid() == 0 else 1:]
if not any(libc.unshare(flags) == 0 for flags in attempts):
    sys.exit("unshare(CLONE_NEWPID) is refused: " + os.strerror(ctypes.get_errno()))
if libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) != 0:
    sys.exit("the mount namespace cannot be made private: " + os.strerror(ctypes.get_errno()))
pid = os.fork()
if pid == 0:
    ok = libc.mount(b"proc", b"/proc", b"proc", 1 | 2 | 4 | 8, None) == 0
    os._exit(0 if ok and os.readlink("/proc/self") == "1" else 1)
sys.exit(0 if os.waitpid(pid, 0)[1] == 0 else "mounting a procfs in a new PID namespace is refused")
"""


@pytest.fixture(scope="module")
def pid_layer():
    """Skip where the machine cannot give the ``pid`` layer; elsewhere every test requires it."""
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", MACHINE_PROBE], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"this machine gives no pid layer: {probe.stderr.strip().splitlines()[-1:]}")


@pytest.fixture(autouse=True)
def record_sandboxes(monkeypatch, pid_layer):
    monkeypatch.setattr(sandbox.subprocess, "Popen", RecordingPopen)


def run(code: str, limits: SandboxLimits = LIMITS, reported: bool = True):
    """``reported``: the sandbox sent its report (not so when the wall-time limit killed it), layers included."""
    result = run_python(code, limits)
    assert "pid" in result.layers or not reported, result
    follow_up = run_python("print(6 * 7)", limits)  # the sandbox is still usable after any attempt
    assert follow_up.status == "ok" and follow_up.text() == "42", follow_up
    assert sandbox_processes() == [], "a sandboxed process outlived its run"
    return result


# The code looks for the marker in every /proc/<pid>/environ and cmdline it can read.
SCAN = """import json, os
seen, read, found = [], 0, []
for name in os.listdir('/proc'):
    if name.isdigit():
        seen.append(name)
        for part in ('environ', 'cmdline'):
            try:
                data = open(f'/proc/{name}/{part}', 'rb').read()
            except OSError:
                continue
            read += 1
            if MARKER.encode() in data:
                found.append(f'{name}/{part}')
print(json.dumps({'seen': seen, 'read': read, 'found': found, 'pid': os.getpid(), 'ppid': os.getppid()}))
"""

# A caller whose environment and command line hold the marker (os.environ set later would not show in /proc).
CALLER = """import json, sys
from hybrid_rl.envs.sandbox import run_python
result = run_python("MARKER = " + repr(sys.argv[1]) + "\\n" + sys.argv[2])
print(json.dumps({"status": result.status, "output": result.output, "message": result.message,
                  "layers": list(result.layers)}))
"""


def test_the_callers_environment_and_command_line_cannot_be_read_through_proc():
    marker = f"HRL-SECRET-{uuid.uuid4().hex}"
    env = {**os.environ, "HRL_SECRET_MARKER": marker}
    proc = subprocess.run([sys.executable, "-c", CALLER, marker, SCAN], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and "pid" in result["layers"], result
    scan = json.loads(result["output"])
    assert scan["read"] >= 1, scan  # it could read its own /proc files: the scan ran
    assert scan["found"] == [] and marker not in result["output"], scan
    assert scan["seen"] == ["1"] and scan["pid"] == 1 and scan["ppid"] == 0, scan


def test_proc_shows_no_process_of_the_caller():
    result = run("import os, json\nprint(json.dumps([n for n in os.listdir('/proc') if n.isdigit()]))\n"
                 "print(open('/proc/self/environ', 'rb').read())")
    assert result.status == "ok", result
    listed, environ = result.output.splitlines()
    assert str(os.getpid()) not in json.loads(listed) and str(os.getppid()) not in json.loads(listed)
    assert json.loads(listed) == ["1"] and environ == "b''"  # the code's own process, started with env={}


def test_a_pipe_the_caller_holds_cannot_be_reopened_through_proc():
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"caller-secret")
        code = (f"import os\ntry:\n    fd = os.open('/proc/{os.getpid()}/fd/{read_end}', os.O_RDONLY | os.O_NONBLOCK)\n"
                "    print(os.read(fd, 100))\nexcept OSError as err:\n    print(type(err).__name__)")
        result = run(code)
        assert result.status == "ok" and "caller-secret" not in result.output, result
        assert result.output == "FileNotFoundError\n", result
        assert os.read(read_end, 100) == b"caller-secret"  # still there: nobody took it
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_DFL)\nwhile True:\n    pass",
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass",
], ids=["loop", "default-handler", "ignored"])
def test_the_cpu_limit_still_kills_the_namespaces_first_process(code):
    """PID 1 of a namespace ignores SIGXCPU without a handler: the limit must still end it, and say so."""
    start = time.monotonic()
    result = run(code)
    assert result.status == "killed" and result.text() == "killed: CPU time limit 1 s exceeded", result
    assert time.monotonic() - start < LIMITS.wall_s  # the CPU limit, not the wall-time limit, ended it


def test_the_wall_time_limit_still_kills_the_namespaces_first_process():
    code = "import os, time\nprint('waiting as', os.getpid(), flush=True)\ntime.sleep(3600)"
    result = run(code, SandboxLimits(cpu_s=1, wall_s=1.0), reported=False)  # the whole process group is killed
    assert result.status == "killed" and result.text() == "waiting as 1\nkilled: wall-time limit 1 s exceeded"


def test_a_socket_is_still_blocked(listener):
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)")
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert result.status == "blocked"
    assert result.message == "blocked: network access is not allowed in the sandbox"


def test_errors_and_output_are_reported_as_before():
    result = run("x = 1\nprint('before')\nx // 0")
    assert result.status == "error"
    assert result.text() == "before\nerror: ZeroDivisionError: integer division or modulo by zero (line 3)"


@pytest.mark.parametrize("code, verdict", [
    ("import signal\nprint('before', flush=True)\nsignal.raise_signal(signal.SIGTERM)\nprint('alive')",
     "before\nkilled: signal SIGTERM"),
    ("import signal, time\nsignal.alarm(1)\ntime.sleep(30)\nprint('alive')", "killed: signal SIGALRM"),
    ("import signal\nsignal.signal(signal.SIGUSR1, lambda *a: print('handled'))\nsignal.raise_signal(signal.SIGUSR1)\n"
     "print('alive')", "handled\nalive"),
    ("import signal\nsignal.signal(signal.SIGUSR1, lambda *a: None)\nassert signal.signal(signal.SIGUSR1, signal.SIG_DFL)"
     " is not signal.SIG_DFL\nassert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL\nprint('default', flush=True)\n"
     "signal.raise_signal(signal.SIGUSR1)\nprint('alive')", "default\nkilled: signal SIGUSR1"),
    ("import signal\nassert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL\nprint('ok', flush=True)", "ok"),
    ("import os\nprint('before', flush=True)\nos.abort()\nprint('alive')", "before\nkilled: signal SIGABRT"),
], ids=["raised", "alarm", "own-handler", "default-set-back", "shown-as-default", "abort"])
def test_a_signal_the_code_raises_at_itself_ends_it_as_it_would_outside(code, verdict):
    """PID 1 of a namespace ignores a signal at its default action: code that raised SIGTERM at itself, or let an
    alarm go off, went on and was reported "ok". It now ends as by that signal; a handler of its own still runs."""
    result = run(code)
    assert result.text() == verdict, result
    assert result.status == ("killed" if "killed" in verdict else "ok")
