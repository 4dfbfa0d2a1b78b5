"""Run HumanEval completions against their unit tests in the sandbox (utils/sandbox.py).

One program per completion: ``prompt + completion + test + check(entry_point)``, run by
``utils.sandbox.run_python`` (a fresh ``python -I -B`` in its own session, an empty working
directory, bubblewrap when usable, resource limits and an audit hook always; its docstring says
what that does and does not guarantee). A completion passes when the program runs to its end.
"""
from __future__ import annotations

import shutil  # noqa: F401  (tests replace shutil.which to hide bubblewrap)
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from eval.passk import mean_pass_at_k
from utils.sandbox import Sandbox, bwrap_usable, resolve_sandbox, run_python  # noqa: F401  (part of this module's API)


def build_program(problem: dict, completion: str) -> str:
    """The text that is executed: prompt + completion, the tests, then the check call."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def check_completion(problem: dict, completion: str, timeout_s: float = 5.0,
                     memory_mb: int = 512, sandbox: Sandbox = "auto") -> dict:
    """Execute one completion against the problem's tests in the sandbox.

    Args:
        problem: a HumanEval record with "prompt", "test", "entry_point".
        completion: the model's continuation of the prompt (the function body).
        timeout_s, memory_mb, sandbox: as ``utils.sandbox.run_python``.
    Returns:
        {"passed": bool, "result": "passed" | "failed: <Error>: <msg>" | "timed out"
        | "failed: killed by SIGXCPU" | "failed: exit code N"}.
    """
    out = run_python(build_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)
    return {"passed": out["ok"], "result": "passed" if out["ok"] else out["result"]}


def evaluate_completions(problems: Sequence[dict], completions_per_task: dict[str, list[str]],
                         k_list: Sequence[int] = (1, 10, 100), n_workers: int = 2,
                         timeout_s: float = 5.0, memory_mb: int = 512,
                         progress: bool = False, sandbox: Sandbox = "auto") -> tuple[dict, list[dict]]:
    """Check every completion of every problem and compute unbiased pass@k.

    Args:
        problems: HumanEval records (each with "task_id"); every one is evaluated.
        completions_per_task: task_id -> list of n completions (n >= 1, may differ per task); None for
            one that was not generated (its prompt did not fit the context): it fails without running.
        k_list: the k values to report; k above the smallest n is skipped.
        n_workers: subprocesses run at once (threads only wait on them).
        sandbox: see ``check_completion``; the summary says which isolation ran.
    Returns:
        (summary, records). summary: {"n_problems", "n_samples", "pass@k"..., "outcomes", "sandbox"};
        records: one per completion, in problem then completion order:
        {"task_id", "completion_id", "completion", "passed", "result"}.
    """
    jobs = []
    for problem in problems:
        completions = completions_per_task.get(problem["task_id"], [])
        if not completions:
            raise ValueError(f"no completions for task {problem['task_id']}")
        jobs += [(problem, i, c) for i, c in enumerate(completions)]
    isolation = resolve_sandbox(sandbox)

    def run(job):
        problem, i, completion = job
        if completion is None:
            out = {"passed": False, "result": "not generated"}
        else:
            out = check_completion(problem, completion, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=isolation)
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
               **mean_pass_at_k(list(n.values()), list(c.values()), k_list), "outcomes": outcomes,
               "sandbox": "bwrap + python" if isolation == "bwrap" else "python"}
    return summary, records
