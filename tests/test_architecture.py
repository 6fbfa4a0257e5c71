"""The import graph against docs/architecture.md: no cycles, every import allowed by the layer table, no Typer,
Click or Rich below the CLI, and no placement or kernel-fusion code in the model.

Pure `ast` over the source files; nothing of the project is imported, so this runs in about a second. An import
counts wherever it is written: at module level, inside a function (a lazy import is still a dependency), under
`if TYPE_CHECKING`, and by name through `importlib.import_module` / `__import__`.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("v4cli", "quant", "kernels")
UI_LIBRARIES = ("typer", "click", "rich")
CLI_LAYER = "cli"
# What the model (v4cli/model/) must not import: placement, kernel fusion, backends, the engine that swaps them in.
MODEL_FORBIDDEN = ("kernels.decode", "kernels.offload", "kernels.fast*", "kernels.gpu", "kernels.cpu_ext",
                   "kernels.backends", "v4cli.planning", "v4cli.engine")
HEADER = ["layer", "modules", "may import"]


# ---------------------------------------------------------------- the source tree


def find_modules() -> dict[str, Path]:
    """Dotted module name → file, for every .py under the three packages (a package is its __init__)."""
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


@dataclass(frozen=True)
class Import:
    """One dependency of a module: the dotted name as written (resolved if relative) and where."""

    name: str
    line: int
    how: str  # "import", "lazy import" (inside a function) or "by name" (importlib)


def _in_functions(tree: ast.AST) -> set[int]:
    """ids of the nodes that sit inside a function body."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    return inside


def _is_import_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__")


