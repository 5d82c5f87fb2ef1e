"""Recipe registry and the interface every recipe implements.

A recipe is what differs between training methods (supervised, DINOv2, CLIP):
its model, optimizer, batch format and step. Everything else (mesh, sharding,
data loading, checkpoints, logging, the planner) is shared and sees a recipe
only through this interface:

``make_recipe(config) -> Recipe``, a module-level factory, and the object it
returns has:

* ``name: str`` — the ``config.trainer`` value.
* ``batch_axes: dict[str, tuple]`` — logical axis names of each batch field,
  e.g. ``{'images': ('batch', None, None, None), 'labels': ('batch',)}``.
* ``init_state(rng) -> TrainState`` — pure and jittable. Parameters keep
  their flax logical-name boxes (``LogicallyPartitioned``); optimizer state
  and params-shaped extras may be unboxed (they inherit the parameter's
  sharding, see ``train/state.py``).
* ``abstract_batch(global_batch_size) -> dict[str, jax.ShapeDtypeStruct]`` —
  the global batch the step consumes.
* ``train_step(state, batch, rng) -> (state, metrics)`` — pure; ``rng`` is a
  typed key shared by all devices; the recipe folds in ``state.step``.
  Metrics are scalars averaged over the global batch.
* ``analytic_flops(global_batch_size) -> float`` — model FLOPs of one step
  (forward + backward, no rematerialisation), for the planner and MFU.
* ``zero_metrics: tuple[str, ...]`` — metrics the recipe guarantees to be exactly
  0 (the loop stops the run, before saving, if one is not).

Recipes are imported lazily by name so that a config only pays for its own.
"""

import importlib
from typing import Any, Mapping, Protocol

import jax

from vitreg_jax.train.state import TrainState

RECIPES = {
    'supervised': 'vitreg_jax.train.supervised',
    'dinov2': 'vitreg_jax.train.dinov2',
    'clip': 'vitreg_jax.train.clip',
}


class Recipe(Protocol):
  name: str
  batch_axes: Mapping[str, tuple[str | None, ...]]
  zero_metrics: tuple[str, ...]

  def init_state(self, rng: jax.Array) -> TrainState: ...

  def abstract_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]: ...

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]: ...

  def analytic_flops(self, global_batch_size: int) -> float: ...


def global_batch_size(config: Any) -> int:
  """The global batch: ``data.batch_size`` (pipeline recipes) or ``input.global_batch_size``."""
  if 'data' in config and 'batch_size' in config.data:
    return int(config.data.batch_size)
  if 'input' in config and 'global_batch_size' in config.input:
    return int(config.input.global_batch_size)
  raise ValueError('config sets no global batch: expected data.batch_size or input.global_batch_size')


def get_recipe(config: Any) -> Recipe:
  """The recipe named by ``config.trainer``, built from ``config``."""
  name = config.get('trainer') if hasattr(config, 'get') else getattr(config, 'trainer', None)
  if name not in RECIPES:
    raise ValueError(f'config.trainer={name!r}; valid recipes: {sorted(RECIPES)}')
  try:
    module = importlib.import_module(RECIPES[name])
  except ModuleNotFoundError as e:
    if e.name == RECIPES[name]:
      raise NotImplementedError(f'recipe {name!r} ({RECIPES[name]}) is not written yet') from e
    raise
  return module.make_recipe(config)
