"""Each task knows itself: no module outside the task package and the datasets that declare their tasks
spells a task's name.

Every module under ``src/m3vit`` is parsed with ``ast`` and every string constant that equals a task name
(``semseg``, ``human_parts``, ``sal``, ``normals``, ``edge``, ``depth``) is a finding, except in

* ``m3vit/tasks/`` (the tasks themselves),
* the dataset modules that declare their tasks: ``m3vit/data/synthetic*`` (the module, or the package
  it becomes), ``m3vit/data/pascal_context.py``, ``m3vit/data/nyud.py``.

``depth`` is also a ``ModelConfig`` field (the number of transformer blocks). A ``"depth"`` constant is
that field, not the task, when the smallest statement holding it also names another architecture field
of ``ModelConfig`` (read from ``models/config.py``: ``embed_dim``, ``num_heads``, ``moe_blocks`` ...) --
as a string constant, a keyword argument or an attribute -- and names no other task: e.g.
``{"embed_dim": ..., "depth": ...}`` limits, ``dict(_arch, moe_blocks=range(1, _arch["depth"], 2))`` or a
report's ``{"embed_dim": cfg.embed_dim, "depth": cfg.depth}``. A task-name dict such as
``{"semseg": 21, "depth": 1}`` still fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "m3vit"

TASK_NAMES = {"semseg", "human_parts", "sal", "normals", "edge", "depth"}

#: Paths (relative to ``src/m3vit``, as POSIX) whose task-name literals are allowed; a prefix match.
ALLOWED_PREFIXES = ("tasks/", "data/synthetic", "data/pascal_context.py", "data/nyud.py")

#: ModelConfig fields too generic to show that a statement is about the architecture.
_GENERIC_FIELDS = {"depth", "name", "tasks", "init", "img_size"}


def _model_config_fields() -> set[str]:
    tree = ast.parse((SRC / "models" / "config.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "ModelConfig":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    raise AssertionError("models/config.py defines no ModelConfig dataclass")


ARCHITECTURE_FIELDS = _model_config_fields() - _GENERIC_FIELDS


def _names_in(statement: ast.AST) -> set[str]:
    """String constants, keyword-argument names and attribute names inside ``statement``."""
    found = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
    return found


def _is_model_depth(statement: ast.AST) -> bool:
    names = _names_in(statement)
    return bool(names & ARCHITECTURE_FIELDS) and not (names & (TASK_NAMES - {"depth"}))


def task_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, name)`` of each task-name literal in ``path`` that the rule above does not exempt."""
    tree = ast.parse(path.read_text(), filename=str(path))
    findings = []

    def visit(node: ast.AST, statement: ast.AST | None) -> None:
        if isinstance(node, ast.stmt):
            statement = node  # the innermost statement holding what follows
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
            if not (node.value == "depth" and statement is not None and _is_model_depth(statement)):
                findings.append((node.lineno, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, statement)

    visit(tree, None)
    return findings


def _allowed(path: Path) -> bool:
    relative = path.relative_to(SRC).as_posix()
    return relative.startswith(ALLOWED_PREFIXES)


def test_no_task_name_literal_outside_the_tasks_and_the_datasets():
    offenders = [f"{path.relative_to(SRC.parent)}:{line}: {name!r}"
                 for path in sorted(SRC.rglob("*.py")) if not _allowed(path)
                 for line, name in task_literals(path)]
    assert offenders == [], ("task names spelled outside m3vit.tasks and the dataset modules (ask the task "
                             "class instead):\n" + "\n".join(offenders))


def test_the_rule_catches_task_names_and_spares_the_model_depth(tmp_path):
    """The check itself, on hand-written modules: it must fail where a task is spelled, and not on the
    transformer-depth config key."""
    cases = {
        'TITLES = {"semseg": "semseg", "depth": "depth"}\n': 4,
        'if task == "edge":\n    pass\n': 1,
        'CHANNELS = {"normals": 3, "depth": 1}\n': 2,
        'x = cfg["depth"]\n': 1,  # nothing says this is the architecture
        'LIMITS = {"embed_dim": 10, "depth": 12}\n': 0,
        'arch = dict(a, moe_blocks=tuple(range(1, a["depth"], 2)), num_experts=16)\n': 0,
        'report = {"tokens": n, "embed_dim": cfg.embed_dim, "depth": cfg.depth}\n': 0,
        'mixed = {"embed_dim": 1, "depth": 2, "sal": 1}\n': 2,
        '"""A docstring about depth and edge maps."""\n': 0,
    }
    for source, expected in cases.items():
        module = tmp_path / "module.py"
        module.write_text(source)
        assert len(task_literals(module)) == expected, source
    assert "embed_dim" in ARCHITECTURE_FIELDS and "depth" not in ARCHITECTURE_FIELDS
    assert _allowed(SRC / "tasks" / "sal.py") and _allowed(SRC / "data" / "synthetic" / "scenes.py")
    assert not _allowed(SRC / "engine" / "evaluator.py") and not _allowed(SRC / "data" / "show.py")