def raw_imports(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every name `name` imports. `from X import a, b` yields X.a and X.b, and X itself unless every one of
    them is a submodule (as /work/shared/tools/import_cycles.py counts it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lazy = _in_functions(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    dynamic = False
    for node in ast.walk(tree):
        how = "lazy import" if id(node) in lazy else "import"
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno, how) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            found += [Import(s, node.lineno, how) for s in subs]
            if not all(s in modules for s in subs):
                found.append(Import(base, node.lineno, how))
        elif _is_import_call(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(arg.value, node.lineno, "by name"))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)  # f"pkg.{x}": any module under pkg
                found += [Import(m, node.lineno, "by name") for m in modules if m.startswith(prefix)]
            else:
                dynamic = True
    if dynamic:  # a module named in a variable: every string in the file that names one of ours counts
        found += [Import(n.value, n.lineno, "by name") for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in modules]
    return found


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # "path:line"
    how: str


def build_graph(modules: dict[str, Path]) -> tuple[dict[str, list[Import]], list[Edge]]:
    raw = {m: raw_imports(m, p, modules) for m, p in modules.items()}
    edges = []
    for m, imps in raw.items():
        rel = modules[m].relative_to(ROOT).as_posix()
        seen = set()
        for imp in sorted(imps, key=lambda i: i.line):
            if imp.name in modules and imp.name != m and imp.name not in seen:
                seen.add(imp.name)
                edges.append(Edge(m, imp.name, f"{rel}:{imp.line}", imp.how))
    return raw, edges


# ---------------------------------------------------------------- the layer table in docs/architecture.md


@dataclass(frozen=True)
class Layer:
    name: str
    patterns: tuple[str, ...]
    may_import: tuple[str, ...]


def _cells(line: str) -> list[str]:
    return [c.strip().replace("`", "").strip() for c in line.strip().strip("|").split("|")]


def _names(cell: str) -> tuple[str, ...]:
    return tuple(x for x in (s.strip() for s in cell.split(",")) if x and x not in ("—", "-", "nothing"))


def read_layer_table(text: str) -> list[Layer]:
    """The one table whose header is `| layer | modules | may import |`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|") and [c.lower() for c in _cells(line)] == HEADER:
            break
    else:
        raise AssertionError(f"{DOC.relative_to(ROOT)}: no table with the header | layer | modules | may import |")
    layers = []
    for line in lines[i + 2:]:
        if not line.lstrip().startswith("|"):
            break
        name, mods, may = _cells(line)
        layers.append(Layer(name, _names(mods), _names(may)))
    return layers


def _specificity(pattern: str, module: str) -> tuple[int, int] | None:
    """How closely `pattern` names `module` (None: not at all). `pkg.*` is the package and all below it;
    an exact name beats any pattern, and a longer pattern beats a shorter one."""
    if "*" not in pattern:
        return (2, len(pattern)) if pattern == module else None
    if pattern.endswith(".*"):
        base = pattern[:-2]
        hit = module == base or module.startswith(base + ".")
    else:
        hit = fnmatch.fnmatchcase(module, pattern)
    return (1, len(pattern.replace("*", ""))) if hit else None


def layer_of(module: str, layers: list[Layer]) -> list[str]:
    """The layer(s) whose most specific pattern names `module`: one, or none, or a tie (an error in the table)."""
    scored = [(s, layer.name) for layer in layers for p in layer.patterns if (s := _specificity(p, module))]
    if not scored:
        return []
    best = max(s for s, _ in scored)
    return sorted({n for s, n in scored if s == best})


MODULES = find_modules()
RAW, EDGES = build_graph(MODULES)
LAYERS = read_layer_table(DOC.read_text(encoding="utf-8"))
BY_NAME = {layer.name: layer for layer in LAYERS}
LAYER_OF = {m: found[0] for m in MODULES if len(found := layer_of(m, LAYERS)) == 1}


def _path(module: str) -> str:
    return MODULES[module].relative_to(ROOT).as_posix()


# ---------------------------------------------------------------- (a) no import cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: the graph has a few hundred nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _one_circle(comp: list[str], by_src: dict[str, dict[str, Edge]]) -> list[Edge]:
    """A shortest circle through the component's first module, as the edges that make it."""
    members, start = set(comp), comp[0]
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, e in sorted(by_src.get(v, {}).items()):
                if w == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, prev[path[0].src])
                    return path
                if w in members and w not in prev:
                    prev[w] = e
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # cannot happen inside a strongly connected component


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    by_src: dict[str, dict[str, Edge]] = {}
    for e in EDGES:
        graph[e.src].add(e.dst)
        by_src.setdefault(e.src, {})[e.dst] = e
    bad = [c for c in strongly_connected(graph) if any(m.split(".")[0] == package for m in c)]
    lines = []
    for comp in bad:
        lines.append(f"modules importing each other in a circle ({len(comp)}): {', '.join(comp)}; one circle:")
        lines += [f"  {e.where}: {e.src} imports {e.dst} ({e.how})" for e in _one_circle(comp, by_src)]
    assert not bad, "rule (a): the import graph is a DAG\n" + "\n".join(lines)


# ---------------------------------------------------------------- (b) imports follow the layer table


def test_layer_table_is_a_dag_of_known_layers():
    names = [layer.name for layer in LAYERS]
    problems = [f"layer {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"layer {layer.name!r} may import {d!r}, which is not a layer" for layer in LAYERS
                 for d in layer.may_import if d not in BY_NAME]
    problems += [f"layer {layer.name!r} may import itself" for layer in LAYERS if layer.name in layer.may_import]
    graph = {layer.name: {d for d in layer.may_import if d in BY_NAME} for layer in LAYERS}
    problems += [f"layers allowed to import each other in a circle: {', '.join(c)}" for c in strongly_connected(graph)]
    assert CLI_LAYER in BY_NAME, f"no layer named {CLI_LAYER!r} (the CLI) in the table"
    assert not problems, f"rule (b): {DOC.relative_to(ROOT)}'s layer table\n" + "\n".join(problems)


def test_every_module_is_in_exactly_one_layer():
    problems = []
    for m in sorted(MODULES):
        found = layer_of(m, LAYERS)
        if not found:
            problems.append(f"{_path(m)}: {m} is in no layer of the table (add it to a row's modules)")
        elif len(found) > 1:
            problems.append(f"{_path(m)}: {m} is named equally closely by layers {', '.join(found)}")
    assert not problems, f"rule (b): every module has one row in {DOC.relative_to(ROOT)}\n" + "\n".join(problems)


