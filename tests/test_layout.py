"""The layout the README promises: data flows one way, modules stay small.

Layers, lowest first (a module belongs to the most specific entry):
  0  formats every stage reads and writes: the feature schema, the catalogue,
     atomic file writes;
  1  data_prep: raw parquet -> catalogue + TFRecords, and the generator;
  2  tfrs_yambda: input pipeline -> towers -> model -> evaluation;
  3  export: SavedModels, TF Serving files, client, local server;
  4  the main job's entry point, which runs every stage.
A module may import from its own layer or a lower one, never a higher one,
and the imports between the project's modules have no loop.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_prep", "tfrs_yambda", "export")
LAYERS = {
    "tfrs_yambda.schema": 0,
    "tfrs_yambda.catalogue": 0,
    "tfrs_yambda.atomic": 0,
    "data_prep": 1,
    "tfrs_yambda": 2,
    "export": 3,
    "tfrs_yambda.train": 4,
}
MAX_LINES = 400


def _modules():
  """{dotted module name: path} of every module of the three packages."""
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _layer(module: str) -> int:
  parts = module.split(".")
  for end in range(len(parts), 0, -1):
    if ".".join(parts[:end]) in LAYERS:
      return LAYERS[".".join(parts[:end])]
  raise KeyError(module)


def _imports(path: str, module: str, modules) -> set:
  """The project modules `path` imports (`from a import b`: a.b if a module)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith("__init__.py")
  package = module if is_package else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) -
                                               node.level + 1] +
                        ([base] if base else []))
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
               else base for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name and name != module:
        found.add(name)
  return found


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {module: _imports(path, module, modules)
          for module, path in modules.items()}


def test_no_import_reaches_a_higher_layer(graph):
  upward = [f"{module} (layer {_layer(module)}) imports {imported} "
            f"(layer {_layer(imported)})"
            for module, imports in sorted(graph.items())
            for imported in sorted(imports)
            if _layer(imported) > _layer(module)]
  assert not upward, "\n".join(upward)


def test_no_import_loop(graph):
  state = {}  # module -> "open" while on the current path, "done" after
  loops = []

  def visit(module, path):
    state[module] = "open"
    for imported in sorted(graph[module]):
      if state.get(imported) == "open":
        loops.append(" -> ".join(path[path.index(imported):] + [imported]))
      elif imported not in state:
        visit(imported, path + [imported])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not loops, "\n".join(loops)


def test_every_module_stays_small():
  paths = list(_modules().values())
  for folder in ("tests", "benchmarks"):
    paths += [os.path.join(ROOT, folder, name)
              for name in os.listdir(os.path.join(ROOT, folder))
              if name.endswith(".py")]
  long = []
  for path in sorted(paths):
    with open(path, encoding="utf-8") as f:
      lines = sum(1 for _ in f)
    if lines > MAX_LINES:
      long.append(f"{os.path.relpath(path, ROOT)}: {lines} lines")
  assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)
