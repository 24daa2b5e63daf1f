"""Import graph and function lengths of the hvaeood package (architecture checks; no imports are executed).

  python scripts/code_report.py [--longest 10]

Prints every hvaeood module's hvaeood imports (top-level and function-local, read from the source with `ast`),
the import cycles among them (none expected), and the longest functions. tests/test_package.py fails on a cycle.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "hvaeood"


def modules(root: str = ROOT) -> dict[str, str]:
  """Module name -> file path for every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _resolve(name: str, known: set[str]) -> str | None:
  """The package module an imported name belongs to (the longest known prefix)."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    cand = ".".join(parts[:i])
    if cand in known and cand != PACKAGE:
      return cand
  return None


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """Module -> the package modules it imports anywhere in its source (functions included)."""
  mods = modules(root)
  known = set(mods)
  graph = {}
  for name, path in mods.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          pkg = name.split(".")[:-node.level + (1 if path.endswith("__init__.py") else 0)] if node.level else []
          base = ".".join(pkg + ([base] if base else []))
        targets = [f"{base}.{a.name}" for a in node.names] + [base]
      else:
        continue
      for t in targets:
        dep = _resolve(t, known)
        if dep is not None and dep != name and not name.startswith(dep + "."):
          deps.add(dep)
    graph[name] = deps
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
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
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def function_lengths(root: str = ROOT) -> list[tuple[int, str]]:
  """(lines, 'module:qualified name') of every function and method, longest first."""
  out = []
  for name, path in modules(root).items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)

    def walk(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          out.append((child.end_lineno - child.lineno + 1, f"{name}:{prefix}{child.name}"))
          walk(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
          walk(child, f"{prefix}{child.name}.")
    walk(tree, "")
  return sorted(out, reverse=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--longest", type=int, default=10)
  args = ap.parse_args()
  graph = import_graph()
  print("imports:")
  for name in sorted(graph):
    print(f"  {name} -> {', '.join(sorted(graph[name])) or '-'}")
  found = cycles(graph)
  print("cycles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none"))
  print("longest functions:")
  for n, fn in function_lengths()[:args.longest]:
    print(f"  {n:4d}  {fn}")


if __name__ == "__main__":
  main()
