"""The sandbox's child side: set up the limits, then run the model's code (read from stdin).

Run by ``hybrid_rl.envs.sandbox`` as ``python -I -S -B sandbox_child.py TMPDIR LIMITS_JSON REPORT_FD``:
an isolated interpreter (no site-packages, no environment variables, no user site, no bytecode
written) whose working directory is a fresh temporary directory. It is two processes:

- the **supervisor** (this process) reads the code, sets up the namespaces, makes itself non-dumpable
  (so that the worker cannot open its ``/proc`` files), then forks the worker, waits for it and sends
  the one report on REPORT_FD (a socket the caller made). The worker never holds REPORT_FD: it is
  closed in the worker before anything else runs there. With the ``pid`` layer the worker is the first
  process (PID 1) of a new PID namespace: the supervisor and every process outside are not in its
  ``/proc``;
- the **worker** sets up the rest and runs the code. Before the first line of the model's code runs, in
  this order:

1. resource limits: CPU time (SIGXCPU, then SIGKILL a second later; SIGKILL at once for a PID namespace's
   first process, which ignores SIGXCPU), address space, file size, open files, core dumps off;
2. kernel isolation where the kernel allows it (each layer is reported, none is assumed):
   - ``net``: a new network namespace (no interfaces but a loopback that is down);
   - ``fs``: a new mount namespace in which every mount is read-only except a bind mount of the
     temporary directory;
   - ``sys``: an empty read-only tmpfs over ``/sys`` (devices, firmware tables, kernel settings);
   - ``disk``: instead of that bind mount, a tmpfs of ``disk_bytes`` (and 4096 files) on the temporary
     directory: all the code's files together stay within it (ENOSPC past it);
   - ``pid``: a new PID namespace whose first process is the worker, and a procfs of that namespace
     mounted read-only on ``/proc`` (over the host's, in the private mount namespace), so that ``/proc``
     shows the worker alone: no other process's environment, command line or descriptors;
   (the namespaces are made by the supervisor, before the fork; the worker is in them. The new ``/proc``
   is mounted by the worker, before the seccomp filter: a procfs shows the PID namespace of the process
   that mounts it. It needs the mount namespace to be private, i.e. the ``fs`` layer's first step.)
   - ``seccomp``: a filter that refuses (EPERM) creating sockets, fork/vfork/exec, clone without
     CLONE_THREAD (threads stay allowed), signals to other processes, ptrace, pidfd_getfd, mount and
     namespace calls and io_uring (whose operations would bypass the filter);
3. the process limit (RLIMIT_NPROC, after the namespaces so that it counts this sandbox's processes);
4. an audit hook (``sys.addaudithook``) that refuses the same things one level up, where Python can
   still say why: sockets, processes, signals, ctypes, and writes outside the temporary directory.

The audit hook is what turns an attempt into a clear message ("blocked: network access is not allowed
in the sandbox"); the kernel layers are what hold when the hook is bypassed.

**The verdict channel.** The worker tells the supervisor what only it can know over a SOCK_SEQPACKET
socket (one record per write, so nothing the code writes can merge with a record): first, before the
code runs, the ``pid`` (its ``/proc`` mounted) and ``seccomp`` layers (only the first record is taken for
that, and ``pid`` only where the supervisor made the namespace); then each refusal *at the
moment the hook refuses it*, before the code can catch the exception (so clearing the hook's state or
exiting afterwards cannot take it back); last, how the code ended ("ok" or "error" with the
exception). Records carry a random key the code is never given; records without it are ignored, and a
refusal message must be one of the hook's own. If the hook or the harness cannot write a record (the
code closed or replaced the descriptor), the worker exits at once with ``EXIT_UNREPORTED``, which the
supervisor reports as a refusal. The supervisor adds what it sees from outside (``os.wait4``: the exit
status or the killing signal, the CPU time used; as PID 1 the worker ends on a signal it raised at itself
with ``EXIT_SIGNALLED`` + the signal, read back as that signal), and the caller decides the verdict with a kill or
limit first: a line the code writes anywhere can neither make a refused, killed or failed run "ok" nor
hide a refusal. The report on REPORT_FD is one JSON line: ``layers``, ``returncode`` (the worker's,
negative for a signal), ``cpu_s``, ``violation`` (the first refusal, or null), ``outcome``
(``{"status", "message"}`` from the worker's last record, or null).

Standard library only: this file runs without the project on its path.
"""

