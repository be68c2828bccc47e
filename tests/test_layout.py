"""The house stays as built: no import cycle among `offload`'s modules (type-only and function-level
imports included), `scheduler` imports nothing from `offload`, and no room below the façade
imports it. Read with `ast`, so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACADE = "offload.checkpointer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / package).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = {**_modules("offload"), **_modules("scheduler")}
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_walker_sees_relative_type_only_and_local_imports():
    graph = _graph()
    assert "offload.core.runtime" in graph["offload.checkpointer"]
    assert "offload.core.runtime" in graph["offload.auto.policy"]  # under TYPE_CHECKING
    assert "offload.transfer.cuda" in graph["offload.checkpointer"]  # inside a function
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_offload_or_scheduler():
    cycle = _find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_scheduler_never_imports_offload():
    bad = {m: sorted(i for i in deps if i.startswith("offload")) for m, deps in _graph().items()
           if m.startswith("scheduler")}
    assert not any(bad.values()), bad


def test_only_the_package_root_imports_the_facade():
    users = sorted(m for m, deps in _graph().items() if FACADE in deps)
    assert users == ["offload"], users


def test_integrations_are_clients_of_the_public_api():
    """`offload.integrations` sits above the façade, as user code does: its modules import the
    public names from `offload` and nothing below it, and nothing in `offload` imports them (each
    imports its framework, which `import offload` must not)."""
    graph = _graph()
    integrations = {m for m in graph if m.startswith("offload.integrations")}
    assert {"offload.integrations.hf", "offload.integrations.lightning"} <= integrations
    for m in integrations:
        assert graph[m] <= {"offload"} | integrations, (m, sorted(graph[m]))
    users = sorted(m for m, deps in graph.items() if deps & integrations and m not in integrations)
    assert not users, users


def test_rooms_are_subpackages_by_concern():
    rooms = {p.name for p in (ROOT / "offload").iterdir() if (p / "__init__.py").exists()}
    assert rooms == {"core", "transfer", "observe", "auto", "integrations"}
    top = sorted(p.name for p in (ROOT / "offload").glob("*.py"))
    assert top == ["__init__.py", "checkpointer.py"]
