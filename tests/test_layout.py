"""The package's import graph reads one way: no import cycles, no import against the data flow.

Imports at the top of a module and inside functions both count (a lazy import is still a
dependency). The layers follow the data flow of the README (ingest → embed → heads → text →
model → train → evaluate → predict → export → serve → scale / audit / track → the API and CLI);
a module may import its own layer and the layers below it, never one above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import catalens

SRC = Path(catalens.__file__).parent

#: lowest first; a module's layer is the longest prefix listed here
LAYERS = [
    ["catalens.registry", "catalens.tasks", "catalens.files", "catalens.paths", "catalens.runtime",
     "catalens.config", "catalens.distributed"],
    ["catalens.ingest"],
    ["catalens.embed"],
    ["catalens.heads"],
    ["catalens.text"],
    ["catalens.model"],
    # the measures training itself reports (validation metrics, tuned thresholds, accept thresholds)
    ["catalens.evaluate.metrics", "catalens.evaluate.thresholds", "catalens.evaluate.selective"],
    ["catalens.train"],
    ["catalens.evaluate"],
    ["catalens.predict"],
    ["catalens.export"],
    ["catalens.serve", "catalens.scale", "catalens.audit", "catalens.track", "catalens.track_pyfunc",
     "catalens.profile", "catalens.synthetic"],
    # "=name": that module alone. The package catalens.train is also the callable catalens.train(...),
    # a front door like catalens.api (its submodules stay in the train layer)
    ["catalens.api", "catalens.demo", "catalens.commands", "catalens.cli", "catalens.__main__", "=catalens",
     "=catalens.train"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every catalens module → the catalens modules it imports (anywhere in its body)."""
    names = {module_name(p) for p in SRC.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for p in SRC.rglob("*.py"):
        me = module_name(p)
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in names and t != me}
        out[me] = deps
    return out


def layer(name: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if pre.startswith("="):
                if name == pre[1:]:
                    return i
            elif (name == pre or name.startswith(pre + ".")) and len(pre) > best:
                best, found = len(pre), i
    assert found is not None, f"module {name} is in no layer of tests/test_layout.py: add it"
    return found


def test_no_import_cycles():
    graph = imports()
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # a package importing its own submodules (re-exports) is not a cycle of the data flow
    real = [c for c in sccs if not all(any(o.startswith(m + ".") for o in c if o != m) or
                                       any(m.startswith(o + ".") for o in c if o != m) for m in c)]
    assert real == [], f"import cycles: {real}"


def test_no_import_against_the_data_flow():
    upward = sorted(f"{a} imports {b}" for a, deps in imports().items() for b in deps
                    if layer(b) > layer(a) and not a.startswith(b + ".") and not b.startswith(a + "."))
    assert upward == [], "imports against the data flow:\n" + "\n".join(upward)
