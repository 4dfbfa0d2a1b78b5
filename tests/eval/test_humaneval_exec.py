"""The HumanEval sandbox: right, wrong, hanging, networking, memory-hungry and spawning code."""
import socket
import time

import pytest

from eval.humaneval_exec import build_program, check_completion, evaluate_completions
from eval.passk import pass_at_k

PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n",
}
CORRECT = "    return a + b\n"
WRONG = "    return a - b\n"


def test_program_layout():
    prog = build_program(PROBLEM, CORRECT)
    assert prog.startswith(PROBLEM["prompt"] + CORRECT)
    assert prog.rstrip().endswith("check(add)")


def test_correct_passes_and_wrong_fails():
    assert check_completion(PROBLEM, CORRECT, timeout_s=5) == {"passed": True, "result": "passed"}
    out = check_completion(PROBLEM, WRONG, timeout_s=5)
    assert out == {"passed": False, "result": "failed: AssertionError"}
    out = check_completion(PROBLEM, "    return a +\n", timeout_s=5)
    assert not out["passed"] and out["result"].startswith("failed: SyntaxError")


def test_exiting_early_is_not_a_pass():
    # sys.exit(0) / os._exit(0) before check() finishes must not count as passing.
    out = check_completion(PROBLEM, "    import sys\n    sys.exit(0)\n", timeout_s=5)
    assert out == {"passed": False, "result": "failed: SystemExit: 0"}
    out = check_completion(PROBLEM, "    import os\n    os._exit(0)\n", timeout_s=5)
    assert out == {"passed": False, "result": "failed: exit code 0"}


@pytest.mark.parametrize("body", ["    while True:\n        pass\n",
                                  "    import time\n    time.sleep(60)\n"])
def test_hang_is_killed_within_timeout(body):
    start = time.monotonic()
    out = check_completion(PROBLEM, body, timeout_s=1.0)
    assert out == {"passed": False, "result": "timed out"}
    assert time.monotonic() - start < 4.0


def test_socket_to_localhost_fails_and_never_connects():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for body in (
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    return a + b\n",
            f"    import socket\n    s = socket.socket()\n    s.connect(('127.0.0.1', {port}))\n"
            "    return a + b\n",
            # Around the patched module: reach the raw C socket type.
            f"    import socket\n    s = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\n"
            f"    s.settimeout(1)\n    s.connect(('127.0.0.1', {port}))\n    return a + b\n",
        ):
            start = time.monotonic()
            out = check_completion(PROBLEM, body, timeout_s=3.0)
            assert not out["passed"] and out["result"].startswith("failed"), out
            assert time.monotonic() - start < 3.0
        with pytest.raises(socket.timeout):
            server.accept()  # nobody got through
    finally:
        server.close()


def test_huge_allocation_fails():
    body = "    x = bytearray(10 * 1024 ** 3)\n    return a + b\n"
    out = check_completion(PROBLEM, body, timeout_s=3.0, memory_mb=512)
    assert out == {"passed": False, "result": "failed: MemoryError"}


def test_process_spawning_is_blocked_and_limited():
    out = check_completion(PROBLEM, "    import os\n    os.system('true')\n    return a + b\n", timeout_s=3)
    assert not out["passed"] and "os.system" in out["result"]
    bomb = "    import os\n    while True:\n        os.fork()\n"
    out = check_completion(PROBLEM, bomb, timeout_s=3)
    assert not out["passed"] and "os.fork" in out["result"]
    out = check_completion(PROBLEM, "    import subprocess\n    subprocess.run(['true'])\n", timeout_s=3)
    assert not out["passed"] and "Popen" in out["result"]
    # The rlimits are really in place inside the child (a passing program asserts them).
    body = ("    import resource\n"
            "    for lim in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU):\n"
            "        assert resource.getrlimit(lim)[0] != resource.RLIM_INFINITY\n"
            "    assert resource.getrlimit(resource.RLIMIT_AS)[0] == 256 * 1024 ** 2\n"
            "    return a + b\n")
    assert check_completion(PROBLEM, body, timeout_s=3, memory_mb=256)["passed"]


