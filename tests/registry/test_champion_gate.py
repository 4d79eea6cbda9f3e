"""One gate for what is served: only ``promotion.move_champion`` moves the ``champion`` alias.

Read from the source (``ast``) so a later path (an automation, a new command, ``catsdogs deploy``)
that sets the alias another way fails here, plus the run-time refusal in ``move_alias``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import catsdogs
from catsdogs import CatsdogsError
from catsdogs.registry import CHAMPION
from catsdogs.registry.client import move_alias
from catsdogs.registry.model_source import make_client
from catsdogs.settings import Settings

PACKAGE = Path(catsdogs.__file__).resolve().parent
GATE = ("registry/promotion.py", "move_champion")
ALIAS_SETTER = ("registry/client.py", "move_alias")


class _Calls(ast.NodeVisitor):
    """Collects calls of one name with the innermost function around each."""

    def __init__(self, name: str) -> None:
        self.name, self.stack, self.found = name, ["<module>"], []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_Call(self, node: ast.Call) -> None:
        callee = node.func
        if getattr(callee, "attr", None) == self.name or getattr(callee, "id", None) == self.name:
            self.found.append((self.stack[-1], node))
        self.generic_visit(node)


def _calls(name: str) -> Iterator[tuple[str, str, ast.Call]]:
    """(file, innermost function, call) for every call of ``name`` (a function or a method) in src/."""
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Calls(name)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for owner, call in visitor.found:
            yield path.relative_to(PACKAGE).as_posix(), owner, call


def _innermost(name: str) -> set[tuple[str, str]]:
    return {(file, owner) for file, owner, _ in _calls(name)}


def _alias_argument(call: ast.Call) -> ast.expr | None:
    keyword = {k.arg: k.value for k in call.keywords}
    return keyword.get("alias", call.args[2] if len(call.args) > 2 else None)


def test_only_move_alias_calls_mlflow_to_set_an_alias() -> None:
    assert _innermost("set_registered_model_alias") == {ALIAS_SETTER}


def test_only_the_gate_moves_champion_and_every_other_alias_move_names_another_alias() -> None:
    for file, owner, call in _calls("move_alias"):
        if (file, owner) == GATE:
            continue
        alias = _alias_argument(call)
        gate_flag = any(k.arg == "champion_gate" for k in call.keywords)
        where = f"{file}:{call.lineno}"
        assert not gate_flag, f"{where} passes champion_gate: call promotion.move_champion instead"
        assert isinstance(alias, ast.Name | ast.Constant), f"{where}: the alias must be a named constant"
        value = alias.id if isinstance(alias, ast.Name) else alias.value
        assert value not in {"CHAMPION", CHAMPION}, f"{where} moves {CHAMPION} outside the gate"
    assert _innermost("set_champion_history") == {GATE}


def test_promote_and_rollback_go_through_the_gate() -> None:
    assert {owner for file, owner, _ in _calls("move_champion") if file == GATE[0]} == {"promote", "rollback"}
    assert not [file for file, _, _ in _calls("move_champion") if file != GATE[0]]


def test_moving_champion_around_the_gate_is_refused_at_run_time(
    settings: Settings, register_version: Callable
) -> None:
    version = register_version(accuracy=0.98, recall={"cat": 0.98, "dog": 0.98})
    client = make_client(settings)
    with pytest.raises(CatsdogsError, match="moves only through"):
        move_alias(client, settings, CHAMPION, version, reason="by hand")
    assert CHAMPION not in client.get_registered_model(settings.model_name).aliases
