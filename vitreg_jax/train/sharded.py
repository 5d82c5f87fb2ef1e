"""A recipe bound to a mesh and a rule table: the one place steps get jitted.

The training loop, the planner and the tests all go through ``ShardedRecipe``,
so a train step is compiled the same way everywhere: explicit
``in_shardings``/``out_shardings`` from the logical names, the state donated,
and the recipe traced with the rules live (activation constraints on
``batch``).
"""

from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitreg_jax.parallel import batch as batch_lib
from vitreg_jax.parallel import rules as rules_lib
from vitreg_jax.train import recipe as recipe_lib
from vitreg_jax.train import state as state_lib
from vitreg_jax.train.recipe import Recipe


class ShardedRecipe:
  """``recipe`` on ``mesh`` under ``rules`` (see ``parallel/rules.py``)."""

  @classmethod
  def from_config(cls, recipe: Recipe, config, devices=None) -> 'ShardedRecipe':
    """``recipe`` on a mesh from ``config.mesh`` under ``config.sharding``'s rules."""
    from vitreg_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    return cls(recipe, mesh, rules_lib.rules_from_config(config.sharding, mesh))

  def __init__(self, recipe: Recipe, mesh: Mesh, rules: rules_lib.Rules):
    self.recipe, self.mesh, self.rules = recipe, mesh, rules
    self.abstract_state = jax.eval_shape(recipe.init_state, jax.random.key(0))
    self.state_shardings = state_lib.state_shardings(self.abstract_state, mesh, rules)
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self._steps = {}
    self._layouts = {}

  # --- state -------------------------------------------------------------
  def init(self, rng: jax.Array) -> state_lib.TrainState:
    """The initial state, each leaf computed directly on its shards."""
    state, _ = state_lib.init_sharded(self.recipe.init_state, rng, self.mesh, self.rules,
                                      self.state_shardings)
    return state

  def abstract_sharded_state(self) -> Any:
    """``ShapeDtypeStruct``s with shardings: the state without any memory."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state_lib.unbox(self.abstract_state), self.state_shardings)

  # --- batches -----------------------------------------------------------
  def batch_layout(self, global_batch_size: int) -> batch_lib.BatchLayout:
    """This process's row blocks and data shard (see ``parallel/batch.py``)."""
    if global_batch_size not in self._layouts:
      self._layouts[global_batch_size] = batch_lib.batch_layout(
          self.mesh, self.rules, global_batch_size)
    return self._layouts[global_batch_size]

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return batch_lib.batch_shardings(recipe_lib.batch_axes(self.recipe), batch, self.mesh,
                                     self.rules)

  def global_batch(self, local_batch: Mapping[str, Any], global_batch_size: int):
    """This process's rows -> global arrays (see ``parallel/batch.py``)."""
    layout = self.batch_layout(global_batch_size)
    abstract = recipe_lib.abstract_batch(self.recipe, global_batch_size)
    return batch_lib.global_batch(local_batch, layout, self.batch_shardings(abstract))

  def abstract_batch(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    self.batch_layout(global_batch_size)  # validates the size against the mesh
    abstract = recipe_lib.abstract_batch(self.recipe, global_batch_size)
    shardings = self.batch_shardings(abstract)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in abstract.items()}

  # --- the step ----------------------------------------------------------
  def _traced_step(self, state, batch, rng):
    with rules_lib.activate(self.mesh, self.rules):
      return self.recipe.train_step(state, batch, rng)

  def _jitted_step(self, batch: Mapping[str, Any]):
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in self._steps:
      self._steps[key] = jax.jit(
          self._traced_step,
          in_shardings=(self.state_shardings, self.batch_shardings(batch), self.replicated),
          out_shardings=(self.state_shardings, self.replicated),
          donate_argnums=(0,))
    return self._steps[key]

  def train_step(self, state, batch, rng):
    """One step; ``state`` is donated (its buffers are reused for the result)."""
    return self._jitted_step(batch)(state, batch, rng)

  def lower(self, global_batch_size: int) -> jax.stages.Lowered:
    """The step lowered on abstract inputs: nothing is allocated."""
    batch = self.abstract_batch(global_batch_size)
    key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype
    rng = jax.ShapeDtypeStruct((), key_dtype, sharding=self.replicated)
    return self._jitted_step(batch).lower(self.abstract_sharded_state(), batch, rng)