import functools
import json
import os
import platform
import resource
import signal
import socket
import struct
import sys
import traceback

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x00020000, 0x10000000, 0x40000000, 0x00010000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
TMPFS_INODES = 4096  # files and directories the code may keep (the ``disk`` layer)
# Mount options the kernel locks in a new namespace: a remount must repeat them or it is refused.
LOCKED_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                  "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

# Syscall numbers the seccomp filter refuses, per architecture (AUDIT_ARCH value, numbers).
DENIED_SYSCALLS = {
    "x86_64": (0xC000003E, {
        "socket": 41, "socketpair": 53, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322,
        "ptrace": 101, "process_vm_writev": 311, "pidfd_send_signal": 424, "unshare": 272, "setns": 308,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "mount_setattr": 442,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "pidfd_getfd": 438,
        "setpgid": 109, "setsid": 112}),
    "aarch64": (0xC00000B7, {
        "socket": 198, "socketpair": 199, "execve": 221, "execveat": 281,
        "ptrace": 117, "process_vm_writev": 271, "pidfd_send_signal": 424, "unshare": 97, "setns": 268,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "mount_setattr": 442,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "pidfd_getfd": 438,
        "setpgid": 154, "setsid": 157}),
}
# Calls the filter allows only in a form that stays inside this process (x86_64, aarch64 numbers).
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435  # refused with ENOSYS: the C library then falls back to clone, whose flags the filter can read
KILLS = {"x86_64": (62, 200, 234), "aarch64": (129, 130, 131)}  # kill, tkill, tgkill: only to this process


class SandboxViolation(PermissionError):
    """An attempt the sandbox refuses; the message is what the model is told."""


# ---------------------------------------------------------------------- resource limits

