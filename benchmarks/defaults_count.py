"""How many places declare each default of interest (house style 7: defaults are declared once).

Walks v4cli/, quant/ and kernels/ with `ast` and counts, per value, the declarations that could each be the
default: keyword defaults in function signatures, dataclass field defaults, and module-level constants (also
inside a dict or tuple literal bound at module level, which is how FLASH_CONFIG writes Flash). A comparison or
a call argument is a use, not a declaration, and is not counted.

    python benchmarks/defaults_count.py [--where]
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("v4cli", "quant", "kernels")

# (label, value (None: any number), the parameter/field/key names (fnmatch patterns, any case) meaning it)
INTEREST: list[tuple[str, object, tuple[str, ...]]] = [
    ("kv format 'bf16'", "bf16", ("kv_format", "kv", "DEFAULT_KV_FORMAT", "KV_FORMAT", "fmt")),
    ("device 'cpu'", "cpu", ("device", "DEFAULT_DEVICE", "DEVICE")),
    ("chunk 256", 256, ("chunk", "DEFAULT_CHUNK", "CHUNK", "prefill_chunk")),
    ("engine 'torch'", "torch", ("engine", "DEFAULT_ENGINE", "ENGINE")),
    ("Flash hidden 4096", 4096, ("hidden_size", "hidden")),
    ("Flash layers 43", 43, ("num_hidden_layers", "n_layers", "layers")),
    ("Flash experts 256", 256, ("n_routed_experts", "n_experts", "experts")),
    ("Flash vocab 129280", 129280, ("vocab_size", "vocab")),
    ("Flash heads 64", 64, ("num_attention_heads", "n_heads", "heads")),
    ("Flash head_dim 512", 512, ("head_dim",)),
    ("Flash experts/token 6", 6, ("num_experts_per_tok", "top_k")),
    ("Flash moe width 2048", 2048, ("moe_intermediate_size",)),
    ("Flash context 1048576", 1048576, ("max_position_embeddings", "context_length")),
    # memory held back beside the model: any numeric default whose name says reserve (OS_RESERVE, gpu_reserve, ...)
    ("memory reserves", None, ("*os_reserve", "*gpu_reserve", "*cpu_reserve", "*ram_reserve", "*host_reserve")),
]


def _const(node: ast.AST) -> object:
    """The literal value of `node`, or a sentinel when it is not a plain constant (1 << 30 counts as its value)."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.BinOp):
        try:
            return eval(compile(ast.Expression(node), "<const>", "eval"), {"__builtins__": {}})  # noqa: S307
        except Exception:  # not a constant expression (names, calls): not a literal default
            return _MISSING
    return _MISSING


_MISSING = object()


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _declarations(tree: ast.Module):
    """(name, value node, line) for every default a module declares."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            pos = a.posonlyargs + a.args
            for arg, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
                yield arg.arg, d, d.lineno
            for arg, d in zip(a.kwonlyargs, a.kw_defaults):
                if d is not None:
                    yield arg.arg, d, d.lineno
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:  # dataclass fields and class constants
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    yield stmt.target.id, stmt.value, stmt.lineno
                elif isinstance(stmt, ast.Assign):
                    for t in stmt.targets:
                        if isinstance(t, ast.Name):
                            yield t.id, stmt.value, stmt.lineno
    for stmt in tree.body:  # module-level constants, and the keys of module-level dict literals
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets = [stmt.target]
        for t in targets:
            if isinstance(t, ast.Name):
                yield t.id, stmt.value, stmt.lineno
                yield from _dict_items(stmt.value)


def _dict_items(node: ast.AST):
    if isinstance(node, ast.Dict):
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and isinstance(k.value, str):
                yield k.value, v, v.lineno
                yield from _dict_items(v)


def count(root: Path = ROOT) -> dict[str, list[str]]:
    """label → ["path:line name", ...] for every declaration of that default."""
    found: dict[str, list[str]] = {label: [] for label, _, _ in INTEREST}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for name, node, line in _declarations(tree):
                value = _const(node)
                if value is _MISSING:
                    continue
                for label, want, names in INTEREST:
                    if not any(fnmatch.fnmatch(name.lower(), n.lower()) for n in names):
                        continue
                    if (want is None and _is_number(value)) or (type(value) is type(want) and value == want):
                        found[label].append(f"{path.relative_to(root)}:{line} {name}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", action="store_true", help="list every declaration under its count")
    args = ap.parse_args()
    found = count()
    width = max(len(label) for label in found)
    print(f"{'default':<{width}}  places")
    for label, places in found.items():
        print(f"{label:<{width}}  {len(places):>6}")
        if args.where:
            for p in places:
                print(f"{'':<{width}}    {p}")
    print(f"{'total':<{width}}  {sum(len(p) for p in found.values()):>6}")


if __name__ == "__main__":
    main()
