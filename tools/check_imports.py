"""Checks the import graph of `keras_adapters` (run by `nox -s lint`).

Fails (exit 1) on:
- an import cycle among the package's modules, counting imports inside
  functions (a package `__init__` importing its own children is not a cycle);
- an adapter method file (`keras_adapters/adapters/*`) importing quantization,
  distribution or placement code: methods get a kernel object and a variable
  factory instead (docs/writing_a_method.md);
- private Keras (`keras.src`) imported outside `_keras_internals.py`.

Usage: python tools/check_imports.py [PACKAGE_DIR]
"""

import ast
import os
import sys

FORBIDDEN_IN_METHODS = (
    "keras_adapters.quantization",
    "keras_adapters.distribution",
    "keras_adapters.placement",
    "keras_adapters.kernels.quantized",
)
PRIVATE_KERAS_ALLOWED = "keras_adapters._keras_internals"


def modules(root):
    """`{dotted module name: file path}` of the package at `root`."""
    found = {}
    parent = os.path.dirname(os.path.abspath(root))
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, parent)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(module, path, known):
    """Every module of `known` that `module` imports, with the raw names."""
    tree = ast.parse(open(path).read(), path)
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        targets.update(names)
    return targets


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main(root="keras_adapters"):
    known = modules(root)
    graph, problems = {}, []
    for module, path in known.items():
        raw = imports(module, path, known)
        edges = {m for m in raw if m in known and m != module}
        if path.endswith("__init__.py"):
            edges = {m for m in edges if not m.startswith(module + ".")}
        graph[module] = edges
        if module.startswith("keras_adapters.adapters."):
            bad = sorted(m for m in raw if m.startswith(FORBIDDEN_IN_METHODS))
            if bad:
                problems.append(f"{module} imports {bad}")
        private = sorted(m for m in raw if m.split(".")[:2] == ["keras", "src"])
        if private and module != PRIVATE_KERAS_ALLOWED:
            problems.append(f"{module} imports private Keras {private}")
    for component in cycles(graph):
        problems.append("import cycle: " + " -> ".join(component))
    for problem in problems:
        print(problem)
    print(f"{len(known)} modules, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
