"""Guards of the package's shape: the pure layers stay torch-free, layers point down, no import cycles, files
a person reads in one sitting, and one declaration of the engine flags behind the CLI and LLM(...)."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from aptserve.cli import build_parser
from aptserve.engine_args import EngineArgs

PACKAGE = Path(__file__).parents[1] / "aptserve"
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every aptserve module the file imports, at any depth (lazy and TYPE_CHECKING imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("aptserve")}


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def test_pure_layers_import_without_torch_or_the_engine():
    code = ("import sys, aptserve.sched, aptserve.cache, aptserve.config, aptserve.engine_args\n"
            "import aptserve.cluster.policy, aptserve.cluster.snapshot, aptserve.cluster.args, aptserve.core.messages\n"
            "loaded = [m for m in ('torch', 'ray', 'aptserve.engine', 'aptserve.llm') if m in sys.modules]\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_model_knows_nothing_of_scheduler_runner_engine_or_server(import_graph):
    upward = ("aptserve.sched", "aptserve.runner", "aptserve.engine", "aptserve.server", "aptserve.llm")
    offenders = {name: sorted(m for m in deps if m.startswith(upward))
                 for name, deps in import_graph.items() if name.startswith("aptserve.model")}
    assert not {name: deps for name, deps in offenders.items() if deps}


def test_no_import_cycles(import_graph):
    graph = import_graph
    visiting, done, cycles = set(), set(), []

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(path[path.index(name):] + [name])
            return
        visiting.add(name)
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, cycles


def test_every_module_reads_in_one_sitting():
    long_files = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long_files, long_files


def test_cli_and_llm_take_the_same_engine_flags():
    from aptserve import LLM

    for command in ("serve", "generate"):
        subparser = build_parser()._subparsers._group_actions[0].choices[command]
        engine_group = next(g for g in subparser._action_groups if g.title == "engine")
        cli_names = {action.dest for action in engine_group._group_actions}
        assert cli_names == set(EngineArgs.field_names()), command
    # LLM refuses unknown names before loading anything, and names exactly the unknown ones.
    every_flag = {f.name: f.default for f in dataclasses.fields(EngineArgs) if f.name != "model"}
    with pytest.raises(TypeError, match=r"unknown engine argument\(s\) \['not_a_flag'\]"):
        LLM(model="default", **every_flag, not_a_flag=1)
