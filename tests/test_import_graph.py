"""Imports flow one way (docs/ARCHITECTURE.md). Read every project module's imports (function-level
ones too: a lazy import is still a dependency) and fail on:

- an upward arrow between layers: utils < data_pipeline < model < inference < stages < tools,
- a stage importing another stage (pretrain, finetune, align, eval share only the layers below),
- a cycle between modules, at any level of the graph.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "data_pipeline": 1, "model": 2, "inference": 3,
          "pretrain": 4, "finetune": 4, "align": 4, "eval": 4, "demo": 5, "bench": 5}
STAGES = {"pretrain", "finetune", "align", "eval"}
# Entry-point scripts above their folder's layer, each with the reason.
SCRIPTS = {
    "utils.setup_classic_models": "writes every stage's recipes from model/architectures.py and validates them",
}


def project_modules() -> dict[str, Path]:
    mods = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in LAYERS and rel.name != "demo.py" or rel.parts[0] in (".venv", "tests"):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    return mods


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (``from pkg import mod`` resolved to ``pkg.mod`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import mod" depends on pkg.mod; "from pkg import name" on pkg itself
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def top(module: str) -> str:
    return module.split(".")[0]


def test_no_upward_imports_and_no_stage_imports_another(graph):
    bad = []
    for src, targets in graph.items():
        if src in SCRIPTS:
            continue
        for dst in targets:
            a, b = top(src), top(dst)
            if a == b:
                continue
            if LAYERS[b] > LAYERS[a]:
                bad.append(f"{src} -> {dst} (layer {a} imports the higher layer {b})")
            elif a in STAGES and b in STAGES:
                bad.append(f"{src} -> {dst} (a stage imports another stage)")
    assert not bad, "imports that flow the wrong way:\n" + "\n".join(sorted(bad))


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader resolves ``from pkg import mod`` and lazy imports (else the tests above prove nothing)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from finetune import sft\n    import model.load.x\n\nfrom utils import Thing\n")
    modules = {"finetune.sft": Path("x"), "model.load": Path("y"), "finetune": Path("z"), "utils": Path("u")}
    assert imports_of(src, modules) == {"finetune.sft", "model.load", "utils"}
