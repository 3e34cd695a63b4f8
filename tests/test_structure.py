"""The package's shape: no import cycles, every extension registered, the CLI derived from configs."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import bonsai_prune
from bonsai_prune.config import EvalConfig, PruneConfig, UtilityConfig

PACKAGE_ROOT = Path(bonsai_prune.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["bonsai_prune", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports, at any depth of its code (function bodies too,
    not ``if TYPE_CHECKING:`` blocks, which never run).

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so those count as imported too, except
    the importer's own ancestors, which Python has always imported before the importer runs.
    """
    modules = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {  # ``if TYPE_CHECKING:`` blocks never run
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - node.level + 1]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for candidate in candidates:
                if candidate in modules:
                    targets.update({candidate, *_ancestors(candidate)})
        own = set(_ancestors(name))
        graph[name] = {t for t in targets if t in modules and t not in own and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_config_field_is_an_option_with_help():
    """The CLI is derived from the configs: a field without help would be an undocumented flag."""
    from bonsai_prune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse has no API)
    for command, config_cls in (("prune", PruneConfig), ("evaluate", EvalConfig)):
        dests = {a.dest for a in commands[command]._actions}
        for f in dataclasses.fields(config_cls):
            if f.name == "utility":  # nested: its fields are checked below
                continue
            assert f.metadata.get("help"), f"{config_cls.__name__}.{f.name} has no help text"
            assert f.name in dests, f"{command} lacks an option for {f.name}"
    for f in dataclasses.fields(UtilityConfig):
        assert f"utility.{f.name}" in {a.dest for a in commands["prune"]._actions}


def test_cli_options_build_the_same_config_as_the_library_defaults():
    from bonsai_prune.cli import build_parser
    from bonsai_prune.cli_options import config_from_args

    args = build_parser().parse_args(["prune", "--out", "x"])
    assert config_from_args(PruneConfig, args) == PruneConfig()
    args = build_parser().parse_args(
        ["prune", "--out", "x", "--prune-frac", "0.2", "--units", "heads", "--weights", "acc=100"]
    )
    config = config_from_args(PruneConfig, args)
    assert config.prune_fraction == 0.2 and config.unit_kinds == "heads"  # old flags still work
    assert config.utility.weights == {"acc": 100.0, "lex": 0.0, "sem": 0.0, "prob": 0.0}


def test_a_registered_name_appears_in_help_without_touching_the_cli():
    from bonsai_prune.cli import build_parser
    from bonsai_prune.methods import METHODS

    def help_text() -> str:
        commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
        return commands["prune"].format_help()

    assert "shiny" not in help_text()
    METHODS.register("shiny")(lambda context: None)
    try:
        assert "shiny" in help_text()
    finally:
        METHODS._entries.pop("shiny")  # noqa: SLF001 (undo the registration for other tests)


def test_every_commands_help_renders():
    """argparse %-formats help texts: a stray "%" in a config's help must not break --help."""
    from bonsai_prune.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, parser in commands.items():
        assert parser.format_help(), name
    assert "20%" in commands["prune"].format_help()  # the regression's help quotes a measurement