def test_every_table_pattern_names_a_module():
    problems = [f"layer {layer.name!r}: {p} names no module in the tree" for layer in LAYERS for p in layer.patterns
                if not any(_specificity(p, m) for m in MODULES)]
    assert not problems, f"rule (b): {DOC.relative_to(ROOT)} describes the tree as it is\n" + "\n".join(problems)


@pytest.mark.parametrize("layer", [layer.name for layer in LAYERS])
def test_imports_follow_the_layer_table(layer):
    allowed = set(BY_NAME[layer].may_import)
    problems = []
    for e in EDGES:
        if LAYER_OF.get(e.src) != layer or e.dst not in LAYER_OF:
            continue
        to = LAYER_OF[e.dst]
        if to != layer and to not in allowed:
            problems.append(f"{e.where}: {e.src} imports {e.dst} ({e.how}): layer {layer} may not import layer {to}")
    may = ", ".join(sorted(allowed)) or "nothing"
    assert not problems, (f"rule (b): {DOC.relative_to(ROOT)} lets layer {layer} import only {may}\n"
                          + "\n".join(problems))


# ---------------------------------------------------------------- (c) no Typer, Click or Rich below the CLI


@pytest.mark.parametrize("library", UI_LIBRARIES)
def test_nothing_below_the_cli_imports(library):
    problems = []
    for m in sorted(MODULES):
        if LAYER_OF.get(m) == CLI_LAYER:
            continue
        for imp in RAW[m]:
            if imp.name == library or imp.name.startswith(library + "."):
                problems.append(f"{_path(m)}:{imp.line}: {m} imports {imp.name} ({imp.how})")
    cli = ", ".join(BY_NAME[CLI_LAYER].patterns)
    assert not problems, (f"rule (c): only the CLI ({cli}) imports {library}\n" + "\n".join(sorted(set(problems))))


# ---------------------------------------------------------------- (d) the model builds pure compute


def _names_target(pattern: str, name: str) -> bool:
    """Whether an imported name is (or is inside, or is a name from) what `pattern` forbids."""
    if "*" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


@pytest.mark.parametrize("forbidden", MODEL_FORBIDDEN)
def test_model_imports_no_placement_or_fusion(forbidden):
    problems = []
    for m in sorted(MODULES):
        if not (m == "v4cli.model" or m.startswith("v4cli.model.")):
            continue
        for imp in RAW[m]:
            if _names_target(forbidden, imp.name):
                problems.append(f"{_path(m)}:{imp.line}: {m} imports {imp.name} ({imp.how})")
    assert not problems, (f"rule (d): the model builds pure compute; {forbidden} is swapped in by the engine after "
                          "load\n" + "\n".join(sorted(set(problems))))


def test_the_checks_see_real_imports():
    """Guard against a walker that finds nothing (every rule above would then pass vacuously)."""
    assert len(MODULES) > 50 and len(EDGES) > 150
    assert any(e.src == "v4cli.cli" and e.dst.startswith("v4cli.commands.") and e.how == "by name" for e in EDGES)
    assert any(i.how == "lazy import" for imps in RAW.values() for i in imps)
    assert re.search(r"\bv4cli\.cli\b", ", ".join(BY_NAME[CLI_LAYER].patterns))


def test_the_layer_picture_matches_the_table():
    """The numbered picture in docs/architecture.md: every layer on one line, every import to a lower line."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("## The layers, bottom to top", 1)[-1].split("```")[1]
    line_of = {}
    for line in block.splitlines():
        if m := re.match(r"\s*(\d+)\s+(.+?)(?:\s{4,}|$)", line):
            line_of |= {name: int(m[1]) for name in m[2].split()}
    problems = [f"layer {n!r} is not in the picture" for n in BY_NAME if n not in line_of]
    problems += [f"{n!r} in the picture is not a layer of the table" for n in line_of if n not in BY_NAME]
    problems += [f"layer {layer.name} (line {line_of[layer.name]}) may import {d} (line {line_of[d]}), not lower"
                 for layer in LAYERS for d in layer.may_import
                 if layer.name in line_of and d in line_of and line_of[d] >= line_of[layer.name]]
    assert not problems, f"{DOC.relative_to(ROOT)}: the layer picture\n" + "\n".join(problems)
