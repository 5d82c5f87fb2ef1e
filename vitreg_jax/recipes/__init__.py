"""The recipes, by the name configs give in ``config.recipe``.

Imported lazily, so a config pays only for its own recipe. Adding a method:
a module here with ``make_recipe(config)`` (implementing ``train/recipe.py``),
a line in ``REGISTRY`` and a config file ``configs/NAME.py`` with a ``smoke``
preset (the registry test then runs, checkpoints, resumes and exports it).
"""

import importlib

from vitreg_jax.config import ConfigError

REGISTRY = {
    'dinov2': 'vitreg_jax.recipes.dinov2',
    'deit3': 'vitreg_jax.recipes.deit3',
    'clip': 'vitreg_jax.recipes.clip',
}


def build(config):
  """The recipe ``config.recipe`` names, built (and its config sections validated)."""
  name = config.get('recipe')
  if name not in REGISTRY:
    raise ConfigError(f'recipe={name!r}; valid recipes: {sorted(REGISTRY)}')
  return importlib.import_module(REGISTRY[name]).make_recipe(config)


def sharded(config, devices=None):
  """``build(config)`` on the config's mesh under its sharding rules (``train/sharded.py``)."""
  from vitreg_jax.train import sharded as sharded_lib  # pylint: disable=import-outside-toplevel
  return sharded_lib.ShardedRecipe.from_config(build(config), config, devices)
