"""The routes' EngineClient protocol: both front ends (AsyncLLM, and the cluster's ClusterEngine) have every member
it declares, with the same parameters, so create_app takes either."""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from aptserve.cluster.ingress import ClusterEngine
from aptserve.server.async_llm import AsyncLLM
from aptserve.server.engine_client import EngineClient


def attributes_set_in_init(cls: type) -> set[str]:
    if cls.__init__ is object.__init__:
        return set()
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store)}


def missing_members(cls: type, protocol: type) -> list[str]:
    """Protocol members `cls` lacks or takes other parameters for (a data member counts as present when
    __init__ assigns it)."""
    assigned = attributes_set_in_init(cls)
    problems = []
    for name in sorted(set(protocol.__annotations__) | {n for n in vars(protocol) if not n.startswith("_")}):
        wanted = getattr(protocol, name, None)
        if not hasattr(cls, name):
            if name not in assigned:
                problems.append(f"{name}: missing")
            continue
        have = getattr(cls, name)
        if callable(wanted) and not isinstance(wanted, property):
            if list(inspect.signature(have).parameters) != list(inspect.signature(wanted).parameters):
                problems.append(f"{name}: parameters {inspect.signature(have)} != {inspect.signature(wanted)}")
            if inspect.iscoroutinefunction(have) != inspect.iscoroutinefunction(wanted):
                problems.append(f"{name}: async differs")
    return problems


@pytest.mark.parametrize("front_end", [AsyncLLM, ClusterEngine])
def test_both_front_ends_are_engine_clients(front_end):
    assert missing_members(front_end, EngineClient) == []


def test_the_check_finds_a_missing_or_changed_member():
    class Partial(AsyncLLM):
        def cut_unfinished(self, reason: str) -> int:  # one parameter too many
            return 0

    del_start = type("NoStart", (), {"__init__": lambda self: None})
    assert "cut_unfinished: parameters" in " ".join(missing_members(Partial, EngineClient))
    assert "start: missing" in missing_members(del_start, EngineClient)