def set_limits(limits: dict, init: bool = False) -> None:
    """``init``: this process is the first of a PID namespace, which ignores every signal it has no handler
    for, SIGXCPU included, unless it is SIGKILL from the kernel or from outside the namespace: the CPU
    limit's soft limit is then its hard one, where the kernel sends SIGKILL (the caller reads a SIGKILL
    with the CPU time used as the CPU limit)."""
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu if init else cpu + 1))  # SIGXCPU, then SIGKILL
    memory = limits["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# ---------------------------------------------------------------------- kernel isolation

def isolate(tmp: str, limits: dict) -> list[str]:
    """Namespaces, read-only mounts and the seccomp filter; returns the layers that took effect."""
    ctypes, libc = _libc()  # the audit hook installed afterwards refuses every later use of ctypes
    return namespaces(libc, tmp, disk_bytes=limits.get("disk_bytes")) + confine(libc, ctypes, limits)


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def namespaces(libc, tmp: str, pid: bool = False, disk_bytes: int | None = None) -> list[str]:
    """The ``net`` and ``fs`` layers (inherited by a process forked afterwards); with ``disk_bytes``, the
    writable directory is a tmpfs of that size (the ``disk`` layer: a bound on all files together); with
    ``pid``, also a new PID namespace for the next process forked, listed as "pid" (that process completes
    the layer: mount_proc)."""
    layers = []
    if _unshare(libc):
        layers.append("net")
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        private = libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0  # nothing propagates to the host
        disk = private and disk_bytes is not None and _sized_tmpfs(libc, tmp, disk_bytes)
        if private and _read_only_except(libc, tmp, mounts, bound=disk):
            layers += ["fs", "disk"] if disk else ["fs"]
            if _hide_sys(libc):
                layers.append("sys")
        if private and pid and libc.unshare(CLONE_NEWPID) == 0:  # never a /proc mount that reaches the host
            layers.append("pid")
    return layers


def mount_proc(libc) -> bool:
    """The ``pid`` layer's second half, in the first process of the new PID namespace: a procfs of that
    namespace on ``/proc`` (read-only, like every other mount), over the host's in the private mount
    namespace. True when ``/proc`` then shows this process as PID 1."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if os.getpid() != 1 or libc.mount(b"proc", b"/proc", b"proc", flags, None) != 0:
        return False
    try:
        return os.readlink("/proc/self") == "1"
    except OSError:
        return False


def confine(libc, ctypes, limits: dict) -> list[str]:
    """The process limit and the ``seccomp`` layer, for this process (after the namespaces)."""
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    return ["seccomp"] if _seccomp(libc, ctypes) else []


def _unshare(libc) -> bool:
    """New mount and network namespaces: directly as root, else inside a new user namespace."""
    attempts = [CLONE_NEWNS | CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET]
    if os.geteuid() != 0:
        attempts = attempts[1:]
    return any(libc.unshare(flags) == 0 for flags in attempts)


def _sized_tmpfs(libc, tmp: str, size: int) -> bool:
    """A tmpfs of ``size`` bytes (and ``TMPFS_INODES`` files) on the temporary directory, in this private mount
    namespace: ENOSPC past it, however the code splits its writes. False (nothing mounted) where the kernel
    refuses it or the code's user could not write there (a user namespace without an id mapping)."""
    options = f"size={size},nr_inodes={TMPFS_INODES},mode=0700".encode()
    if libc.mount(b"tmpfs", tmp.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return False
    os.chdir(tmp)  # into the new mount
    try:
        with open(".probe", "w") as f:
            f.write("x")
        os.unlink(".probe")
        return True
    except OSError:
        os.chdir("/")
        if libc.umount2(tmp.encode(), 0) != 0 and libc.umount2(tmp.encode(), MNT_DETACH) != 0:
            raise RuntimeError("sandbox: an unusable tmpfs on the temporary directory could not be unmounted")
        os.chdir(tmp)
        return False


def _hide_sys(libc) -> bool:
    """An empty read-only tmpfs over ``/sys`` (the ``sys`` layer): the machine's devices, its firmware tables
    and the kernel's settings are not the code's to read. True when ``/sys`` then lists nothing."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if not os.path.isdir("/sys") or libc.mount(b"tmpfs", b"/sys", b"tmpfs", flags, b"size=4k,nr_inodes=1") != 0:
        return False
    try:
        return os.listdir("/sys") == []
    except OSError:
        return False


def _read_only_except(libc, tmp: str, mounts: list[list[str]], bound: bool = False) -> bool:
    """Every mount (of /proc/self/mountinfo's lines) read-only, the temporary directory writable: bind-mounted
    onto itself, or already a mount of its own (``bound``: the sized tmpfs)."""
    if not bound and libc.mount(tmp.encode(), tmp.encode(), None, MS_BIND, None) != 0:
        return False
    os.chdir(tmp)  # the old working directory is the one under the new mount, soon read-only
    ok = True
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # mountinfo escapes as \040
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):
            flags |= LOCKED_OPTIONS.get(option, 0)
        ok &= libc.mount(None, point, None, flags, None) == 0
    return ok


def _seccomp(libc, ctypes) -> bool:
    machine = platform.machine()
    if machine not in DENIED_SYSCALLS:
        return False
    program = _filter(machine, os.getpid())

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = SockFprog(len(program) // 8, program)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


def _filter(machine: str, pid: int) -> bytes:
    """The classic-BPF program, as bytes of ``struct sock_filter``; jumps resolved from labels."""
    LD, JA, JEQ, JGE, JSET, RET = 0x20, 0x05, 0x15, 0x35, 0x45, 0x06
    NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (ARG0: its low 32 bits, little-endian)
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    arch, denied = DENIED_SYSCALLS[machine]
    code: list[tuple] = [(LD, ARCH), (JEQ, arch, None, "eperm"), (LD, NR)]
    if machine == "x86_64":
        code.append((JGE, 0x40000000, "eperm", None))  # the x32 ABI's numbers
    code += [(JEQ, nr, "eperm", None) for nr in denied.values()]
    code += [(JEQ, CLONE3, "enosys", None), (JEQ, CLONE[machine], "clone", None)]
    code += [(JEQ, nr, "kill", None) for nr in KILLS[machine]]
    code += [(JA, "allow"),  # BPF jumps only forward: the argument checks come before the verdicts
             ("clone", LD, ARG0), (JSET, CLONE_THREAD, "allow", "eperm"),
             ("kill", LD, ARG0), (JEQ, pid, "allow", "eperm"),
             ("allow", RET, ALLOW), ("eperm", RET, EPERM), ("enosys", RET, ENOSYS)]
    labels = {ins[0]: i for i, ins in enumerate(code) if isinstance(ins[0], str)}
    out = b""
    for i, ins in enumerate(code):
        ins = ins[1:] if isinstance(ins[0], str) else ins
        if ins[0] == JA:
            out += struct.pack("<HBBI", JA, 0, 0, labels[ins[1]] - i - 1)
        elif ins[0] in (JEQ, JGE, JSET):
            jt, jf = (0 if t is None else labels[t] - i - 1 for t in ins[2:])
            out += struct.pack("<HBBI", ins[0], jt, jf, ins[1])
        else:
            out += struct.pack("<HBBI", ins[0], 0, 0, ins[1])
    return out


# ---------------------------------------------------------------------- the audit hook

NETWORK = "network access is not allowed in the sandbox"
PROCESSES = "starting processes is not allowed in the sandbox"
SIGNALS = "sending signals is not allowed in the sandbox"
CTYPES = "ctypes is not allowed in the sandbox"
WRITES = "writing outside the working directory is not allowed in the sandbox"
EVENTS = {"os.fork": PROCESSES, "os.forkpty": PROCESSES, "os.posix_spawn": PROCESSES, "os.exec": PROCESSES,
          "os.spawn": PROCESSES, "os.system": PROCESSES, "subprocess.Popen": PROCESSES, "pty.spawn": PROCESSES,
          "os.kill": SIGNALS, "os.killpg": SIGNALS, "signal.pthread_kill": SIGNALS}
BLOCKED_IMPORTS = {"_posixsubprocess": PROCESSES}  # its fork_exec raises no audit event of its own
PATH_EVENTS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
               "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "os.chflags", "os.lchflags")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


MESSAGES = {NETWORK, PROCESSES, SIGNALS, CTYPES, WRITES}
UNREPORTED = "the code closed or replaced the sandbox's report channel"
EXIT_UNREPORTED = 125  # the worker's exit status when a record could not be sent
# PID 1 of a namespace ignores a signal it raises at itself while its action is the default: the worker instead
# ends with EXIT_SIGNALLED + the signal's number, and the supervisor reports that as death by the signal. Only
# asynchronous signals whose default ends a process: a fault (SIGSEGV, SIGBUS, SIGFPE, SIGILL) is forced on PID 1
# by the kernel anyway, and abort()'s SIGABRT cannot reach a Python handler (os.abort is replaced; an abort in C
# code ends in a SIGSEGV).
EXIT_SIGNALLED = 160
INIT_SIGNALS = ("SIGHUP", "SIGQUIT", "SIGTRAP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGVTALRM", "SIGPROF",
                "SIGIO", "SIGPWR", "SIGSTKFLT")


def end_as_by_default() -> None:
    """In PID 1 of the sandbox's namespace: each signal of ``INIT_SIGNALS`` still at its default action ends the
    process as the default would elsewhere (no cleanup, no flush), told apart by its exit status. A handler the
    code sets replaces this one, as it would replace the default; setting ``SIG_DFL`` back puts this one back,
    and ``signal.getsignal`` / ``signal.signal`` show it as ``SIG_DFL``. ``os.abort()`` ends as by SIGABRT (the
    kernel's SIGABRT is ignored in PID 1 and the process then faults; an abort inside C code still does)."""
    def die(signum, frame):
        os._exit(EXIT_SIGNALLED + signum)

    ours = set()
    for name in INIT_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            signal.signal(number, die)
            ours.add(int(number))
    set_handler, get_handler = signal.signal, signal.getsignal

    def shown(handler):
        return signal.SIG_DFL if handler is die else handler

    @functools.wraps(set_handler)
    def signal_(signalnum, handler):
        if handler == signal.SIG_DFL and int(signalnum) in ours:
            handler = die
        return shown(set_handler(signalnum, handler))

    @functools.wraps(get_handler)
    def getsignal(signalnum):
        return shown(get_handler(signalnum))

    def abort():  # as abort(3): nothing flushed
        os._exit(EXIT_SIGNALLED + signal.SIGABRT)

    signal.signal, signal.getsignal, os.abort = signal_, getsignal, functools.wraps(os.abort)(abort)


def make_hook(tmp: str, violations: list[str], report=lambda message: None):
    """The audit hook; ``report(message)`` is called for each refusal before the exception is raised."""
    root = os.path.realpath(tmp)

    def inside(path) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        full = os.path.realpath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def refuse(message: str, event: str):
        report(message)
        violations.append(message)
        raise SandboxViolation(f"{message} ({event})")

    def hook(event: str, args: tuple) -> None:
        if event in EVENTS:
            refuse(EVENTS[event], event)
        elif event.startswith("socket."):
            refuse(NETWORK, event)
        elif event.startswith("ctypes."):
            refuse(CTYPES, event)
        elif event == "import" and args[0] in BLOCKED_IMPORTS:
            refuse(BLOCKED_IMPORTS[args[0]], f"import {args[0]}")
        elif event == "open" and _writes(args) and args[0] is not None and not inside(args[0]):
            refuse(WRITES, f"open {args[0]!r}")
        elif event in PATH_EVENTS and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            refuse(WRITES, event)

    return hook


def _writes(args: tuple) -> bool:
    """An "open" event's (path, mode, flags) asks for writing."""
    mode, flags = args[1], args[2]
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


# ---------------------------------------------------------------------- running the code

def run(code: str, violations: list[str]) -> dict:
    try:
        exec(compile(code, "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as err:
        if err.code not in (None, 0):
            return {"status": "error", "message": f"SystemExit: {err.code}"}
    except BaseException as err:
        if violations:
            return {"status": "blocked", "message": violations[0]}
        return {"status": "error", "message": _describe(err)}
    finally:
        sys.stdout.flush()
    if violations:  # the code caught the refusal and went on: still say so
        return {"status": "blocked", "message": violations[0]}
    return {"status": "ok", "message": ""}


def _describe(err: BaseException) -> str:
    """``ZeroDivisionError: division by zero (line 3)``: the last frame of the model's code."""
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == "<code>"]
    where = f" (line {lines[-1]})" if lines else ""
    return f"{type(err).__name__}{f': {err}' if str(err) else ''}{where}"


def sender(fd: int, key: str):
    """``send(kind, text)``: one record on the worker's channel, or the worker ends with EXIT_UNREPORTED.

    The functions it uses are bound here, so that the code replacing ``os.write`` changes nothing; the
    descriptor is checked to still be the channel (the code may have closed it or put a file in its place).
    """
    write, fstat, set_blocking, exit_now = os.write, os.fstat, os.set_blocking, os._exit
    stat = fstat(fd)
    identity, prefix = (stat.st_dev, stat.st_ino), key.encode() + b" "

    def send(kind: str, text: str) -> None:
        try:
            stat = fstat(fd)
            if (stat.st_dev, stat.st_ino) != identity:
                raise OSError("the report channel was replaced")
            set_blocking(fd, True)
            record = prefix + kind.encode() + b" " + text.encode("utf-8", "replace")
            if write(fd, record) != len(record):
                raise OSError("short write")
        except BaseException:
            exit_now(EXIT_UNREPORTED)

    return send


def worker(code: str, tmp: str, limits: dict, channel: int, key: str, ctypes, libc, pid_ns: bool) -> None:
    """The forked process that runs the code (with ``pid_ns``, the new PID namespace's PID 1); never returns."""
    status = 1
    try:
        # the supervisor leads the process group the caller kills at the wall-time limit: dying with it is this
        # process's backstop should it ever leave the group (setsid and setpgid are refused by seccomp)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        send = sender(channel, key)
        set_limits(limits, init=pid_ns)
        if pid_ns:
            end_as_by_default()
        layers = ["pid"] if pid_ns and mount_proc(libc) else []
        layers += confine(libc, ctypes, limits)
        send("R", json.dumps(layers))  # the first record: before any of the code
        violations: list[str] = []
        sys.addaudithook(make_hook(tmp, violations, lambda message: send("V", message)))
        sys.modules.pop("ctypes", None)
        result = run(code, violations)
        sys.stderr.flush()
        send("D", json.dumps({**result, "message": result["message"][:2000]}))  # one record holds it
        status = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(status)  # no atexit handler or thread of the code runs after the last record


def supervise(channel: socket.socket, pid: int, key: str, pid_ns: bool = False) -> dict:
    """Read the worker's records until it is gone, then wait for it; the facts for the verdict. ``pid_ns``:
    the worker is in a new PID namespace, so its first record may report the ``pid`` layer."""
    accepted = ("pid", "seccomp") if pid_ns else ("seccomp",)
    prefix = key.encode() + b" "
    layers, violation, outcome, first = [], None, None, True
    buffer = memoryview(bytearray(1 << 17))  # larger than any record the worker sends
    while True:
        try:
            record = bytes(buffer[:channel.recv_into(buffer)])
        except InterruptedError:
            continue
        except OSError:
            break
        if not record:  # every copy of the worker's end is closed: it has ended
            break
        kind, _, text = record[len(prefix):].partition(b" ") if record.startswith(prefix) else (b"", b"", b"")
        text = text.decode("utf-8", "replace")
        if first and kind == b"R":
            reported = _json(text, [])
            layers = [layer for layer in accepted if isinstance(reported, list) and layer in reported]
        elif kind == b"V" and violation is None and text in MESSAGES:
            violation = text
        elif kind == b"D":
            result = _json(text, {})
            if isinstance(result, dict) and result.get("status") in ("ok", "error", "blocked"):
                outcome = {"status": result["status"], "message": str(result.get("message", ""))[:2000]}
        first = False
    _, wait_status, usage = os.wait4(pid, 0)
    returncode = os.waitstatus_to_exitcode(wait_status)
    if pid_ns and EXIT_SIGNALLED < returncode <= EXIT_SIGNALLED + 64:  # PID 1's stand-in for death by that signal
        returncode = EXIT_SIGNALLED - returncode
    if returncode == EXIT_UNREPORTED and violation is None:
        violation = UNREPORTED
    return {"layers": layers, "returncode": returncode, "cpu_s": usage.ru_utime + usage.ru_stime,
            "violation": violation, "outcome": outcome}


def _json(text: str, default):
    try:
        return json.loads(text)
    except ValueError:
        return default


def main() -> None:
    tmp, limits, report_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    code = sys.stdin.read()
    ctypes, libc = _libc()
    layers = namespaces(libc, tmp, pid=True, disk_bytes=limits.get("disk_bytes"))
    pid_ns = "pid" in layers  # reported once the worker has its /proc
    layers = [layer for layer in layers if layer != "pid"]
    PR_SET_DUMPABLE = 4
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the worker cannot open /proc/<this process>/mem or fd/
    key = os.urandom(16).hex()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_fd)
            ours.close()
            channel = theirs.detach()
        except BaseException:
            os._exit(1)
        worker(code, tmp, limits, channel, key, ctypes, libc, pid_ns)
    theirs.close()
    report = supervise(ours, pid, key, pid_ns)
    report["layers"] = layers + report["layers"]
    os.write(report_fd, (json.dumps(report) + "\n").encode())


if __name__ == "__main__":
    main()
