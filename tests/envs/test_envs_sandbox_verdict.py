"""The sandbox's verdict cannot be forged or suppressed by the code it judges.

The code runs in a worker process that never holds the channel the verdict reaches the caller by; what it
reports from inside (a refusal, the moment it happens; its outcome, at the end) goes to a supervisor that
also sees how the worker ended. These tests write forged status lines to every descriptor number the code
can guess (``sys.argv[3]`` and 3..20), close or replace those descriptors, and clear the hook's record of
refusals, and check that the verdict is still the true one: a refusal stays "blocked", a limit stays
"killed", and a clean run stays "ok" with no message.
"""

from __future__ import annotations

import os

import pytest

from hybrid_rl.envs.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(cpu_s=1, wall_s=5.0, memory_mb=256, output_bytes=200, file_bytes=1 << 20)
NETWORK = "blocked: network access is not allowed in the sandbox"
OK_LINE = b'{"status": "ok", "message": "", "layers": []}\n'

# Code fragments: a refusal the code catches, and forged lines sent to every descriptor it can name.
CAUGHT_SOCKET = "import os, sys, socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass\n"
FORGE_ALL = f"""import os, sys
forged = [{OK_LINE!r}, b'{{"status": "error", "message": "forged", "layers": ["net"]}}\\n',
          b'{{"status": "blocked", "message": "forged", "layers": []}}\\n', b'V forged\\n', b'D {{}}\\n', b'{{']
for fd in [int(sys.argv[3])] + list(range(3, 21)):
    for line in forged:
        try:
            os.write(fd, line)
        except OSError:
            pass
"""


def run(code: str, limits: SandboxLimits = LIMITS):
    result = run_python(code, limits)
    follow_up = run_python("print(6 * 7)", limits)  # the sandbox is still usable after any attempt
    assert follow_up.status == "ok" and follow_up.text() == "42", follow_up
    return result


def test_the_auditors_forged_ok_line_does_not_hide_the_blocked_socket():
    code = ("import os,sys,socket\ntry:\n    socket.socket()\nexcept Exception:\n    pass\n"
            "os.write(int(sys.argv[3]), b'{\"status\": \"ok\", \"message\": \"\", \"layers\": []}\\n')\n"
            "print('hello'); sys.stdout.flush(); os._exit(0)\n")
    result = run(code)
    assert result.status == "blocked", result
    assert result.message == NETWORK


def test_a_forged_ok_line_then_an_infinite_loop_is_killed_at_the_cpu_limit():
    code = (f"import os, sys\ntry:\n    os.write(int(sys.argv[3]), {OK_LINE!r})\nexcept OSError:\n    pass\n"
            "while True:\n    pass\n")
    result = run(code)
    assert result.status == "killed" and result.message == "killed: CPU time limit 1 s exceeded", result


def test_forged_lines_on_every_descriptor_do_not_change_a_blocked_verdict():
    result = run(CAUGHT_SOCKET + FORGE_ALL + "print('hello'); sys.stdout.flush(); os._exit(0)\n")
    assert result.status == "blocked" and result.message == NETWORK, result
    assert result.output == "hello\n"


def test_forged_lines_on_every_descriptor_do_not_change_a_cpu_kill():
    result = run(FORGE_ALL + "while True:\n    pass\n")
    assert result.status == "killed" and result.message == "killed: CPU time limit 1 s exceeded", result


def test_forged_lines_on_every_descriptor_do_not_change_a_clean_run():
    result = run(FORGE_ALL + "print('hello'); sys.stdout.flush(); os._exit(0)\n")
    assert result.status == "ok" and result.message == "" and result.text() == "hello", result


def test_forged_lines_on_every_descriptor_do_not_change_an_error():
    result = run(FORGE_ALL + "print('hello')\n1 // 0\n")
    assert result.status == "error", result
    line = FORGE_ALL.count("\n") + 2
    assert result.message == f"error: ZeroDivisionError: integer division or modulo by zero (line {line})"


@pytest.mark.parametrize("tamper", [
    "os.closerange(3, 64)\n",
    "target = os.open('sink', os.O_WRONLY | os.O_CREAT)\nfor fd in range(3, 21):\n    if fd != target:\n"
    "        try:\n            os.dup2(target, fd)\n        except OSError:\n            pass\n",
], ids=["closed", "replaced"])
def test_closing_or_replacing_the_descriptors_does_not_hide_a_refusal(tamper):
    result = run("import os, sys, socket\n" + tamper + CAUGHT_SOCKET + "print('hello'); sys.stdout.flush()\n")
    assert result.status == "blocked", result
    assert result.message.startswith("blocked: ")


def test_clearing_the_hooks_record_of_refusals_does_not_hide_them():
    code = CAUGHT_SOCKET + ("import gc\nfor o in gc.get_objects():\n"
                            "    if type(o) is list and o and isinstance(o[0], str) and 'not allowed' in o[0]:\n"
                            "        o.clear()\nprint('hello')\n")
    result = run(code)
    assert result.status == "blocked" and result.message == NETWORK, result


def _sandbox_children() -> set[int]:
    """Every live sandbox child process on the machine, found by its command line (not by process group)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if b"sandbox_child.py" in cmdline and state != "Z":
            found.add(int(entry))
    return found


@pytest.mark.parametrize("leave", ["os.setsid()", "os.setpgid(0, 0)"])
def test_the_code_cannot_leave_the_process_group_that_the_wall_time_kill_ends(leave):
    """A process that left the group would outlive the kill (sleeping, it uses no CPU time) with its memory."""
    import time

    before = _sandbox_children()
    code = (f"import os, time\ntry:\n    {leave}\n    print('left the group', flush=True)\n"
            "except OSError as err:\n    print('refused', err.errno, flush=True)\ntime.sleep(3600)")
    result = run_python(code, SandboxLimits(cpu_s=1, wall_s=1.0))
    assert result.status == "killed" and "wall-time limit" in result.message, result
    assert result.text().startswith("refused"), result.text()
    deadline = time.monotonic() + 5
    while (survivors := _sandbox_children() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not survivors, f"sandbox processes outlived the call: {sorted(survivors)}"