def test_no_proxy_env_reaches_the_child(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    body = ("    import os\n"
            "    assert not [k for k in os.environ if 'proxy' in k.lower()]\n"
            "    return a + b\n")
    assert check_completion(PROBLEM, body, timeout_s=3)["passed"]


def test_evaluate_completions_pass_at_k():
    other = {"task_id": "Test/1", "prompt": "def neg(x):\n", "entry_point": "neg",
             "test": "def check(f):\n    assert f(2) == -2\n"}
    completions = {"Test/0": [CORRECT, WRONG, CORRECT], "Test/1": ["    return x\n", "    return -x\n", "    return x\n"]}
    summary, records = evaluate_completions([PROBLEM, other], completions, k_list=[1, 2, 5],
                                            n_workers=2, timeout_s=3)
    assert [r["passed"] for r in records] == [True, False, True, False, True, False]
    assert [(r["task_id"], r["completion_id"]) for r in records][:2] == [("Test/0", 0), ("Test/0", 1)]
    assert summary["n_problems"] == 2 and summary["n_samples"] == 6
    assert summary["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert summary["pass@2"] == pytest.approx(float(pass_at_k(3, [2, 1], 2).mean()))
    assert "pass@5" not in summary  # only 3 samples per task
    assert summary["outcomes"] == {"passed": 3, "failed": 3}
    with pytest.raises(ValueError):
        evaluate_completions([PROBLEM], {}, k_list=[1])


def _host_allows_user_namespaces() -> bool:
    import subprocess
    import sys
    code = ("import ctypes, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "sys.exit(libc.unshare(0x10000000 | 0x40000000) != 0)")
    return subprocess.run([sys.executable, "-I", "-c", code]).returncode == 0


def test_child_runs_in_its_own_network_namespace():
    # Defence in depth under the socket patches: code that digs out the raw C
    # socket type still finds no interfaces.
    if not _host_allows_user_namespaces():
        pytest.skip("kernel does not allow unprivileged user namespaces here")
    import os
    parent_ns = os.readlink("/proc/self/ns/net")
    body = f"    import os\n    assert os.readlink('/proc/self/ns/net') != {parent_ns!r}\n    return a + b\n"
    assert check_completion(PROBLEM, body, timeout_s=3)["passed"]


# ----------------------------------------------------------------------------- escapes

from eval.humaneval_exec import bwrap_usable, resolve_sandbox  # noqa: E402
from utils.errors import UserError  # noqa: E402

LAYERS = ["python"] + (["bwrap"] if bwrap_usable() else [])


def escapes(outside) -> dict[str, str]:
    """Programs that pass only if they get out. ``outside`` is a host directory beside the sandbox
    holding secret.txt; each escape that was tried against the first sandbox is here."""
    secret = f"{outside}/secret.txt"
    return {
        "ctypes system()": f"    import ctypes\n    ctypes.CDLL(None).system(b'touch {outside}/ctypes')\n",
        "_ctypes dlopen": "    import _ctypes\n    _ctypes.dlopen(None, 2)\n",
        "write outside": f"    open('{outside}/written', 'w').write('x')\n",
        "os.open outside": f"    import os\n    os.write(os.open('{outside}/written2', os.O_WRONLY | os.O_CREAT), b'x')\n",
        "write via /proc/self/cwd/..": "    open('/proc/self/cwd/../escaped', 'w').write('x')\n",
        "read /etc/passwd": "    assert 'root' in open('/etc/passwd').read()\n",
        "read a host file": f"    assert open('{secret}').read() == 's3cret'\n",
        "symlink to a host file": f"    import os\n    os.symlink('{secret}', 'link')\n    assert open('link').read() == 's3cret'\n",
        "realpath replaced": ("    import os.path, posixpath\n    os.path.realpath = posixpath.realpath = lambda p, **k: '/tmp'\n"
                              f"    assert open('{secret}').read() == 's3cret'\n"),
        "builtins replaced": ("    import builtins\n    builtins.any = lambda it: True\n    builtins.len = lambda x: 0\n"
                              f"    assert open('{secret}').read() == 's3cret'\n"),
        "pathlib read": f"    from pathlib import Path\n    assert Path('{secret}').read_text() == 's3cret'\n",
        "list a host dir": f"    import os\n    assert os.listdir('{outside}') == ['secret.txt']\n",
        "copy /etc/passwd in": "    import shutil\n    shutil.copy('/etc/passwd', 'p')\n    assert 'root' in open('p').read()\n",
        "delete a host file": f"    import os\n    os.remove('{secret}')\n",
        "chdir out": f"    import os\n    os.chdir('{outside}')\n    assert open('secret.txt').read() == 's3cret'\n",
        "import from a host dir": f"    import sys\n    sys.path.insert(0, '{outside}')\n    import evil\n",
        "raise own limits": "    import resource\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
        "walk to the hook": "    import gc\n    gc.get_objects()\n",
    }


@pytest.mark.parametrize("sandbox", LAYERS)
def test_every_escape_that_was_tried_is_blocked(tmp_path, sandbox):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s3cret")
    (outside / "evil.py").write_text(f"open('{outside}/imported', 'w').write('x')\n")
    tries = escapes(outside)
    # Controls: ordinary programs, file work in the sandbox's own directory included, still pass.
    controls = {
        "own dir": "    open('f.txt', 'w').write('ok')\n    assert open('f.txt').read() == 'ok'\n",
        "tempfile": "    import tempfile\n    with tempfile.NamedTemporaryFile('w') as f:\n        f.write('x')\n",
        "stdlib": ("    import collections, dataclasses, enum, json, re, math, random\n"
                   "    P = collections.namedtuple('P', 'x y')\n    assert P(1, 2).y == 2\n"
                   "    E = enum.Enum('E', 'A B')\n    assert json.loads(json.dumps([math.pi]))[0] == math.pi\n"),
    }
    bodies = {**tries, **controls}
    completions = {"Test/0": [body + "    return a + b\n" for body in bodies.values()]}
    summary, records = evaluate_completions([PROBLEM], completions, k_list=[1], n_workers=2, timeout_s=10,
                                            sandbox=sandbox)
    outcome = {name: r for name, r in zip(bodies, records)}
    assert summary["sandbox"] == ("bwrap + python" if sandbox == "bwrap" else "python")
    escaped = [name for name in tries if outcome[name]["passed"]]
    assert not escaped, {name: outcome[name] for name in escaped}
    assert all(outcome[name]["passed"] for name in controls), {name: outcome[name] for name in controls}
    assert sorted(p.name for p in outside.iterdir()) == ["evil.py", "secret.txt"]  # nothing written or deleted
    assert (outside / "secret.txt").read_text() == "s3cret"
    if sandbox == "python":  # the audit hook is what stopped them, not an accident
        for name in ("ctypes system()", "read /etc/passwd", "write outside", "realpath replaced", "builtins replaced"):
            assert "PermissionError: sandbox:" in outcome[name]["result"], (name, outcome[name])


@pytest.mark.skipif("bwrap" not in LAYERS, reason="bubblewrap is not installed here (CI installs it)")
def test_bwrap_layer_hides_the_host_filesystem_and_processes(tmp_path):
    """What only the OS layer gives: calls the audit hook does not see (stat, getpid) find an
    empty world; the same program fails in the Python layer alone."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "host_file").write_text("x")
    hidden = ["/etc/passwd", "/home", str(repo / "README.md"), str(tmp_path / "host_file")]
    body = ("    import os\n"
            f"    for p in {hidden!r}:\n"
            "        assert not os.path.exists(p), p\n"
            "    assert os.getpid() < 10, os.getpid()  # its own PID namespace\n"
            "    return a + b\n")
    assert check_completion(PROBLEM, body, timeout_s=10, sandbox="bwrap") == {"passed": True, "result": "passed"}
    assert all(os.path.exists(p) for p in hidden[2:])
    assert not check_completion(PROBLEM, body, timeout_s=10, sandbox="python")["passed"]


def test_bwrap_required_but_missing_is_a_clear_error(monkeypatch):
    import eval.humaneval_exec as ex

    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    ex.bwrap_usable.cache_clear()
    try:
        assert resolve_sandbox("auto") == "python"
        with pytest.raises(UserError, match="apt-get install bubblewrap"):
            check_completion(PROBLEM, CORRECT, sandbox="bwrap")
    finally:
        ex.bwrap_usable.cache_clear()
