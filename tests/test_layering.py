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


# Bottom to top: a module imports from its own layer and the layers below, never above. Every module has a place
# (the longest prefix that names it), so a new one must be put somewhere on purpose.
LAYERS = (
    ("foundation", ("aptserve.config", "aptserve.errors", "aptserve.paths", "aptserve.flags", "aptserve.logprobs",
                    "aptserve.sampling", "aptserve.structured_output", "aptserve.cache.geometry", "aptserve.hardware")),
    # Our decoder modules, and the model folders and configs they load from.
    ("model", ("aptserve.model", "aptserve.registry", "aptserve.checkpoints", "aptserve.calibration")),
    ("cache/sched", ("aptserve.cache", "aptserve.sched", "aptserve.request")),
    ("runner", ("aptserve.runner", "aptserve.engine_args", "aptserve.grammar_compiler")),
    ("core", ("aptserve.core",)),
    ("engine/front end", ("aptserve.engine", "aptserve.llm", "aptserve.inputs", "aptserve.outputs",
                          "aptserve.output_processor", "aptserve.detokenizer")),
    ("server", ("aptserve.server",)),
    ("cluster/sim/bench", ("aptserve.cluster", "aptserve.sim", "aptserve.bench")),
    ("entry points", ("aptserve.cli", "aptserve")),
)


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise KeyError(f"{module} has no layer in LAYERS")
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
                  for name, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(name))


def package_of(module: str) -> str:
    """aptserve.core.messages -> aptserve.core; top-level modules are packages of their own."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    visiting, done, found = set(), set(), []

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            found.append(path[path.index(name):] + [name])
            return
        visiting.add(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep, path + [name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return found


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(package_of(name), set()).update(
            package_of(dep) for dep in deps if package_of(dep) != package_of(name))
    return packages


def test_pure_layers_import_without_torch_or_the_engine():
    code = ("import sys, aptserve.sched, aptserve.cache, aptserve.config, aptserve.engine_args\n"
            "import aptserve.cluster.policy, aptserve.core.snapshot, aptserve.cluster.args, aptserve.core.messages\n"
            "loaded = [m for m in ('torch', 'ray', 'aptserve.engine', 'aptserve.llm') if m in sys.modules]\n"
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_an_engine_starts_without_torch_compile_or_the_models_hf_classes():
    """Seconds of every start-up: llguidance.torch runs torch.compile at import (dynamo, inductor), and AutoTokenizer
    imports the model's HF config class; an engine with structured output on needs neither."""
    code = ("import sys\nfrom aptserve import LLM\nllm = LLM(model='default', kv_cache_memory=16 << 20)\n"
            "assert llm.engine.core.executor.grammars._executor is not None\n"
            "loaded = [m for m in ('torch._dynamo', 'torch._inductor', 'transformers.models.llama.configuration_llama')"
            " if m in sys.modules]\nassert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_module_has_a_layer(import_graph):
    for name in import_graph:
        layer_of(name)


def test_layers_point_down_only(import_graph):
    assert not upward_imports(import_graph)


def test_no_import_cycles_between_modules_or_packages(import_graph):
    assert not cycles(import_graph)
    assert not cycles(package_graph(import_graph))


def test_the_checks_catch_an_upward_import_and_a_package_cycle(import_graph):
    # The arrow this test was written for: the core reading the cluster's types.
    planted = {**import_graph, "aptserve.core.messages": import_graph["aptserve.core.messages"]
               | {"aptserve.cluster.policy"}}
    assert upward_imports(planted) == [
        "aptserve.core.messages (core) imports aptserve.cluster.policy (cluster/sim/bench)"]
    assert ["aptserve.cluster", "aptserve.core", "aptserve.cluster"] in cycles(package_graph(planted))


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
