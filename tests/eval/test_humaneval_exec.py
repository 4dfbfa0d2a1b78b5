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
