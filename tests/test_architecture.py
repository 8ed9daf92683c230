"""The package's shape: imports run downward (no cycle in rftkit's import graph) and the size budget holds.

The graph is read from the source with `ast`, not from `sys.modules`, so it counts every import: at module
top and inside function bodies (a function-level import hides a cycle from Python, not from the layering),
`from rftkit import kernels` as an import of the module `rftkit.kernels`, and relative imports.
"""
import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINECOUNT = ROOT / "scripts" / "linecount.py"


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement anywhere in its source."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}

    def known(name: str) -> str | None:
        """`name` or its longest prefix that is one of the package's modules."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:              # relative: from the module's own package, `level - 1` up
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            for t in targets:
                dep = known(t) if t.split(".")[0] == package_dir.name else None
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def cyclic_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return comps


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle (a -> b -> ... -> a) through the first module of each cyclic component."""
    cycles = []
    for comp in cyclic_components(graph):
        start = min(comp)
        paths, seen = [[start]], {start}     # breadth first: the shortest cycle through `start`
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in comp)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_import_graph_reads_every_kind_of_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",                          # `from pkg import module`
        "pkg/b.py": "def f():\n    from pkg.sub.c import g\n",      # inside a function
        "pkg/sub/__init__.py": "from .c import g\n",                 # relative, from a package's __init__
        "pkg/sub/c.py": "import os\nfrom .. import a\ng = 1\n",      # relative, one level up
        "pkg/d.py": "import pkg.sub.c\nfrom pkg.sub import g\n",     # dotted import; a name from a package
    })
    graph = import_graph(tmp_path / "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.sub.c", "pkg.sub"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_rftkit_imports_have_no_cycle():
    """STYLE.md 16: imports run downward, so the graph over module- and function-level imports is acyclic."""
    graph = import_graph(ROOT / "rftkit")
    comps = cyclic_components(graph)
    assert not comps, "import cycles in rftkit:\n" + "\n".join(
        f"  {len(comp)} modules import each other: {', '.join(sorted(comp))}\n    for one: {' -> '.join(cycle)}"
        for comp, cycle in zip(comps, find_cycles(graph)))


def readme_layout() -> list[str]:
    """The modules README.md's "Package layout" lists, in its order (a room's files under its folder line)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Package layout"):]
    block = block[block.index("```"):]
    block = block[3:block.index("```", 3)]
    order, room = [], None
    for line in block.splitlines():
        top, inner = re.match(r"^  (\S+)", line), re.match(r"^    (\S+\.py)\s", line)
        if top:
            name = top.group(1)
            room = name[:-1] if name.endswith("/") else None
            if room or name.endswith(".py"):
                order.append("rftkit." + (room or name[:-3]))
        elif inner and room:
            order.append(f"rftkit.{room}.{inner.group(1)[:-3]}")
    return order


def test_readme_layout_lists_every_module_once():
    listed, modules = readme_layout(), set(import_graph(ROOT / "rftkit")) - {"rftkit"}
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(m for m in listed if listed.count(m) > 1)}"
    assert set(listed) == modules, (f"README.md's Package layout misses {sorted(modules - set(listed))}, "
                                    f"lists {sorted(set(listed) - modules)} that do not exist")


def test_imports_run_up_the_readme_layout():
    """STYLE.md 16: README.md lists the floors from the bottom; a module imports only modules listed before it
    (a room's __init__ imports its own files)."""
    pos = {m: i for i, m in enumerate(readme_layout())}
    graph = import_graph(ROOT / "rftkit")
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps
                    if a in pos and b in pos and pos[b] > pos[a] and not b.startswith(a + "."))
    assert not upward, "imports of modules listed later in README.md's layout:\n  " + "\n  ".join(upward)


def test_every_module_opens_with_what_it_is():
    bare = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "rftkit").rglob("*.py"))
            if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 5]
    assert not bare, f"modules without a docstring saying what they are and why: {bare}"


def _linecount(package_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LINECOUNT), str(package_dir)], capture_output=True, text=True,
                          timeout=60)


def test_linecount_fails_on_a_file_over_800_lines(tmp_path):
    pkg = tmp_path / "rftkit"
    _write(pkg, {"__init__.py": '"""x"""\n', "small.py": "x = 1\n" * 800, "sub/big.py": "x = 1\n" * 801})
    out = _linecount(pkg)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sub/big.py" in out.stdout and "801" in out.stdout and "over 800" in out.stdout
    assert "small.py  <- over 800" not in out.stdout
    (pkg / "sub" / "big.py").write_text("x = 1\n" * 800)
    out = _linecount(pkg)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1601  total (3 files) of a budget of" in out.stdout


def test_package_is_within_the_file_limit():
    out = _linecount(ROOT / "rftkit")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_model_imports_only_torch_the_kernels_layers_and_moe_and_reads_no_private_state():
    """Issue 23: the model is pure. Speed comes from outside it (the engine's decode stack, the quantized layers'
    registration with rftkit.layers), so a rename elsewhere cannot silently switch a fast path off."""
    path = ROOT / "rftkit" / "model.py"
    assert import_graph(ROOT / "rftkit")["rftkit.model"] <= {"rftkit.kernels", "rftkit.layers", "rftkit.moe"}
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            tops.add((node.module or "").split(".")[0])
    assert tops <= {"__future__", "math", "dataclasses", "torch", "rftkit"}, tops
    assert not re.findall(r"\._modules|__dict__|\._buffers|\._parameters", path.read_text())
