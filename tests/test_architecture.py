"""The package's layers (README "Architecture"): imports go only to the same or a lower layer, the import graph has no
circle, no module uses another's private names, the root holds at most 8 modules, and an SFT run's modules import
neither the RL stack nor COMET."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "towerplus_jax")

# Lowest first. A root module is its own entry; a folder holds one layer.
LAYERS = (
    ("sharding", "distributed", "host_memory"),
    ("files",),
    ("errors",),
    ("models",),
    ("data",),
    ("config",),
    ("losses",),
    ("convert",),
    ("training",),
    ("evaluate",),
    ("rl",),
    ("run",),
    ("aot",),
    ("main", "reference", "cli"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """Package modules `path` imports (at module level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("towerplus_jax"):
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
    else:
      continue
    found.update(n for n in names if n in modules)
  return found


def _layer(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


GRAPH = {m: _imports(p, _modules()) for m, p in _modules().items()}


def test_every_module_has_a_layer():
  assert {_layer(m) for m in GRAPH} - {""} - set(RANK) == set()


def test_imports_go_down_or_sideways_only():
  upward = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
            if _layer(m) and _layer(d) and RANK[_layer(d)] > RANK[_layer(m)]]
  assert not upward, upward


def test_no_import_circle():
  state: dict[str, int] = {}  # 1 visiting, 2 done

  def visit(m: str, path: list[str]) -> None:
    state[m] = 1
    for d in sorted(GRAPH[m]):
      if d.startswith(m + "."):  # a package importing its own submodule is not a circle through it
        continue
      if state.get(d) == 1:
        pytest.fail("import circle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
      if d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(GRAPH):
    if m not in state and not m.endswith("__main__"):
      visit(m, [m])


def test_no_module_uses_another_modules_private_names():
  found = []
  for m, path in _modules().items():
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = {}  # local name -> package module
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("towerplus_jax"):
        for a in node.names:
          if a.name.startswith("_"):
            found.append(f"{m}: from {node.module} import {a.name}")
          imported[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        found.append(f"{m}: {node.value.id}.{node.attr}")
  assert not found, found


def test_the_root_keeps_at_most_eight_modules():
  root = [f for f in os.listdir(PACKAGE) if f.endswith(".py")]
  assert len(root) <= 8, sorted(root)


def test_an_sft_run_imports_neither_rl_nor_comet():
  program = ("import sys\nimport towerplus_jax.main, towerplus_jax.run.chain, towerplus_jax.run.stage\n"
             "print(sorted(m for m in sys.modules if m.startswith(('towerplus_jax.rl', 'towerplus_jax.evaluate'))))")
  out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
