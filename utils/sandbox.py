"""Run untrusted Python (HumanEval completions, the model's python tool) in a sandboxed subprocess.

Each program is executed by a fresh ``python -I -B`` in its own session (process group) and a fresh,
empty temporary directory. Two layers of isolation:

1. The OS layer, when bubblewrap (``bwrap``, Debian's ``bubblewrap`` package) is
   installed and works (``sandbox="auto"`` uses it then; ``"bwrap"`` requires it):
   the child runs in new user, PID, network, IPC, UTS and cgroup namespaces with
   every capability dropped. Its filesystem is read-only ``/usr`` (and ``/bin``,
   ``/lib*``) plus the Python installation, a private ``/proc``, a minimal ``/dev``,
   an empty ``/tmp`` and, writable, only its own working directory: ``/etc``,
   ``/home``, ``/root``, the repository and other runs' files do not exist in it.
   No network interface but a downed loopback. It dies with the evaluator.
2. The Python layer, always: before the program runs, the child (still
   single-threaded) sets resource limits (RLIMIT_AS memory, RLIMIT_CPU,
   RLIMIT_FSIZE, RLIMIT_NPROC, no core files), enters a fresh user+network
   namespace when the kernel allows it, replaces the process and socket functions
   with ones that raise, and installs an audit hook (PEP 578) that refuses, with a
   PermissionError: every ``ctypes`` event (loading a library, calling a foreign
   function, reading raw memory), process creation and signals (``os.system``,
   ``exec*``, ``fork``, ``posix_spawn``, ``subprocess``, ``kill``), every socket
   event, opening a file for writing outside the working directory, opening or
   listing anything outside the working directory and the Python installation
   (``/etc/passwd`` included), renaming, deleting, linking or changing files
   outside the working directory, paths relative to a directory descriptor, and
   the object-graph walks that could reach the hook itself (``gc.get_objects``,
   ``gc.get_referrers``, ``sys._current_frames``, tracing hooks). The hook resolves
   symlinks itself with functions it captured before the program ran, so
   replacing ``os.path.realpath`` or ``builtins`` does not fool it.

What this does NOT guarantee: without bubblewrap the Python layer is the only wall,
and CPython's audit hooks are documented as not being a sandbox: a program that
exploits an interpreter memory-safety bug, or races a symlink swap from a thread
between the hook's check and the open, can get out; run untrusted code with
bubblewrap installed (``sandbox="bwrap"`` fails instead of degrading). In either
layer the verdict is reported from inside the child, so a program that digs the
runner's secret out of the interpreter's frames can report a pass it did not earn;
without bubblewrap a program can still learn whether a path exists (``stat`` is not an
audit event); the limits bound CPU time, memory and file sizes, not the disk bandwidth or
the number of files written in the working directory.

The parent enforces a wall-clock timeout by SIGKILL to the whole process group.
The limits are set inside the child rather than through ``preexec_fn`` because
callers (HumanEval's ``evaluate_completions``) launch from a thread pool and ``preexec_fn`` is not
safe in a threaded parent (the child can deadlock before exec).
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Literal

from utils.errors import UserError

Sandbox = Literal["auto", "bwrap", "python"]

# Source of the child process (run with `python -I -B -c`, so stdlib only).
# It reads one JSON job from stdin: program, limits, nonce, result path, read roots.
_CHILD_SOURCE = r"""
import json, sys
job = json.loads(sys.stdin.read())

import resource
def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # e.g. a hard limit already lower than ours: keep the stricter one
_limit(resource.RLIMIT_AS, job["memory_bytes"])
_limit(resource.RLIMIT_CPU, job["cpu_s"])
_limit(resource.RLIMIT_FSIZE, job["fsize_bytes"])
_limit(resource.RLIMIT_NPROC, job["nproc"])
_limit(resource.RLIMIT_CORE, 0)

# Fresh user + network namespace: only a downed loopback, no routes.
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
    pass

