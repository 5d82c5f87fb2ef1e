"""The interface between the shared machinery and a training method.

A recipe (``vitreg_jax/recipes/``: DINOv2, DeiT-III, ...) is what differs
between methods: model, batch, step, optimizer table, evaluators, exports.
The loop, the pipeline, the planner and the checkpoints call exactly the
members below and nothing else, so a new method is a new recipe module plus a
config file, never a fork of the loop.
"""

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

from vitreg_jax.train.state import TrainState

Seeds = Callable[[str], int]  # stream name -> a seed of (run seed, data shard, stream)


@dataclasses.dataclass(frozen=True)
class BatchField:
  """One field of the global batch: per-example ``shape``, ``dtype``, logical ``axes``.

  ``axes`` names every dimension of the batched array, the first being
  ``'batch'`` (sharded over the mesh's batch axes).
  """
  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str | None, ...]

  def __post_init__(self):
    if len(self.axes) != len(self.shape) + 1 or self.axes[0] != 'batch':
      raise ValueError(f'BatchField axes {self.axes} must be ("batch", ...) with one name per '
                       f'dimension of the per-example shape {self.shape}')

  def abstract(self, global_batch_size: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((global_batch_size,) + tuple(self.shape), np.dtype(self.dtype))


class Evaluator(Protocol):
  """A periodic evaluation the loop schedules (``vitreg_jax/evals/``)."""
  name: str
  every: int  # steps between runs; 0: only at the end of training

  def run(self, state: TrainState, mesh: jax.sharding.Mesh, rules: Any) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Export:
  """A trained network to ship: ``module.apply(variables, images)`` is the backbone's forward.

  ``head`` (optional): classifier params ``{'kernel': [D, C], 'bias': [C]}`` that
  formats with a classifier slot (timm) carry along; ``convert_options`` go to
  ``convert.save`` (e.g. timm's ``deit3`` layout). ``formats``: the formats this
  export is written in whatever ``train.export_formats`` says (a two-tower
  image-text model has one: ``('open_clip',)``); None: the configured ones.
  """
  module: Any
  variables: Any
  head: Any = None
  convert_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  formats: Sequence[str] | None = None


class Recipe(Protocol):
  """What a training method provides; see the module docstring."""
  total_steps: int
  global_batch_size: int
  batch_spec: Mapping[str, BatchField]
  progress_keys: Sequence[str]        # metrics shown on the progress line, after 'loss'
  best_metric: tuple[str, str] | None  # (eval metric, 'max' | 'min') for the kept best step
  zero_metrics: Sequence[str]         # metrics promised to stay exactly 0 (stop if not)
  nonfinite_hint: str                 # what to try when the loss becomes NaN / inf

  # Decoded examples (a ``grain.MapDataset``) -> batches holding ``batch_spec``'s fields.
  def host_batches(self, examples, batch_size: int, seeds: Seeds): ...

  def init_state(self, rng: jax.Array) -> TrainState: ...

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]: ...

  def evaluators(self) -> Sequence[Evaluator]: ...

  def exports(self, state: TrainState) -> Mapping[str, Export]: ...

  def analytic_flops(self, global_batch_size: int) -> float: ...


def abstract_batch(recipe: Recipe, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: f.abstract(global_batch_size) for k, f in recipe.batch_spec.items()}


def batch_axes(recipe: Recipe) -> dict[str, tuple[str | None, ...]]:
  return {k: f.axes for k, f in recipe.batch_spec.items()}
