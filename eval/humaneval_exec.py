"""Run HumanEval completions against their unit tests in a sandboxed subprocess.

One program per completion: ``prompt + completion + test + check(entry_point)``,
executed by a fresh ``python -I`` in its own session (process group) and temp
dir. Before the user code runs, the child (still single-threaded) applies:

- resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC;
- no network: a fresh user+network namespace when the kernel allows it (no
  interfaces, so even 127.0.0.1 is unreachable), and in every case
  ``socket.socket``/``create_connection``/``getaddrinfo``/... replaced by
  functions that raise; proxy variables are not passed on;
- no process spawning: ``os.system``/``fork``/``exec*``/``subprocess.Popen``/
  ``os.kill``... raise. This is the real fork-bomb guard when the evaluator runs
  as root, because Linux never enforces RLIMIT_NPROC on uid 0.

The parent enforces a wall-clock timeout by SIGKILL to the whole process group.
Like OpenAI's ``human-eval`` harness this stops accidents (infinite loops,
huge allocations, stray sockets), not a determined attacker: run untrusted
model output in a container too.

The limits are set inside the child rather than through ``preexec_fn`` because
``evaluate_completions`` launches from a thread pool and ``preexec_fn`` is not
safe in a threaded parent (the child can deadlock before exec).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from eval.passk import mean_pass_at_k

# Source of the child process (run with `python -I -c`, so stdlib only).
# It reads one JSON job from stdin: program, limits, nonce, result path.
_CHILD_SOURCE = r'''
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
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
    pass

def _make_blocked(what):
    def blocked(*args, **kwargs):
        raise OSError(f"{what} is disabled while running HumanEval tests")
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

program, result_path, nonce = job["program"], job["result_path"], job["nonce"]
del job

def _report(line):
    with open(result_path, "w") as f:
        f.write(nonce + " " + line[:500])
try:
    exec(compile(program, "<humaneval>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as err:  # SystemExit too: a test must reach the end of check()
    detail = str(err)
    _report(f"failed: {type(err).__name__}" + (f": {detail}" if detail else ""))
    raise SystemExit(1)
_report("passed")
'''


def build_program(problem: dict, completion: str) -> str:
    """The text that is executed: prompt + completion, the tests, then the check call."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


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


def check_completion(problem: dict, completion: str, timeout_s: float = 5.0,
                     memory_mb: int = 512) -> dict:
    """Execute one completion against the problem's tests in a sandboxed subprocess.

    Args:
        problem: a HumanEval record with "prompt", "test", "entry_point".
        completion: the model's continuation of the prompt (the function body).
        timeout_s: wall-clock limit; the whole process group is killed after it.
        memory_mb: address-space limit of the child.
    Returns:
        {"passed": bool, "result": "passed" | "failed: <Error>: <msg>" | "timed out"
        | "failed: killed by SIGXCPU" | "failed: exit code N"}.
    """
    program = build_program(problem, completion)
    nonce = secrets.token_hex(16)  # so only our runner's report counts, not stray output
    with tempfile.TemporaryDirectory(prefix="humaneval_", ignore_cleanup_errors=True) as workdir:
        result_path = os.path.join(workdir, ".result")
        job = {"program": program, "nonce": nonce, "result_path": result_path,
               "memory_bytes": memory_mb * 1024 * 1024,
               "cpu_s": int(math.ceil(timeout_s)) + 1,
               "fsize_bytes": 16 * 1024 * 1024,
               "nproc": _user_task_count() + 16}
        with open(os.path.join(workdir, ".stderr"), "wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHILD_SOURCE],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file,
                cwd=workdir, env=_sandbox_env(workdir), start_new_session=True)
            timed_out = False
            try:
                proc.communicate(json.dumps(job).encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The child leads its own session: this also reaps anything it left running.
                _kill_group(proc.pid)
                proc.wait()

        report = _read_tail(result_path, limit=4096)
        # Last line of stderr explains a crash that happened outside the runner's try.
        err_lines = _read_tail(os.path.join(workdir, ".stderr"), limit=4096).strip().splitlines()
        err_tail = err_lines[-1][:300] if err_lines else ""
    if timed_out:
        return {"passed": False, "result": "timed out"}
    if report.startswith(nonce + " "):
        result = report[len(nonce) + 1:]
        return {"passed": result == "passed" and proc.returncode == 0, "result": result}
    if proc.returncode is not None and proc.returncode < 0:
        sig = -proc.returncode
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return {"passed": False, "result": f"failed: killed by {name}"}
    detail = f" ({err_tail})" if err_tail else ""
    return {"passed": False, "result": f"failed: exit code {proc.returncode}{detail}"}


def evaluate_completions(problems: Sequence[dict], completions_per_task: dict[str, list[str]],
                         k_list: Sequence[int] = (1, 10, 100), n_workers: int = 2,
                         timeout_s: float = 5.0, memory_mb: int = 512,
                         progress: bool = False) -> tuple[dict, list[dict]]:
    """Check every completion of every problem and compute unbiased pass@k.

    Args:
        problems: HumanEval records (each with "task_id"); every one is evaluated.
        completions_per_task: task_id -> list of n completions (n >= 1, may differ per task); None for
            one that was not generated (its prompt did not fit the context): it fails without running.
        k_list: the k values to report; k above the smallest n is skipped.
        n_workers: subprocesses run at once (threads only wait on them).
    Returns:
        (summary, records). summary: {"n_problems", "n_samples", "pass@k"..., "outcomes"};
        records: one per completion, in problem then completion order:
        {"task_id", "completion_id", "completion", "passed", "result"}.
    """
    jobs = []
    for problem in problems:
        completions = completions_per_task.get(problem["task_id"], [])
        if not completions:
            raise ValueError(f"no completions for task {problem['task_id']}")
        jobs += [(problem, i, c) for i, c in enumerate(completions)]

    def run(job):
        problem, i, completion = job
        if completion is None:
            out = {"passed": False, "result": "not generated"}
        else:
            out = check_completion(problem, completion, timeout_s=timeout_s, memory_mb=memory_mb)
        return {"task_id": problem["task_id"], "completion_id": i, "completion": completion, **out}

    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        results = pool.map(run, jobs)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), desc="humaneval exec")
        records = list(results)

    n = {p["task_id"]: 0 for p in problems}
    c = {p["task_id"]: 0 for p in problems}
    for r in records:
        n[r["task_id"]] += 1
        c[r["task_id"]] += int(r["passed"])
    outcomes: dict[str, int] = {}
    for r in records:
        kind = r["result"] if r["result"] in ("passed", "timed out", "not generated") else "failed"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    summary = {"n_problems": len(problems), "n_samples": len(records),
               **mean_pass_at_k(list(n.values()), list(c.values()), k_list), "outcomes": outcomes}
    return summary, records
