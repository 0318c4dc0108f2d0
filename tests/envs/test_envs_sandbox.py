"""The Python sandbox contains each escape the model's code may try, says so, and keeps working after it.

Every test runs the attempt, checks that its effect did not happen (no file outside the sandbox's
directory, no connection to a listener the test opens, no process left behind), that the result
names what stopped it, and that a normal call right after still works. Limits are small so the tests
stay fast. The last tests bypass the audit hook and probe the kernel layers directly (skipped where
the kernel does not provide them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from hybrid_rl.envs import sandbox
from hybrid_rl.envs.sandbox import CHILD, SandboxLimits, run_python
from sandbox_testlib import SPAWNED, RecordingPopen, sandbox_processes

LIMITS = SandboxLimits(cpu_s=1, wall_s=5.0, memory_mb=256, output_bytes=200, file_bytes=1 << 20)


@pytest.fixture(autouse=True)
def record_sandboxes(monkeypatch):
    monkeypatch.setattr(sandbox.subprocess, "Popen", RecordingPopen)


def run(code: str, limits: SandboxLimits = LIMITS):
    result = run_python(code, limits)
    follow_up = run_python("print(6 * 7)", limits)  # the sandbox is still usable after any attempt
    assert follow_up.status == "ok" and follow_up.text() == "42", follow_up
    assert sandbox_processes() == [], "a sandboxed process outlived its run"
    return result


def test_output_and_exceptions_come_back():
    assert run("print(sum(range(10)))").text() == "45" and SPAWNED  # the process check sees our sandboxes
    result = run("x = 1\nprint('before')\nx // 0")
    assert result.status == "error"
    assert result.text() == "before\nerror: ZeroDivisionError: integer division or modulo by zero (line 3)"


def test_infinite_loop_is_killed_at_the_cpu_limit():
    result = run("while True:\n    pass")
    assert result.status == "killed" and result.text() == "killed: CPU time limit 1 s exceeded"


def test_a_process_that_waits_is_killed_at_the_wall_time_limit():
    result = run("import time\nprint('waiting', flush=True)\ntime.sleep(3600)", SandboxLimits(cpu_s=1, wall_s=1.0))
    assert result.status == "killed" and result.text() == "waiting\nkilled: wall-time limit 1 s exceeded"


def test_a_10_gb_allocation_fails_inside_the_sandbox():
    result = run("x = bytearray(10 * 2**30)")
    assert result.status == "error"
    assert result.message == "error: MemoryError (line 1) (memory limit 256 MB)"


def test_output_is_truncated_and_large_files_are_refused():
    result = run("print('x' * 100_000)")
    assert result.output.startswith("x" * 200) and "[output truncated at 200 bytes]" in result.output
    assert len(result.text()) < 400
    result = run("open('big.bin', 'wb').write(b'0' * (2 << 20))")
    assert result.status == "error" and "File too large" in result.message and "file size limit" in result.message


def test_all_files_together_stay_within_the_disk_limit():
    """``file_bytes`` caps each file; with the ``disk`` layer (a tmpfs of ``disk_bytes``) their total is capped
    too: many files under the per-file limit end in ENOSPC instead of filling the host's disk."""
    code = ("n = 0\ntry:\n    for i in range(64):\n        open(f'f{i}', 'wb').write(b'0' * (512 << 10))\n"
            "        n += 1\nexcept OSError as err:\n    print(n, err.strerror)\n")
    result = run_python(code, SandboxLimits(cpu_s=5, disk_bytes=4 << 20))
    if "disk" not in result.layers:
        pytest.skip(f"this kernel gives the sandbox only {result.layers}: no sized tmpfs, only the per-file limit")
    assert result.status == "ok" and result.output.split() == ["8", "No", "space", "left", "on", "device"], result
    assert run_python(code, SandboxLimits(cpu_s=5, disk_bytes=64 << 20)).output == ""  # 32 MB fit in 64


def test_sys_is_empty_with_the_sys_layer():
    """The machine's devices, firmware tables and kernel settings under ``/sys`` are hidden behind an empty
    read-only tmpfs; the standard library still works (``os.cpu_count`` does not read ``/sys``)."""
    result = run("import os\nprint(os.listdir('/sys'), os.cpu_count() > 0)\nopen('/sys/x', 'w')")
    if "sys" not in result.layers:
        pytest.skip(f"this kernel gives the sandbox only {result.layers}")
    assert result.output.splitlines()[0] == "[] True" and result.status in ("blocked", "error"), result
    assert os.listdir("/sys")  # the host's /sys is untouched


FORK_BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()",
    "multiprocessing": "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()",
    "posix_spawn": "import os\nwhile True:\n    os.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 60'], {})",
}


@pytest.mark.parametrize("kind", list(FORK_BOMBS))
def test_a_fork_bomb_starts_no_process(kind):
    result = run(FORK_BOMBS[kind])
    assert result.status == "blocked"
    assert result.message == "blocked: starting processes is not allowed in the sandbox"
    assert sandbox_processes() == []
    os.kill(os.getpid(), 0)  # and this process is alive


@pytest.mark.parametrize("code", [
    "open({target!r}, 'w').write('escaped')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({target!r}).write_text('escaped')",
    "import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('escaped')",
    "import os\nos.chdir('/')\nopen({target!r}.lstrip('/'), 'a').write('escaped')",
], ids=["open", "os.open", "pathlib", "symlink", "relative"])
def test_writes_outside_the_temporary_directory_are_refused(tmp_path, code):
    target = tmp_path / "escaped.txt"
    result = run(code.format(target=str(target)))
    assert not target.exists()
    assert result.status in ("blocked", "error"), result
    assert "writing outside the working directory is not allowed" in result.message or "Read-only" in result.message


