"""The house's layering, read from the imports of every module (top-level and deferred).

Lower layers never import higher ones: ``parallel/`` imports nothing but
itself (and the config schema); ``models/``, ``losses/``, ``data/``
nothing from ``train/``, ``recipes/`` or ``evals/``; ``train/`` nothing from
``recipes/`` or ``evals/`` (it sees recipes through ``train/recipe.py``).
``train/`` and ``data/`` name no recipe, and no import cycle exists.
"""

import ast
import pathlib

from vitreg_jax import recipes

PACKAGE = pathlib.Path(recipes.__file__).resolve().parents[1]
FORBIDDEN = {
    'parallel': ('train', 'recipes', 'evals', 'data', 'models', 'losses', 'analysis', 'convert',
                 'checkpoint', 'main'),
    'models': ('train', 'recipes', 'evals', 'data', 'checkpoint', 'main'),
    'losses': ('train', 'recipes', 'evals', 'data', 'checkpoint', 'main'),
    'data': ('train', 'recipes', 'evals', 'analysis', 'models', 'checkpoint', 'main'),
    'analysis': ('train', 'recipes', 'evals', 'checkpoint', 'main'),
    'evals': ('train', 'recipes', 'checkpoint', 'main'),
    'train': ('recipes', 'evals', 'main'),
    'convert': ('train', 'recipes', 'evals', 'data', 'main'),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every ``vitreg_jax`` module ``path`` imports, at any depth of its code."""
  out = set()
  package = _module_name(path).rsplit('.', 1)[0] if path.name != '__init__.py' else _module_name(path)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith('vitreg_jax'))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + [base])
      if base.startswith('vitreg_jax'):
        out.add(base)
        out.update(f'{base}.{a.name}' for a in node.names)
  modules = {_module_name(p) for p in PACKAGE.rglob('*.py')}
  return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
  return {_module_name(p): _imports(p) for p in PACKAGE.rglob('*.py')}


def _area(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else ''


def test_no_upward_imports():
  bad = [f'{m} imports {d}' for m, deps in _graph().items() for d in deps
         if _area(d) in FORBIDDEN.get(_area(m), ())]
  assert not bad, bad


def test_no_import_cycles():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if dep == node or dep in graph.get(dep, ()):
        continue
      if state.get(dep) == 'open':
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)
  # a package importing its own submodules (``vitreg_jax.x`` -> ``vitreg_jax.x.y``) is no cycle
  real = [c for c in cycles if not all(b.startswith(a + '.') or a.startswith(b + '.')
                                       for a, b in zip(c, c[1:]))]
  assert not real, real


def _code_strings(path: pathlib.Path) -> set[str]:
  """String constants that are not docstrings."""
  tree = ast.parse(path.read_text())
  docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
  return {n.value for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def test_train_and_data_name_no_recipe():
  """No recipe name as a string or identifier (weight formats such as 'dinov2' aside)."""
  from vitreg_jax.train import loop  # pylint: disable=import-outside-toplevel
  names = (set(recipes.REGISTRY) | {'clip', 'supervised', 'trainer'}) - set(loop.EXPORT_NAMES)
  for area in ('train', 'data'):
    for path in (PACKAGE / area).rglob('*.py'):
      tree = ast.parse(path.read_text())
      identifiers = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
          n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
      # ('clip' as an identifier is np.clip / gradient clipping, not the recipe)
      found = names & _code_strings(path) | (names - {'clip'}) & identifiers
      assert not found, (path, found)
      probes = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, 'id', None) in ('hasattr', 'getattr')
                and 'recipe' in ast.unparse(n.args[0])]
      assert not probes, f'{path} probes a recipe: {ast.unparse(probes[0])}'
