"""The package's layering (DESIGN.md): a lower layer never imports a higher one, module-level imports form
no cycle, and no import inside a function hides one (it would close a cycle if it were at module level).
Read from the source with ``ast``, so lazy imports inside functions count too."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "m3vit"

#: Layers from the bottom; modules on one line are peers (they may not import each other's layer above).
LAYERS = [
    {"utils", "configs"},
    {"nn", "tasks"},
    {"models"},
    {"data"},
    {"engine"},
    {"efficiency", "hardware", "analysis"},
    {"experiments"},
    {"serve"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported m3vit module, at module level?, line)`` for every import of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    module_level = set()
    for node in tree.body:  # module-level statements, including those nested in if/try at top level
        module_level.update(id(n) for n in _top_level_imports(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            names = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "m3vit" or name.startswith("m3vit."):
                found.append((name, id(node) in module_level, node.lineno))
    return found


def _top_level_imports(node):
    """Import nodes reachable from a module-level statement without entering a function or class body."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return
    for child in ast.iter_child_nodes(node):
        yield from _top_level_imports(child)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


FILES = sorted(SRC.rglob("*.py"))


def test_every_subpackage_has_a_layer():
    top = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in FILES} - {"__init__"}
    assert top <= set(LEVEL), f"add {sorted(top - set(LEVEL))} to LAYERS (and to DESIGN.md's layering)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_lower_layer_imports_a_higher_one(path):
    own = _layer(_module_name(path))
    if own is None:  # m3vit/__init__.py: the public API gathers every layer
        return
    bad = []
    for module, _, line in _imports(path):
        other = _layer(module)
        if other is not None and other in LEVEL and LEVEL[other] > LEVEL[own]:
            bad.append(f"line {line}: {module} ({other} is above {own})")
    assert not bad, f"{path.relative_to(SRC)} imports a higher layer: " + "; ".join(bad)


MODULES = {_module_name(p): p for p in FILES}


def _real_module(module: str) -> str | None:
    """``from .x import y`` may name a submodule ``y`` or an attribute of ``x``: the longest real module."""
    while module not in MODULES and "." in module:
        module = module.rpartition(".")[0]
    return module if module in MODULES else None


@functools.cache
def _module_level_graph() -> dict[str, set[str]]:
    """``{module: the m3vit modules it imports at module level}`` (read it, never change it)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {m for module, top, _ in _imports(path) if top
                       and (m := _real_module(module)) is not None and m != name}
    return graph


def _import_path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A chain of module-level imports from ``start`` to ``goal`` (breadth first), or None. A module importing
    its own package is not followed (Python resolves it: the package is already being imported)."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for nxt in sorted(graph[node]):
            if nxt not in previous and not node.startswith(nxt + "."):
                previous[nxt] = node
                queue.append(nxt)
    return None


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_level_import_hides_a_cycle(path):
    """An import inside a function that would close a module-level cycle dodges the cycle instead of removing
    it (split the modules so that the import can live at the top). Lazy imports kept for start-up cost are
    fine as long as moving them to the top would not make a cycle."""
    graph = _module_level_graph()
    name = _module_name(path)
    hidden = []
    for module, top, line in _imports(path):
        target = _real_module(module)
        if top or target is None or target == name or name.startswith(target + "."):
            continue
        back = _import_path(graph, target, name)
        found = f"line {line}: {name} -> " + " -> ".join(back or [])
        if back is not None and found not in hidden:
            hidden.append(found)
    assert not hidden, f"{path.relative_to(SRC)} imports inside a function to dodge a cycle: " + "; ".join(hidden)


def test_models_has_no_function_level_import_of_m3vit():
    """The models package (registry, zoo, factory, backbone, checkpoints, pretrained) imports everything it
    uses at module level: its modules depend on each other in one direction."""
    lazy = sorted({f"{path.relative_to(SRC)}:{line} imports {_real_module(module) or module}" for path in FILES
                   if path.relative_to(SRC).parts[0] == "models"
                   for module, top, line in _imports(path) if not top})
    assert not lazy, "function-level imports in m3vit.models: " + "; ".join(lazy)


def test_module_level_imports_form_no_cycle():
    graph = _module_level_graph()
    # Importing a submodule imports its parent packages first: those edges are implied, not cycles.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if node.startswith(nxt + "."):  # a module importing its own package: Python resolves it
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail("module-level import cycle: " + " -> ".join(cycle))
            elif state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


#: Names that only routing code uses (top-k, softmax, gate noise, the held-expert mask, router classes,
#: queue planning): ``MoE.route`` in ``m3vit/nn`` is their one home.
ROUTING_NAMES = {"topk", "softmax", "top_k_gate", "prob_in_top_k", "randn_like", "_selectable",
                 "plan_dispatch", "expert_capacity", "MultiGateRouter", "TaskConditionedRouter", "SharedRouter"}
#: The expert backends and users of the MoE outside ``nn``: they consume a ``Routing``, never re-route.
ROUTING_CONSUMERS = ["efficiency/streaming.py", "efficiency/export.py", "efficiency/onnx_export.py"]


@pytest.mark.parametrize("name", ROUTING_CONSUMERS)
def test_moe_backends_outside_nn_hold_no_routing_code(name):
    tree = ast.parse((SRC / name).read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not used & ROUTING_NAMES, f"{name} routes tokens itself ({sorted(used & ROUTING_NAMES)}); use MoE.route"