def test_existing_files_outside_cannot_be_removed_or_renamed(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    for code in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'stolen')",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):
        result = run(code)
        assert result.status == "blocked" and "writing outside the working directory" in result.message
    assert keep.read_text() == "mine"


def test_files_inside_the_temporary_directory_work():
    assert run("open('a.txt', 'w').write('kept')\nprint(open('a.txt').read())").text() == "kept"
    assert run("import os\nprint(os.listdir('.'))").text() == "[]"  # a fresh directory every call


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
    "import socket\ntry:\n    socket.socket().connect(('127.0.0.1', {port}))\nexcept OSError as err:\n    print('caught')",
], ids=["socket", "urllib", "caught"])
def test_a_socket_connect_never_arrives(listener, code):
    result = run(code.format(port=listener.getsockname()[1]))
    with pytest.raises(BlockingIOError):  # a connection that had been made would be waiting in the backlog
        listener.accept()
    assert result.status == "blocked"
    assert result.message == "blocked: network access is not allowed in the sandbox"


@pytest.mark.parametrize("code", [
    "import os\nos.system('touch {marker}')",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])",
    "import os\nos.execv('/bin/touch', ['touch', '{marker}'])",
    "import os\nos.spawnv(os.P_WAIT, '/bin/touch', ['touch', '{marker}'])",
    "import pty\npty.spawn(['touch', '{marker}'])",
], ids=["os.system", "subprocess", "execv", "spawnv", "pty"])
def test_os_and_subprocess_cannot_run_commands(tmp_path, code):
    marker = tmp_path / "ran"
    result = run(code.format(marker=marker))
    assert not marker.exists()
    assert result.status == "blocked" and "starting processes is not allowed" in result.message


@pytest.mark.parametrize("code, message", [
    ("import os\nos.kill({pid}, 9)", "sending signals is not allowed"),
    ("import os\nos.killpg(0, 9)", "sending signals is not allowed"),
    ("import ctypes\nctypes.CDLL(None).kill({pid}, 9)", "ctypes is not allowed"),
])
def test_signals_and_ctypes_are_refused(code, message):
    result = run(code.format(pid=os.getpid()))
    assert result.status == "blocked" and message in result.message


def test_a_caught_refusal_is_still_reported():
    result = run("import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    pass\nprint('went on')")
    assert result.text() == "went on\nblocked: network access is not allowed in the sandbox"


# ---------------------------------------------------------------------- the kernel layers, hook bypassed

KERNEL_PROBE = """
import json, os, socket, sys
sys.path.insert(0, {folder!r})
import sandbox_child as child
limits = {limits!r}
child.set_limits(limits)
layers = child.isolate({tmp!r}, limits)
refused = {{}}
def attempt(name, fn):
    try:
        fn()
        refused[name] = False
    except OSError:
        refused[name] = True
attempt("fork", lambda: os.fork() == 0 and os._exit(0))
attempt("socket", lambda: socket.socket().connect(("127.0.0.1", {port})))
attempt("write", lambda: open({outside!r}, "w").write("escaped"))
attempt("kill", lambda: os.kill({pid}, 0))
open("inside.txt", "w").write("ok")
print(json.dumps({{"layers": layers, "refused": refused, "inside": open("inside.txt").read()}}))
"""


def test_the_kernel_layers_hold_without_the_audit_hook(tmp_path, listener):
    """What holds when the audit hook is bypassed (ctypes, a C extension): only the kernel layers."""
    outside, work = tmp_path / "escaped.txt", tmp_path / "work"
    work.mkdir()
    script = KERNEL_PROBE.format(folder=str(CHILD.parent), limits=SandboxLimits().__dict__, tmp=str(work),
                                 port=listener.getsockname()[1], outside=str(outside), pid=os.getpid())
    proc = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", script], cwd=work, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    if not {"net", "fs", "seccomp"} <= set(report["layers"]):
        pytest.skip(f"this kernel gives the sandbox only {report['layers']}; the audit hook is the only barrier")
    assert report["refused"] == {"fork": True, "socket": True, "write": True, "kill": True}
    assert not outside.exists() and report["inside"] == "ok"
    # the code's files are in the temporary directory itself, or (``disk`` layer) in the tmpfs on it, which the
    # host does not see: it lives in the sandbox's private mount namespace and goes with it
    assert (work / "inside.txt").exists() == ("disk" not in report["layers"])
    with pytest.raises(BlockingIOError):
        listener.accept()


@pytest.mark.parametrize("kwargs, message", [
    ({"cpu_s": 1.5}, "cpu_s=1.5: every limit must be a positive whole number, e.g. cpu_s=1"),
    ({"memory_mb": 256.5}, "memory_mb=256.5: every limit must be a positive whole number"),
    ({"processes": 0}, "processes=0: every limit must be a positive whole number"),
    ({"wall_s": float("inf")}, "wall_s=inf: every limit must be a positive finite number"),
])
def test_limits_setrlimit_cannot_take_are_refused_when_made(kwargs, message):
    """A fractional limit would make every call's child fail in setrlimit (a TypeError the model would read as its
    own code's output): it is refused when the limits are made, naming the fix."""
    with pytest.raises(ValueError, match=re.escape(message)):
        SandboxLimits(**kwargs)


def test_the_python_tool_env_refuses_a_fractional_cpu_limit():
    from hybrid_rl import envs

    with pytest.raises(ValueError, match=re.escape("SandboxLimits.cpu_s=1.5")):
        envs.make("hybrid_rl/PythonTool-v0", cpu_s=1.5)
