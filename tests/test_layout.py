"""The package's layout (docs/design.md §3): imports point one way, with no cycle, and no private name
is imported across modules. Read from the source with `ast`, lazy (function-level) imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vpt_fast"

# Lower layers never import higher ones: prompting -> blocks -> ops -> (backends | kernels | _C), with
# the prompt parameters and their cache between ops and blocks' users, and what uses a prompted model
# (files, banks, the registry, measurement, the CLI) above prompting. Same-layer imports are allowed.
LAYERS = [
    ("vpt_fast.version", "vpt_fast._C", "vpt_fast.kernels"),
    ("vpt_fast.backends",),
    ("vpt_fast.ops",),
    ("vpt_fast.config", "vpt_fast.fsdp", "vpt_fast.prompt_cache", "vpt_fast.prompts"),
    ("vpt_fast.blocks",),
    ("vpt_fast.models",),
    ("vpt_fast.prompting",),
    ("vpt_fast.backbone", "vpt_fast.io", "vpt_fast.bank", "vpt_fast.timm_models", "vpt_fast.precision"),
    ("vpt_fast.bench",),
    ("vpt_fast.cli", "vpt_fast.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported vpt_fast module, names taken from it) for every import statement of module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("vpt_fast")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("vpt_fast"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{base}.{n}" in MODULES]
            found += [(f"{base}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((base, rest))
    return found


def _layer(name: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    assert [name for name in MODULES if name != "vpt_fast" and _layer(name) is None] == []


def test_no_upward_import():
    upward = [f"{name} imports {target}" for name in MODULES if name != "vpt_fast"
              for target, _ in _imports(name)
              if target != "vpt_fast" and _layer(target) is not None and _layer(target) > _layer(name)]
    assert upward == []


def test_no_import_cycle():
    graph = {name: {t for t, _ in _imports(name) if t in MODULES and t != "vpt_fast" and t != name}
             for name in MODULES if name != "vpt_fast"}
    # a package imports its own submodules to re-export them: that edge is not a cycle
    graph = {name: {t for t in deps if not t.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("where", ["vpt_fast", "benchmarks"])
def test_no_private_name_imported_across_modules(where):
    """What modules share is public in its owner; `from x import _name` is not done across modules."""
    files = MODULES.items() if where == "vpt_fast" else (
        (path.stem, path) for path in sorted((ROOT / "benchmarks").glob("*.py")))
    private = []
    for name, path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("vpt_fast", "kernels")) \
                    or isinstance(node, ast.ImportFrom) and node.level:
                private += [f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                            for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert private == []