def _make_blocked(what):
    def blocked(*args, **kwargs):
        raise OSError(f"{what} is disabled in the sandbox")
    return blocked

import socket, _socket
for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
             "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    if hasattr(socket, name):
        setattr(socket, name, _make_blocked("network access (socket." + name + ")"))
for name in ("socket", "SocketType", "socketpair", "getaddrinfo"):
    if hasattr(_socket, name):
        setattr(_socket, name, _make_blocked("network access (_socket." + name + ")"))

import os, posix, subprocess, _posixsubprocess
for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
             "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv", "execve",
             "execvp", "execvpe", "kill", "killpg", "setsid", "setpgid"):
    for module in (os, posix):
        if hasattr(module, name):
            setattr(module, name, _make_blocked("process control (os." + name + ")"))
subprocess.Popen = _make_blocked("process control (subprocess.Popen)")
_posixsubprocess.fork_exec = _make_blocked("process control (fork_exec)")


def _audit_hook(workdir):
    # Everything the hook calls is captured here, before the program runs: C functions and
    # methods of built-in types, which the program cannot replace (it can replace os.path.*,
    # builtins.* or module attributes, and the hook never looks them up again).
    lstat, readlink, getcwd, len_, OSError_ = posix.lstat, posix.readlink, posix.getcwd, len, OSError
    S_IFMT, S_IFLNK = 0o170000, 0o120000
    WRITE = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    Denied, str_, bytes_, int_, type_, reversed_, any_ = PermissionError, str, bytes, int, type, reversed, any
    split, rsplit, startswith, join = str.split, str.rsplit, str.startswith, str.join
    devices = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    deny_prefixes = ("ctypes.", "socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
                     "os.fork", "os.kill", "pty.", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                     "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.remote_exec", "webbrowser.",
                     "resource.setrlimit", "resource.prlimit")  # root could raise its own hard limits
    # event -> (indices of path arguments, indices of dir_fd arguments, writes?)
    paths = {
        "os.listdir": ((0,), (), False), "os.scandir": ((0,), (), False), "os.listxattr": ((0,), (), False),
        "os.getxattr": ((0,), (), False), "os.chdir": ((0,), (), True),
        "os.remove": ((0,), (1,), True), "os.rmdir": ((0,), (1,), True), "os.mkdir": ((0,), (2,), True),
        "os.rename": ((0, 1), (2, 3), True), "os.link": ((0, 1), (2, 3), True), "os.symlink": ((1,), (2,), True),
        "os.chmod": ((0,), (2,), True), "os.chown": ((0,), (3,), True), "os.utime": ((0,), (3,), True),
        "os.truncate": ((0,), (), True), "os.setxattr": ((0,), (), True), "os.removexattr": ((0,), (), True),
        "os.chflags": ((0,), (), True), "os.lchflags": ((0,), (), True), "os.mkfifo": ((0,), (2,), True),
        "os.mknod": ((0,), (3,), True), "shutil.rmtree": ((0,), (), True), "shutil.copyfile": ((1,), (), True),
        "shutil.copytree": ((1,), (), True), "shutil.move": ((0, 1), (), True), "shutil.chown": ((0,), (), True),
        "shutil.unpack_archive": ((1,), (), True), "shutil.make_archive": ((0,), (), True),
        "sqlite3.connect": ((0,), (), True),
    }

    def resolve(path):
        # Absolute path with every symlink followed, like os.path.realpath.
        if type_(path) is bytes_:
            path = bytes_.decode(path, "utf-8", "surrogateescape")
        if not startswith(path, "/"):
            path = getcwd() + "/" + path
        todo, done, hops = [p for p in reversed_(split(path, "/")) if p], "", 0
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                done = rsplit(done, "/", 1)[0]
                continue
            candidate = done + "/" + part
            try:
                is_link = lstat(candidate).st_mode & S_IFMT == S_IFLNK
            except OSError_:
                is_link = False  # not there (yet): the rest is taken as written
            if not is_link:
                done = candidate
                continue
            hops += 1
            if hops > 40:
                raise Denied("sandbox: too many levels of symbolic links")
            target = readlink(candidate)
            if startswith(target, "/"):
                done = ""
            todo.extend(p for p in reversed_(split(target, "/")) if p)
        return done or "/"

    def inside(path, roots):
        return any_(path == r or startswith(path, r + "/") for r in roots)

    # Reads: the working directory and the Python installation (its prefixes, not other sys.path
    # entries: a .pth file can point anywhere). Writes: the working directory only.
    writable = (resolve(workdir),)
    readable = writable + tuple(resolve(p) for p in prefixes)

    def check(event, path, write):
        if type_(path) is int_ or path is None:
            return  # an already open descriptor, or the working directory
        if type_(path) is not str_ and type_(path) is not bytes_:
            raise Denied(f"sandbox: {event} takes a str path here")  # a PathLike could answer differently twice
        real = resolve(path)
        if real in devices or inside(real, writable if write else readable):
            return
        raise Denied(f"sandbox: {event} of {real!r} is outside the sandbox")

    def hook(event, args):
        if startswith(event, deny_prefixes):
            raise Denied(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            check(event, path, (mode is not None and any_(c in mode for c in "wax+")) or flags & WRITE)
        elif event in paths:
            where, dir_fds, write = paths[event]
            for i in dir_fds:
                if i < len_(args) and type_(args[i]) is int_ and args[i] >= 0:  # -1 / None: no dir_fd
                    raise Denied(f"sandbox: {event} with dir_fd is not allowed")
            for i in where:
                if i < len_(args):
                    check(event, args[i], write)
        elif event == "object.__setattr__" and args[0] is hook:
            raise Denied("sandbox: the audit hook cannot be changed")

    return hook


def _reporter(result_path, nonce):
    def report(line):
        with open(result_path, "w") as f:
            f.write(nonce + " " + line[:500])
    return report


def _main(job):
    report = _reporter(job.pop("result_path"), job.pop("nonce"))  # the nonce lives on in this closure only
    program = job.pop("program")
    sys.addaudithook(_audit_hook(job.pop("workdir")))
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    globals().pop("ctypes", None)
    try:
        exec(compile(program, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as err:  # SystemExit too: a program must run to its end
        detail = str(err)
        report(f"failed: {type(err).__name__}" + (f": {detail}" if detail else ""))
        raise SystemExit(1)
    report("ok")


_main(job)
"""


def _user_task_count() -> int:
    """Tasks (processes and threads) of this real uid: RLIMIT_NPROC counts all of them."""
    uid, count = os.getuid(), 0
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.stat(f"/proc/{pid}").st_uid == uid:
                        count += len(os.listdir(f"/proc/{pid}/task"))
                except OSError:
                    continue  # the process ended while we looked
    except OSError:
        return 0
    return count


def _sandbox_env(workdir: str) -> dict[str, str]:
    """A minimal environment: no proxies, no PYTHON* vars, HOME and TMPDIR in the sandbox."""
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _read_tail(path: str, limit: int) -> str:
    """The last `limit` bytes of a file the child may or may not have written."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # group already gone


@functools.lru_cache(maxsize=None)
def bwrap_usable() -> bool:
    """bubblewrap is on PATH and can create its namespaces here (some containers forbid it)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def resolve_sandbox(sandbox: Sandbox) -> Literal["bwrap", "python"]:
    """The isolation that will run: ``auto`` is bwrap when usable, else the Python layer alone."""
    if sandbox not in ("auto", "bwrap", "python"):
        raise UserError(f"sandbox={sandbox!r}: choose auto, bwrap or python")
    if sandbox == "python" or (sandbox == "auto" and not bwrap_usable()):
        return "python"
    if not bwrap_usable():
        raise UserError("sandbox=bwrap, but bubblewrap (bwrap) is not installed or cannot create namespaces here; "
                        "install it (Debian/Ubuntu: apt-get install bubblewrap) or use sandbox=auto")
    return "bwrap"


def _bwrap_prefix(workdir: str) -> list[str]:
    """bwrap arguments: new namespaces, no capabilities, read-only system and Python directories,
    a private /proc, /dev and /tmp, and ``workdir`` as the only writable place."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}):
        real = os.path.realpath(prefix)
        for where in dict.fromkeys([real, prefix]):  # a venv reached through a symlink: both paths
            argv += ["--ro-bind", real, where]
    return argv + ["--bind", workdir, workdir, "--chdir", workdir, "--"]


def run_python(program: str, timeout_s: float = 5.0, memory_mb: int = 512, sandbox: Sandbox = "auto",
               stdout_limit: int = 0) -> dict:
    """Execute ``program`` in a sandboxed subprocess (see the module docstring).

    Args:
        program: Python source, run as ``__main__``.
        timeout_s: wall-clock limit; the whole process group is killed after it.
        memory_mb: address-space limit of the child.
        sandbox: "auto" (bubblewrap when usable, else the Python layer), "bwrap" (required)
            or "python" (the audit hook, limits and namespaces only).
        stdout_limit: keep the last this many bytes of what the program printed (0: discard it).
    Returns:
        {"ok": bool, "result": "ok" | "failed: <Error>: <msg>" | "timed out"
        | "failed: killed by SIGXCPU" | "failed: exit code N", "stdout": str}.
    """
    nonce = secrets.token_hex(16)  # so only our runner's report counts, not stray output
    kind = resolve_sandbox(sandbox)
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        workdir = os.path.join(tmp, "work")  # the program's fresh, empty directory; the parent's files stay outside
        os.mkdir(workdir)
        result_path = os.path.join(workdir, ".result")
        job = {"program": program, "nonce": nonce, "result_path": result_path, "workdir": os.path.realpath(workdir),
               "memory_bytes": memory_mb * 1024 * 1024,
               "cpu_s": int(math.ceil(timeout_s)) + 1,
               "fsize_bytes": 16 * 1024 * 1024,
               "nproc": _user_task_count() + 16}
        argv = [sys.executable, "-I", "-B", "-c", _CHILD_SOURCE]
        if kind == "bwrap":
            argv = _bwrap_prefix(workdir) + argv
        out_path = os.path.join(tmp, "stdout")
        with open(os.path.join(tmp, "stderr"), "wb") as err_file, open(out_path, "wb") as out_file:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out_file if stdout_limit else subprocess.DEVNULL, stderr=err_file,
                cwd=workdir, env=_sandbox_env(workdir), start_new_session=True)
            timed_out = False
            try:
                proc.communicate(json.dumps(job).encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The child leads its own session: this also reaps anything it left running
                # (under bwrap, --die-with-parent takes the sandbox down with it).
                _kill_group(proc.pid)
                proc.wait()

        report = _read_tail(result_path, limit=4096)
        stdout = _read_tail(out_path, limit=stdout_limit) if stdout_limit else ""
        # Last line of stderr explains a crash that happened outside the runner's try.
        err_lines = _read_tail(os.path.join(tmp, "stderr"), limit=4096).strip().splitlines()
        err_tail = err_lines[-1][:300] if err_lines else ""
    if timed_out:
        return {"ok": False, "result": "timed out", "stdout": stdout}
    if report.startswith(nonce + " "):
        result = report[len(nonce) + 1:]
        return {"ok": result == "ok" and proc.returncode == 0, "result": result, "stdout": stdout}
    if proc.returncode is not None and proc.returncode < 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return {"ok": False, "result": f"failed: killed by {name}", "stdout": stdout}
    detail = f" ({err_tail})" if err_tail else ""
    return {"ok": False, "result": f"failed: exit code {proc.returncode}{detail}", "stdout": stdout}
