"""The package's import graph has no cycle, and `kernels` knows nothing of vLLM
or of the rest of the package (it ships as `vllm_thinkv.kernels`).

Read from the source with `ast` (nothing is imported), counting every import
statement, including those inside functions: a lazy import still makes two
modules depend on each other.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package directory -> its import name (setup.py's package_dir)
ROOTS = {REPO / "vllm_thinkv": "vllm_thinkv", REPO / "kernels": "vllm_thinkv.kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for root, name in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports. A parent package imported implicitly on
    the way to a submodule does not count: Python has it in sys.modules already."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from a import b`: a.b when b is a module, else a (b is a name in a)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `a.b.func` -> `a.b`
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 50 and "vllm_thinkv.backend.impl" in edges  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# The layers of the README's import rule, lowest first: a module may import its own
# layer and lower ones. Modules not listed (errors, config, analyze, ...) are checked
# only for cycles.
LAYERS = [
    ("vllm_thinkv.kernels",),
    ("vllm_thinkv.snapkv", "vllm_thinkv.compress", "vllm_thinkv.hf"),
    ("vllm_thinkv.backend", "vllm_thinkv.models"),
    ("vllm_thinkv.plugin", "vllm_thinkv.platform", "vllm_thinkv.cli"),
]


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_imports_flow_one_way():
    upward = []
    for module, targets in graph().items():
        rank = layer_of(module)
        upward += [(module, t) for t in targets if rank is not None and (layer_of(t) or 0) > rank]
    assert not upward, upward


def test_kernels_import_nothing_of_the_plugin_or_vllm():
    edges = graph()
    for module, path in modules().items():
        if not module.startswith("vllm_thinkv.kernels"):
            continue
        outside = {m for m in edges[module] if not m.startswith("vllm_thinkv.kernels")}
        assert outside <= {"vllm_thinkv.errors"}, (module, outside)
        assert "import vllm" not in path.read_text() and "from vllm " not in path.read_text(), module
